"""Rankings -> the reward-model rankings file, one line per item.

Each line is ``{"prompt": str}`` (or ``{"messages": [...]}`` for a chat prompt) plus
``"responses"`` (answer texts, in generation order) and ``"ranking"`` (indices into
``responses``, best first): the K-way format the ``reward_model`` trainer expands into its
K(K-1)/2 weighted pairs, and which the dataset validator accepts unchanged. The rules:

1. **Labels.** Only labels that rank (not skips) count. An item is exported when it has at
   least ``min_labels`` of them; one line per item, whatever its number of labels, so every
   prompt weighs the same in training (as InstructGPT counts the pairs of one prompt as one
   example).
2. **Several labelers** are merged by mean position: in each label, an answer's position is
   1 + the number of answers in better groups + (size of its group - 1) / 2 (tied answers
   share the mean of the places they hold). Answers are ordered by their mean position over
   the item's labels; answers with equal means are tied.
3. **Unsafe.** An answer flagged unsafe by any labeler of the item (a skip's flags count too)
   is placed below every answer nobody flagged; flagged answers keep their merged order
   among themselves.
4. **Ties.** The K-way format is a strict order, and a tie states no preference, so a tie is
   never turned into a pair either way: each tie group is exported as its one answer that was
   generated first (the lowest answer index); the others of the group are left out of the line.
5. **Unusable answers.** Blank answers (the validator refuses them) are left out, and of
   several answers with the same text only the best-placed one is kept.
6. An item left with fewer than two answers exports nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any


@dataclass(frozen=True)
class Answer:
    id: str
    index: int  # order of generation
    text: str


@dataclass(frozen=True)
class LabelView:
    ranking: Sequence[Sequence[str]]
    skipped: bool
    unsafe: Sequence[str]


def label_positions(ranking: Sequence[Sequence[str]]) -> dict[str, Fraction]:
    """Answer id -> 1-based position, tied answers sharing the mean of their places (rule 2)."""
    out: dict[str, Fraction] = {}
    before = 0
    for group in ranking:
        place = Fraction(before + 1) + Fraction(len(group) - 1, 2)
        for answer in group:
            out[answer] = place
        before += len(group)
    return out


def merged_groups(answers: Sequence[Answer], labels: Sequence[LabelView]) -> list[list[Answer]]:
    """The item's answers in tie groups, best first (rules 2 and 3)."""
    ranked = [lb for lb in labels if not lb.skipped]
    flagged = {a for lb in labels for a in lb.unsafe}
    by_label = [label_positions(lb.ranking) for lb in ranked]

    def key(answer: Answer) -> tuple[bool, Fraction]:
        places = [p[answer.id] for p in by_label if answer.id in p]
        mean = sum(places, Fraction(0)) / len(places) if places else Fraction(len(answers) + 1)
        return answer.id in flagged, mean

    groups: list[list[Answer]] = []
    last: tuple[bool, Fraction] | None = None
    for answer in sorted(answers, key=lambda a: (key(a), a.index)):
        if key(answer) != last:
            groups.append([])
            last = key(answer)
        groups[-1].append(answer)
    return groups


def export_record(
    prompt: Any, answers: Sequence[Answer], labels: Sequence[LabelView]
) -> dict[str, Any] | None:
    """The line for one item, or None when it has fewer than two answers left (rules 4-6)."""
    chosen: list[Answer] = []
    seen_texts: set[str] = set()
    for group in merged_groups(answers, labels):
        usable = [a for a in group if a.text.strip()]
        if not usable:
            continue
        first = min(usable, key=lambda a: a.index)
        if first.text in seen_texts:
            continue
        seen_texts.add(first.text)
        chosen.append(first)
    if len(chosen) < 2:
        return None
    in_order = sorted(chosen, key=lambda a: a.index)
    record: dict[str, Any] = {"messages": prompt} if isinstance(prompt, list) else {"prompt": prompt}
    record["responses"] = [a.text for a in in_order]
    record["ranking"] = [in_order.index(a) for a in chosen]
    return record


def to_jsonl(records: Sequence[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records)
