"""The rlhf training file: prompts only, one per line.

Each line is ``{"prompt": "..."}`` or ``{"messages": [...]}`` whose last turn is not the
assistant's (the policy writes the answer). Other fields (such as ``"answer"``, the reference a
built-in reward function compares with) travel with the record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from tuneforge.storage import Storage
from tuneforge_trainer.data import ROLES, DataError, Problem, download_lines, parse_records

PromptFormat = Literal["messages", "prompt"]


@dataclass
class PromptData:
    """Validated prompt records, all in one format: ``{"prompt": str | list[message], **extra}``."""

    format: PromptFormat
    records: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def conversational(self) -> bool:
        return self.format == "messages"


def load_prompt_file(storage: Storage, key: str, param: str = "training_file") -> PromptData:
    return parse_prompt_lines(download_lines(storage, key, param), param)


def parse_prompt_lines(lines: list[bytes], param: str = "training_file") -> PromptData:
    records, problems = parse_records(lines, _parse_line, nothing="prompts")
    kinds = {isinstance(r["prompt"], list) for r in records}
    if not problems and len(kinds) > 1:
        problems.append(Problem(None, "mixed_formats", "use either 'prompt' or 'messages' on every line"))
    if problems:
        raise DataError(problems, param)
    return PromptData("messages" if kinds == {True} else "prompt", records)


def _parse_line(number: int, raw: bytes) -> tuple[dict[str, Any] | None, list[Problem]]:
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return None, [Problem(number, "not_json", "not valid JSON")]
    if not isinstance(obj, dict):
        return None, [Problem(number, "not_object", "each line must be a JSON object")]
    extra = {k: v for k, v in obj.items() if k not in ("prompt", "messages")}
    if "completion" in obj or "chosen" in obj:
        return None, [
            Problem(number, "unexpected_answer", "an rlhf prompt has no answer: the policy writes it")
        ]
    if "messages" in obj:
        messages, problems = _parse_messages(number, obj["messages"])
        return ({"prompt": messages, **extra} if not problems else None), problems
    if "prompt" in obj:
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            return None, [Problem(number, "invalid_prompt", "'prompt' must be a non-empty string")]
        return {"prompt": prompt, **extra}, []
    return None, [Problem(number, "missing_prompt", "needs 'prompt' or 'messages'")]


def _parse_messages(number: int, messages: Any) -> tuple[list[dict[str, str]], list[Problem]]:
    if not isinstance(messages, list) or not messages:
        return [], [Problem(number, "invalid_messages", "'messages' must be a non-empty list")]
    problems: list[Problem] = []
    clean: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            problems.append(Problem(number, "invalid_message", f"{where} must be an object"))
            continue
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            problems.append(
                Problem(number, "invalid_role", f"{where}.role must be one of {', '.join(ROLES)}")
            )
        if not isinstance(content, str) or not content.strip():
            problems.append(Problem(number, "invalid_content", f"{where}.content must be a non-empty string"))
        clean.append({"role": str(role), "content": content if isinstance(content, str) else ""})
    if not problems and clean[-1]["role"] == "assistant":
        problems.append(
            Problem(
                number,
                "final_assistant_message",
                "the last message is the assistant's: an rlhf prompt ends before the answer",
            )
        )
    return clean, problems
