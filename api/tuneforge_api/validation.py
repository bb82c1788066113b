"""Upload-time checks of a JSONL dataset: streamed line by line, with bounded memory.

Every problem carries its 1-based line number and a stable code, so a user can fix
the file before any GPU time is spent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import IO, Any

MAX_LINE_BYTES = 8 * 1024 * 1024
MAX_PROBLEMS = 100
ROLES = {"system", "user", "assistant", "tool", "developer"}

# Keys that identify a record's format, most specific first.
FORMATS: list[tuple[str, tuple[str, ...]]] = [
    ("rankings", ("responses", "ranking")),
    ("preference", ("chosen", "rejected")),
    ("prompt_completion", ("prompt", "completion")),
    ("chat", ("messages",)),
    ("prompts", ("prompt",)),
]


@dataclass
class Problem:
    line: int
    code: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.message} [{self.code}]"


@dataclass
class Report:
    n_examples: int = 0
    data_format: str | None = None
    problems: list[Problem] = field(default_factory=list)
    n_problems: int = 0

    def add(self, line: int, code: str, message: str) -> None:
        self.n_problems += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(Problem(line, code, message))

    @property
    def ok(self) -> bool:
        return self.n_problems == 0 and self.n_examples > 0

    def summary(self, shown: int = 5) -> str:
        if self.n_examples == 0 and not self.problems:
            return "the file has no examples"
        head = "; ".join(str(p) for p in self.problems[:shown])
        more = self.n_problems - min(shown, len(self.problems))
        return head + (f"; and {more} more problems" if more > 0 else "")


def detect_format(record: dict[str, Any]) -> str | None:
    for name, keys in FORMATS:
        if all(k in record for k in keys):
            return name
    return None


def _check_chat(record: dict[str, Any], line: int, report: Report) -> None:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        report.add(line, "invalid_messages", "'messages' must be a non-empty list")
        return
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            report.add(line, "invalid_message", f"messages[{i}] is not an object")
            return
        role = msg.get("role")
        if role not in ROLES:
            report.add(line, "invalid_role", f"messages[{i}].role {role!r} is not one of {sorted(ROLES)}")
            return
        content = msg.get("content")
        if role == "assistant" and msg.get("tool_calls"):
            continue
        if not isinstance(content, str) or not content.strip():
            report.add(line, "empty_content", f"messages[{i}] ({role}) has empty or non-string content")
            return


def _check_record(record: dict[str, Any], fmt: str, line: int, report: Report) -> None:
    if fmt == "chat":
        _check_chat(record, line, report)
    elif fmt in ("prompt_completion", "prompts"):
        for key in ("prompt", "completion") if fmt == "prompt_completion" else ("prompt",):
            if not isinstance(record[key], str) or not record[key].strip():
                report.add(line, "empty_content", f"'{key}' must be a non-empty string")
    elif fmt == "preference":
        for key in ("chosen", "rejected"):
            if not record[key]:
                report.add(line, "empty_content", f"'{key}' is empty")
    elif fmt == "rankings":
        responses, ranking = record["responses"], record["ranking"]
        if not isinstance(responses, list) or len(responses) < 2:
            report.add(line, "too_few_responses", "'responses' needs at least 2 answers to rank")
        elif not isinstance(ranking, list) or sorted(ranking) != list(range(len(responses))):
            report.add(line, "invalid_ranking", "'ranking' must be a permutation of the response indices")


def validate_jsonl(fh: IO[bytes]) -> Report:
    report = Report()
    line_no = 0
    while True:
        raw = fh.readline(MAX_LINE_BYTES + 1)
        if not raw:
            break
        line_no += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            report.add(line_no, "too_long", f"line is longer than {MAX_LINE_BYTES} bytes")
            while raw and not raw.endswith(b"\n"):  # skip the rest of the line, in bounded reads
                raw = fh.readline(MAX_LINE_BYTES)
            continue
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            report.add(line_no, "not_utf8", "line is not valid UTF-8")
            continue
        try:
            record = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            report.add(line_no, "not_json", "line is not valid JSON")
            continue
        if not isinstance(record, dict):
            report.add(line_no, "not_object", "line is JSON but not an object")
            continue
        fmt = detect_format(record)
        if fmt is None:
            report.add(
                line_no,
                "unknown_format",
                "expected 'messages', 'prompt'/'completion', 'chosen'/'rejected' or 'responses'/'ranking'",
            )
            continue
        if report.data_format is None:
            report.data_format = fmt
        elif fmt != report.data_format:
            report.add(
                line_no, "mixed_formats", f"record is {fmt}, but the file started as {report.data_format}"
            )
            continue
        report.n_examples += 1
        _check_record(record, fmt, line_no, report)
    return report
