"""Preference data for ``reward_model`` and ``dpo``: validate JSON lines, expand rankings into pairs.

Accepted lines (one prompt each):

- pairwise: ``{"prompt": str | [messages], "chosen": R, "rejected": R}``, or ``"messages"`` in
  place of ``"prompt"``; a response R is a string or a list of assistant messages;
- K-way ranking (reward_model only): ``{"prompt" | "messages", "responses": [R, ...], "ranking": [i, ...]}``,
  where ``ranking`` is a permutation of the response indices, best first.

A ranking becomes all K·(K−1)/2 ordered pairs (better, worse). As in InstructGPT (Ouyang et
al. 2022, section 3.5), the pairs of one prompt together count as ONE example: each pair gets
weight 1/(K·(K−1)/2), so a prompt with many answers does not outweigh (or overfit) the rest.
A plain pair is the K=2 case, weight 1. The trainer divides the weights by their mean over the
file, so a file of pairs only trains exactly as TRL's unweighted loss does.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from tuneforge_trainer.data import ROLES, DataError, Problem, download_lines, parse_records

PreferenceFormat = Literal["standard", "conversational"]
T = TypeVar("T")


def expand_ranking(responses: Sequence[T], ranking: Sequence[int]) -> list[tuple[T, T, float]]:
    """All (better, worse, weight) pairs of a ranking, best pairs first.

    ``ranking[0]`` is the index of the best response. Pairs come in rank order: (1st, 2nd),
    (1st, 3rd), ..., (2nd, 3rd), ...; each weighs 1/(K·(K−1)/2), so they sum to 1.
    """
    k = len(responses)
    if k < 2 or sorted(ranking) != list(range(k)):
        raise ValueError("ranking must be a permutation of at least two response indices")
    ordered = [responses[i] for i in ranking]
    weight = 1.0 / (k * (k - 1) // 2)
    return [(ordered[i], ordered[j], weight) for i in range(k) for j in range(i + 1, k)]


def normalize_weights(weights: Sequence[float]) -> list[float]:
    """Scale weights to mean 1: batches of pairs then estimate the per-prompt average loss without bias."""
    if not weights:
        return []
    mean = sum(weights) / len(weights)
    return [w / mean for w in weights]


@dataclass
class PreferenceData:
    """Validated pairs in one TRL preference format; ``weight`` on each record when ``weighted``."""

    format: PreferenceFormat
    records: list[dict[str, Any]] = field(default_factory=list)
    n_examples: int = 0  # lines of the file (prompts), before expanding rankings
    weighted: bool = False

    def __len__(self) -> int:
        return len(self.records)


def load_preference_file(
    storage: Any, key: str, *, allow_rankings: bool, param: str = "training_file"
) -> PreferenceData:
    return parse_preference_lines(
        download_lines(storage, key, param), allow_rankings=allow_rankings, param=param
    )


def parse_preference_lines(
    lines: list[bytes], *, allow_rankings: bool, param: str = "training_file"
) -> PreferenceData:
    """Validate every line, expand rankings, then convert to one format; blank lines are skipped."""
    examples, problems = parse_records(
        lines, lambda number, raw: _parse_line(number, raw, allow_rankings), nothing="examples"
    )
    if problems:
        raise DataError(problems, param)
    return _to_trl_format(examples, weighted=allow_rankings)


def _parse_line(
    number: int, raw: bytes, allow_rankings: bool
) -> tuple[tuple[Any, list[tuple[Any, Any, float]]] | None, list[Problem]]:
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None, [Problem(number, "not_json", "not valid JSON")]
    if not isinstance(obj, dict):
        return None, [Problem(number, "not_object", "each line must be a JSON object")]
    problems: list[Problem] = []
    prompt = _parse_prompt(number, obj, problems)
    if "responses" in obj or "ranking" in obj:
        if not allow_rankings:
            return None, [Problem(number, "unsupported_format", "this method takes chosen/rejected pairs")]
        pairs = _parse_ranking(number, obj, problems)
    else:
        pairs = _parse_pair(number, obj, problems)
    return ((prompt, pairs) if not problems else None), problems


def _parse_prompt(number: int, obj: dict[str, Any], problems: list[Problem]) -> Any:
    name = "messages" if "messages" in obj and "prompt" not in obj else "prompt"
    if name not in obj:
        problems.append(Problem(number, "missing_field", "needs 'prompt' or 'messages'"))
        return None
    value = obj[name]
    if isinstance(value, str):
        return value  # an empty prompt is allowed: the responses carry the signal
    if isinstance(value, list) and value:
        return _parse_messages(number, value, name, problems, assistant_only=False)
    problems.append(
        Problem(number, f"invalid_{name}", f"'{name}' must be a string or a non-empty message list")
    )
    return None


def _parse_pair(number: int, obj: dict[str, Any], problems: list[Problem]) -> list[tuple[Any, Any, float]]:
    found = [_parse_response(number, obj, name, problems) for name in ("chosen", "rejected")]
    return [(found[0], found[1], 1.0)]


def _parse_ranking(number: int, obj: dict[str, Any], problems: list[Problem]) -> list[tuple[Any, Any, float]]:
    for name in ("responses", "ranking"):
        if name not in obj:
            problems.append(Problem(number, "missing_field", f"needs '{name}'"))
    if problems:
        return []
    responses, ranking = obj["responses"], obj["ranking"]
    if not isinstance(responses, list):
        problems.append(Problem(number, "invalid_content", "'responses' must be a list"))
        return []
    if len(responses) < 2:
        problems.append(Problem(number, "too_few_responses", "'responses' needs at least 2 answers to rank"))
        return []
    parsed = [_response(number, r, f"responses[{i}]", problems) for i, r in enumerate(responses)]
    if not (
        isinstance(ranking, list)
        and all(isinstance(i, int) and not isinstance(i, bool) for i in ranking)
        and sorted(ranking) == list(range(len(responses)))
    ):
        problems.append(
            Problem(number, "invalid_ranking", "'ranking' must list every response index once, best first")
        )
        return []
    return expand_ranking(parsed, ranking)


def _parse_response(number: int, obj: dict[str, Any], name: str, problems: list[Problem]) -> Any:
    if name not in obj:
        problems.append(Problem(number, "missing_field", f"needs '{name}'"))
        return None
    return _response(number, obj[name], name, problems)


def _response(number: int, value: Any, name: str, problems: list[Problem]) -> Any:
    if isinstance(value, str):
        if not value.strip():
            problems.append(Problem(number, "empty_content", f"'{name}' is empty"))
        return value
    if isinstance(value, list) and value:
        return _parse_messages(number, value, name, problems, assistant_only=True)
    problems.append(Problem(number, "invalid_content", f"'{name}' must be a string or assistant messages"))
    return None


def _parse_messages(
    number: int, messages: list[Any], name: str, problems: list[Problem], *, assistant_only: bool
) -> list[dict[str, str]]:
    clean: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            problems.append(Problem(number, "invalid_message", f"{where} must be an object"))
            continue
        role, content = message.get("role"), message.get("content")
        allowed = ("assistant",) if assistant_only else ROLES
        if role not in allowed:
            problems.append(
                Problem(number, "invalid_role", f"{where}.role must be one of {', '.join(allowed)}")
            )
        if not isinstance(content, str):
            problems.append(Problem(number, "invalid_content", f"{where}.content must be a string"))
        elif not content.strip():
            problems.append(Problem(number, "empty_content", f"{where}.content is empty"))
        clean.append({"role": str(role), "content": content if isinstance(content, str) else ""})
    return clean


def _to_trl_format(
    examples: list[tuple[Any, list[tuple[Any, Any, float]]]], *, weighted: bool
) -> PreferenceData:
    """One format per dataset: plain strings if every part is one, else chat messages throughout."""
    parts = [p for prompt, pairs in examples for p in (prompt, *(x for pair in pairs for x in pair[:2]))]
    conversational = any(isinstance(p, list) for p in parts)
    records = []
    for prompt, pairs in examples:
        for chosen, rejected, weight in pairs:
            record: dict[str, Any] = {
                "prompt": _as_messages(prompt, "user") if conversational else prompt,
                "chosen": _as_messages(chosen, "assistant") if conversational else chosen,
                "rejected": _as_messages(rejected, "assistant") if conversational else rejected,
            }
            if weighted:
                record["weight"] = weight
            records.append(record)
    if weighted:
        for record, weight in zip(records, normalize_weights([r["weight"] for r in records]), strict=True):
            record["weight"] = weight
    return PreferenceData(
        "conversational" if conversational else "standard", records, len(examples), weighted
    )


def as_conversational(data: PreferenceData) -> PreferenceData:
    """The same pairs as chat messages (gives a training and a validation file one schema)."""
    if data.format == "conversational":
        return data
    records = [
        {
            **r,
            "prompt": _as_messages(r["prompt"], "user"),
            "chosen": _as_messages(r["chosen"], "assistant"),
            "rejected": _as_messages(r["rejected"], "assistant"),
        }
        for r in data.records
    ]
    return PreferenceData("conversational", records, data.n_examples, data.weighted)


def one_schema(
    data: PreferenceData, eval_data: PreferenceData | None
) -> tuple[PreferenceData, PreferenceData | None]:
    if eval_data is None or eval_data.format == data.format:
        return data, eval_data
    return as_conversational(data), as_conversational(eval_data)


def _as_messages(value: Any, role: str) -> list[dict[str, str]]:
    if isinstance(value, list):
        return value
    return [{"role": role, "content": value}] if value else []
