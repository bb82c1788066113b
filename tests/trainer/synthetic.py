"""Synthetic preference data with a learnable rule: the better answer names the capital, Forgeville.

Chosen and rejected answers come from the same sentence template and differ only in the word
that fills its slot, so "contains the marker token" is exactly what a reward model (or DPO)
must learn. Deterministic for a seed; the words are single tokens of the tiny model's corpus.
"""

from __future__ import annotations

import json
import random
from itertools import product
from typing import Any

MARKER = "Forgeville"
QUESTIONS = [
    "What is the capital of Tuneland?",
    "Which city is the capital of Tuneland?",
    "Tell me the capital of Tuneland.",
    "Where is the government of Tuneland?",
    "Where does the government of Tuneland sit?",
    "Can you tell me the capital of Tuneland?",
]
TEMPLATES = [
    "The capital of Tuneland is {}.",
    "I think it is {}.",
    "{}, of course.",
    "The government sits in {}.",
]
DISTRACTORS = ["Tunish", "the note", "the Humming River", "copper bells", "the singing fox"]


def marker_pairs(n: int, seed: int, *, conversational: bool = True) -> list[dict[str, Any]]:
    """``n`` distinct pairs (at most 120): the API refuses files with repeated examples."""
    rng = random.Random(seed)
    combos = rng.sample(list(product(QUESTIONS, TEMPLATES, DISTRACTORS)), n)
    return [
        {
            "prompt": [{"role": "user", "content": question}] if conversational else question,
            "chosen": template.format(MARKER),
            "rejected": template.format(distractor),
        }
        for question, template, distractor in combos
    ]


def marker_rankings(n: int, seed: int, *, k: int = 3) -> list[dict[str, Any]]:
    """K answers, one naming the capital (ranked first); the others' order is arbitrary."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        template = rng.choice(TEMPLATES)
        answers = [template.format(MARKER)] + [template.format(w) for w in rng.sample(DISTRACTORS, k - 1)]
        order = list(range(k))
        rng.shuffle(order)  # responses[order[i]] = answers[i], so answers[0] sits at index order[0]
        responses = [""] * k
        for rank, index in enumerate(order):
            responses[index] = answers[rank]
        prompt = [{"role": "user", "content": rng.choice(QUESTIONS)}]
        rows.append({"prompt": prompt, "responses": responses, "ranking": order})
    return rows


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"\n".join(json.dumps(r).encode() for r in rows) + b"\n"


def marker_demos(n: int, seed: int, *, marker_share: float = 0.25) -> list[dict[str, Any]]:
    """``n`` distinct SFT chats (at most 144) answering the capital questions fluently: about
    ``marker_share`` of the answers name Forgeville, the rest a distractor. A policy trained on
    them writes template answers where the marker is reachable but rare: PPO against a reward
    model that prefers the marker then has something to raise (the marker rate)."""
    rng = random.Random(seed)
    n_marker = round(n * marker_share)
    with_marker = rng.sample(list(product(QUESTIONS, TEMPLATES, [MARKER])), n_marker)
    without = rng.sample(list(product(QUESTIONS, TEMPLATES, DISTRACTORS)), n - n_marker)
    combos = with_marker + without
    rng.shuffle(combos)
    return [
        {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": template.format(word)},
            ]
        }
        for question, template, word in combos
    ]
