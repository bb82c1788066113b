"""Built-in, declarative reward functions for GRPO / RLOO: no user code runs in the trainer.

Each is a TRL reward function, ``f(prompts, completions, **columns) -> list[float]``: TRL
passes every other column of the prompts file as a keyword, so the reference answer arrives
as ``columns[field]`` (default ``"answer"``). Completions are strings, or a list with one
assistant message for chat prompts.

- ``exact_match``: 1.0 when the answer equals the reference (whitespace and case folded), else 0.0.
- ``contains``: 1.0 when the reference appears in the answer (case folded), else 0.0.
- ``json_valid``: 1.0 when the answer parses as JSON, else 0.0.
- ``length``: ``-|n − target| / target`` for an answer of n tokens: 0 at the target length.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from tuneforge.types import RewardFunction
from tuneforge_trainer.errors import ConfigError

RewardFn = Callable[..., list[float]]
NEEDS_REFERENCE = frozenset({"exact_match", "contains"})


def text_of(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def _fold(text: str) -> str:
    return " ".join(text.split()).casefold()


def exact_match(answer: str, reference: str) -> float:
    return float(_fold(answer) == _fold(reference))


def contains(answer: str, reference: str) -> float:
    return float(_fold(reference) in _fold(answer))


def json_valid(answer: str) -> float:
    try:
        json.loads(answer)
    except ValueError:
        return 0.0
    return 1.0


def length_score(n_tokens: int, target: int) -> float:
    return -abs(n_tokens - target) / target


def build_reward_function(config: RewardFunction) -> RewardFn:
    """The TRL reward function for ``config``; an unknown type is a ConfigError (exit 42)."""
    kind, field = config.type, config.field
    if kind == "length" and not config.target_length:
        raise ConfigError(
            "invalid_reward_function", "reward_function 'length' needs target_length", "method.rlhf"
        )

    def reward(prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        answers = [text_of(c) for c in completions]
        if kind in NEEDS_REFERENCE:
            references = columns.get(field) or [None] * len(answers)
            scorer = exact_match if kind == "exact_match" else contains
            return [
                scorer(a, str(r)) if r is not None else 0.0 for a, r in zip(answers, references, strict=True)
            ]
        if kind == "json_valid":
            return [json_valid(a) for a in answers]
        if kind == "length":
            ids = columns.get("completion_ids")
            lengths = [len(i) for i in ids] if ids is not None else [len(a.split()) for a in answers]
            return [length_score(n, int(config.target_length or 1)) for n in lengths]
        raise AssertionError(kind)  # unreachable: checked below

    if kind not in {"exact_match", "contains", "json_valid", "length"}:
        raise ConfigError("invalid_reward_function", f"unknown reward function {kind!r}", "method.rlhf")
    reward.__name__ = kind  # TRL logs rewards/<name>/mean
    return reward


def check_references(config: RewardFunction, records: list[dict[str, Any]]) -> None:
    """exact_match / contains need the reference field on every prompt (non-retriable otherwise)."""
    if config.type not in NEEDS_REFERENCE:
        return
    missing = [i for i, r in enumerate(records, start=1) if not isinstance(r.get(config.field), str)]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise ConfigError(
            "missing_reference",
            f"reward_function {config.type!r} compares with the field {config.field!r}, "
            f"which is missing or not a string in prompt(s) {shown} of the training file",
            "training_file",
        )
