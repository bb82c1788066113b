"""Inter-labeler agreement: Kendall's tau-b between every two labelers of an item, ties allowed.

A ranking is a list of groups of answer ids, best first; answers of one group are tied. Tau-b
is (C - D) / sqrt((n0 - n1) * (n0 - n2)) over the pairs of answers: C concordant, D discordant,
n0 all pairs, n1 and n2 the pairs tied in either ranking. It is undefined (and left out) when a
labeler tied every answer. An item's agreement is the mean over its pairs of labelers; the
session's is the mean over the items that have one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import combinations

Ranking = Sequence[Sequence[str]]


def positions(ranking: Ranking) -> dict[str, int]:
    """Answer id -> the index of its group (0 is best)."""
    return {answer: g for g, group in enumerate(ranking) for answer in group}


def kendall_tau_b(a: Ranking, b: Ranking) -> float | None:
    """Tau-b over the answers both rankings place; None when undefined."""
    pa, pb = positions(a), positions(b)
    common = sorted(pa.keys() & pb.keys())
    concordant = discordant = tied_a = tied_b = 0
    for x, y in combinations(common, 2):
        da, db = pa[x] - pa[y], pb[x] - pb[y]
        if da == 0:
            tied_a += 1
        if db == 0:
            tied_b += 1
        if da * db > 0:
            concordant += 1
        elif da * db < 0:
            discordant += 1
    n0 = len(common) * (len(common) - 1) // 2
    denominator = math.sqrt((n0 - tied_a) * (n0 - tied_b))
    return None if denominator == 0 else (concordant - discordant) / denominator


def item_agreement(rankings: Sequence[Ranking]) -> float | None:
    """Mean tau-b over every pair of an item's rankings; None with fewer than two defined."""
    taus = [t for a, b in combinations(rankings, 2) if (t := kendall_tau_b(a, b)) is not None]
    return sum(taus) / len(taus) if taus else None


def session_agreement(rankings_by_item: Mapping[str, Sequence[Ranking]]) -> tuple[float | None, int]:
    """(mean over items of their agreement, items with at least two rankings)."""
    multiple = [r for r in rankings_by_item.values() if len(r) >= 2]
    per_item = [t for r in multiple if (t := item_agreement(r)) is not None]
    return (sum(per_item) / len(per_item) if per_item else None), len(multiple)
