"""Load and validate the SFT training file (JSON lines) and convert it into TRL's formats.

``Problem`` and ``DataError`` are shared with ``preference_data`` (reward_model, dpo).

Each line is either a chat example ``{"messages": [{"role", "content"}, ...]}`` or a
``{"prompt": str, "completion": str}`` pair. The API validates files too; the trainer checks
again because it is the last line of defence and its errors carry line numbers.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.storage import Storage
from tuneforge_trainer.config_mapping import DataFormat
from tuneforge_trainer.errors import NonRetriableError

ROLES = ("system", "user", "assistant", "tool")
MAX_REPORTED_PROBLEMS = 20


@dataclass(frozen=True)
class Problem:
    line: int | None  # 1-based; None for problems with the whole file
    code: str
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.message} ({self.code})"


class DataError(NonRetriableError):
    """The training file is unusable; lists up to 20 problems and the total count."""

    def __init__(self, problems: list[Problem], param: str = "training_file") -> None:
        shown = problems[:MAX_REPORTED_PROBLEMS]
        more = len(problems) - len(shown)
        noun = "problem" if len(problems) == 1 else "problems"
        what = param.replace("_", " ")  # "training file" or "validation file"
        message = f"{what} has {len(problems)} {noun}: " + "; ".join(map(str, shown))
        if more:
            message += f"; and {more} more"
        super().__init__(f"invalid_{param}", message, param)
        self.problems = problems


@dataclass
class SFTData:
    """Validated examples, all in one TRL format (a dataset needs one schema)."""

    format: DataFormat
    records: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)


def download_lines(storage: Storage, key: str, param: str = "training_file") -> list[bytes]:
    """The file at ``key`` as raw lines; a missing file is a DataError."""
    with tempfile.TemporaryDirectory(prefix="tuneforge-data-") as tmp:
        path = Path(tmp) / "data.jsonl"
        try:
            storage.get_file(key, path)
        except FileNotFoundError:
            raise DataError([Problem(None, "file_not_found", "the file is not in storage")], param) from None
        return path.read_bytes().splitlines()


def load_sft_file(storage: Storage, key: str, param: str = "training_file") -> SFTData:
    """Download the file at ``key`` and validate it; raises DataError."""
    return parse_sft_lines(download_lines(storage, key, param), param)


def parse_records(
    lines: list[bytes], parse_line: Callable[[int, bytes], tuple[Any, list[Problem]]], *, nothing: str
) -> tuple[list[Any], list[Problem]]:
    """Parse every non-blank line with ``parse_line``; the records of clean lines, and every
    problem (with its 1-based line number). ``nothing`` names what an empty file lacks."""
    problems: list[Problem] = []
    records: list[Any] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        record, found = parse_line(number, raw)
        problems.extend(found)
        if record is not None and not found:
            records.append(record)
    if not problems and not records:
        problems.append(Problem(None, "empty_file", f"the file has no {nothing}"))
    return records, problems


def parse_sft_lines(lines: list[bytes], param: str = "training_file") -> SFTData:
    """Validate every line, then convert; blank lines are skipped."""
    examples, problems = parse_records(lines, _parse_line, nothing="examples")
    if problems:
        raise DataError(problems, param)
    return to_trl_format(examples)


def _parse_line(number: int, raw: bytes) -> tuple[dict[str, Any] | None, list[Problem]]:
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None, [Problem(number, "not_json", "not valid JSON")]
    if not isinstance(obj, dict):
        return None, [Problem(number, "not_object", "each line must be a JSON object")]
    if "messages" in obj:
        return _parse_messages(number, obj["messages"])
    if "prompt" in obj or "completion" in obj:
        return _parse_prompt_completion(number, obj)
    return None, [Problem(number, "missing_messages", "needs 'messages', or 'prompt' and 'completion'")]


def _text(content: Any) -> str | None:
    """A message's text: a string, or OpenAI's content parts ``[{"type": "text", "text": ...}]``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    return None


def _parse_messages(number: int, messages: Any) -> tuple[dict[str, Any] | None, list[Problem]]:
    """OpenAI's chat format, normalised: ``developer`` is a system turn, content parts are joined,
    tool calls pass through to the chat template, and ``weight`` (0 or 1) marks whether an
    assistant turn is trained."""
    if not isinstance(messages, list) or not messages:
        return None, [Problem(number, "invalid_messages", "'messages' must be a non-empty list")]
    problems: list[Problem] = []
    clean: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            problems.append(Problem(number, "invalid_message", f"{where} must be an object"))
            continue
        role = "system" if message.get("role") == "developer" else message.get("role")
        content = _text(message.get("content")) if message.get("content") is not None else None
        tool_calls = message.get("tool_calls") if role == "assistant" else None
        if role not in ROLES:
            problems.append(
                Problem(number, "invalid_role", f"{where}.role must be one of {', '.join(ROLES)}, developer")
            )
        if content is None and not tool_calls:
            problems.append(Problem(number, "invalid_content", f"{where}.content must be text"))
        elif not tool_calls and not content.strip():
            problems.append(Problem(number, "empty_content", f"{where}.content is empty"))
        weight = message.get("weight", 1)
        if weight not in (0, 1) or ("weight" in message and role != "assistant"):
            problems.append(
                Problem(number, "invalid_weight", f"{where}.weight must be 0 or 1, on assistant turns")
            )
        turn: dict[str, Any] = {"role": str(role), "content": content or ""}
        if isinstance(message.get("tool_call_id"), str):  # chat templates render it; other fields are dropped
            turn["tool_call_id"] = message["tool_call_id"]
        if tool_calls:
            turn["tool_calls"] = tool_calls
        if weight == 0:
            turn["weight"] = 0
        clean.append(turn)
    trained = [m for m in clean if m["role"] == "assistant" and m.get("weight", 1) == 1]
    if not problems and not any(m["content"].strip() or m.get("tool_calls") for m in trained):
        problems.append(Problem(number, "missing_assistant_message", "needs an assistant message to learn"))
    return ({"messages": clean} if not problems else None), problems


def _parse_prompt_completion(number: int, obj: dict[str, Any]) -> tuple[dict[str, Any] | None, list[Problem]]:
    problems = []
    for name in ("prompt", "completion"):
        value = obj.get(name)
        if not isinstance(value, str):
            problems.append(Problem(number, f"invalid_{name}", f"'{name}' must be a string"))
        elif name == "completion" and not value.strip():
            problems.append(Problem(number, "empty_content", "'completion' is empty"))
    if problems:
        return None, problems
    return {"prompt": obj["prompt"], "completion": obj["completion"]}, []


def to_trl_format(examples: list[dict[str, Any]]) -> SFTData:
    """One format per dataset: prompt/completion if every line is one, else chat messages.

    A file mixing both turns its prompt/completion pairs into a user/assistant exchange, so
    the loss still covers only the answer. A file with an untrained assistant turn
    (``weight: 0``) becomes conversational prompt/completion pairs, one per trained turn with
    the turns before it as the prompt: the same loss, with nothing learnt from the others.
    """
    if any(m.get("weight") == 0 for e in examples for m in e.get("messages", ())):
        return SFTData("prompt_completion", [pair for e in examples for pair in trained_turns(_as_chat(e))])
    if all("prompt" in e for e in examples):
        return SFTData("prompt_completion", examples)
    return SFTData("messages", [_as_chat(e) for e in examples])


def trained_turns(example: dict[str, Any]) -> list[dict[str, Any]]:
    """One conversational prompt/completion pair per trained assistant turn."""
    messages = [{k: v for k, v in m.items() if k != "weight"} for m in example["messages"]]
    return [
        {"prompt": messages[:i], "completion": [messages[i]]}
        for i, m in enumerate(example["messages"])
        if m["role"] == "assistant" and m.get("weight", 1) == 1
    ]


def as_messages(data: SFTData) -> SFTData:
    """The same examples as chat messages (gives a training and a validation file one schema)."""
    return data if data.format == "messages" else SFTData("messages", [_as_chat(e) for e in data.records])


def _as_chat(example: dict[str, Any]) -> dict[str, Any]:
    if "messages" in example:
        return example
    if isinstance(example["prompt"], list):  # already conversational prompt/completion
        return {"messages": example["prompt"] + example["completion"]}
    return {
        "messages": [
            {"role": "user", "content": example["prompt"]},
            {"role": "assistant", "content": example["completion"]},
        ]
    }
