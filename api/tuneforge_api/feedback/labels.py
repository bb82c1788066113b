"""A labeler's view of an item: the answers in a stable random order, and the checks on a label."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def shuffled_for(items: Sequence[T], item_id: str, labeler: str) -> list[T]:
    """``items`` in an order random per item and per labeler, the same on every reload: the
    position of an answer must not hint at its rank, nor be the same for every labeler."""
    seed = hashlib.sha256(f"{item_id}\0{labeler}".encode()).digest()
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


class LabelError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def check_label(
    ranking: Sequence[Sequence[str]], unsafe: Sequence[str], skipped: bool, answer_ids: Sequence[str]
) -> tuple[list[list[str]], list[str]]:
    """The ranking and unsafe flags, cleaned; raises ``LabelError``.

    A ranking lists every answer exactly once, best first, in groups (a group of several is a
    tie). A skip needs no ranking, but any answer id it names must be the item's.
    """
    known = set(answer_ids)
    groups = [list(g) for g in ranking]
    flat = [a for g in groups for a in g]
    if any(not g for g in groups):
        raise LabelError("a ranking group is empty", "ranking")
    if unknown := [a for a in flat if a not in known]:
        raise LabelError(f"answer {unknown[0]!r} is not an answer of this item", "ranking")
    if len(set(flat)) != len(flat):
        twice = next(a for a in flat if flat.count(a) > 1)
        raise LabelError(f"answer {twice!r} is ranked twice", "ranking")
    if not skipped and len(flat) != len(known):
        missing = [a for a in answer_ids if a not in set(flat)]
        raise LabelError(f"the ranking misses {len(missing)} answer(s), e.g. {missing[0]!r}", "ranking")
    if bad := [a for a in unsafe if a not in known]:
        raise LabelError(f"answer {bad[0]!r} is not an answer of this item", "unsafe")
    return groups, list(dict.fromkeys(unsafe))
