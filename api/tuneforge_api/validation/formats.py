"""The file's format, decided from the kinds of all its lines.

Most lines fit one format, but a line of messages without an answer could be an RLHF prompt
or a broken chat example, so the decision waits for the end of the file. The family with the
most lines wins (supervised, then preference, then prompts on a tie); the lines that do not
fit it become problems. Only the first 100 line numbers of each kind are kept, so memory stays
bounded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tuneforge_api.validation import rules
from tuneforge_api.validation.report import MAX_PROBLEMS, Problem

# Formats, as stored on the file and checked against a job's method.
CHAT = "chat"
PROMPT_COMPLETION = "prompt_completion"
PREFERENCE = "preference"
RANKINGS = "rankings"
PROMPTS = "prompts"

_NEEDS_PAIR = ("missing_field", "needs 'chosen' and 'rejected' (or 'responses' and 'ranking') like the rest")
_MIXED = ("mixed_formats", "this line is {kind}, but the file holds {fmt} examples")
# (format, kind) -> the problem of a line of that kind in a file of that format.
_MISFITS: dict[str, dict[str, tuple[str, str]]] = {
    CHAT: {
        rules.PROMPT_MESSAGES: ("missing_assistant_message", "no assistant message to learn from"),
        rules.PROMPT_TEXT: _MIXED,
        rules.PROMPT_COMPLETION: _MIXED,
        rules.PAIR: _MIXED,
        rules.RANKING: _MIXED,
    },
    PROMPT_COMPLETION: {
        rules.CHAT: _MIXED,
        rules.CHAT_OR_PROMPT: _MIXED,
        rules.PROMPT_MESSAGES: _MIXED,
        rules.PROMPT_TEXT: ("missing_field", "needs 'completion' like the rest of the file"),
        rules.PAIR: _MIXED,
        rules.RANKING: _MIXED,
    },
    PROMPTS: {
        rules.CHAT: ("mixed_formats", "ends with an assistant turn; an RLHF prompt must not"),
        rules.PROMPT_COMPLETION: _MIXED,
        rules.PAIR: _MIXED,
        rules.RANKING: _MIXED,
    },
    PREFERENCE: {
        kind: _NEEDS_PAIR
        for kind in (
            rules.CHAT,
            rules.CHAT_OR_PROMPT,
            rules.PROMPT_MESSAGES,
            rules.PROMPT_TEXT,
            rules.PROMPT_COMPLETION,
        )
    },
}
_MISFITS[RANKINGS] = _MISFITS[PREFERENCE]

_KIND_NAMES = {
    rules.CHAT: "a chat example",
    rules.CHAT_OR_PROMPT: "a chat example",
    rules.PROMPT_MESSAGES: "a prompt",
    rules.PROMPT_TEXT: "a prompt",
    rules.PROMPT_COMPLETION: "a prompt/completion pair",
    rules.PAIR: "a preference pair",
    rules.RANKING: "a ranking",
}


@dataclass
class KindTally:
    counts: dict[str, int] = field(default_factory=dict)
    first_lines: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    keep: int = MAX_PROBLEMS  # line numbers kept per kind (unbounded only for tests and benchmarks)

    def wants(self, kind: str) -> bool:
        return len(self.first_lines.get(kind, ())) < self.keep

    def add(self, kind: str, line: int, excerpt: str | None = None) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        kept = self.first_lines.setdefault(kind, [])
        if len(kept) < self.keep:
            kept.append((line, excerpt or ""))

    def add_many(self, kind: str, lines: list[tuple[int, str]], count: int) -> None:
        """``count`` lines of ``kind``, of which ``lines`` are the first ones."""
        self.counts[kind] = self.counts.get(kind, 0) + count
        kept = self.first_lines.setdefault(kind, [])
        kept.extend(lines[: self.keep - len(kept)])

    def decide(self) -> str | None:
        c = self.counts.get
        supervised = c(rules.CHAT, 0) + c(rules.PROMPT_COMPLETION, 0)
        preference = c(rules.PAIR, 0) + c(rules.RANKING, 0)
        prompts = c(rules.PROMPT_MESSAGES, 0) + c(rules.PROMPT_TEXT, 0)
        if not (supervised or preference or prompts):
            return CHAT if c(rules.CHAT_OR_PROMPT, 0) else None
        best = max(supervised, preference, prompts)
        if supervised == best:
            chat = c(rules.CHAT, 0) + c(rules.CHAT_OR_PROMPT, 0)
            return CHAT if chat >= c(rules.PROMPT_COMPLETION, 0) else PROMPT_COMPLETION
        if preference == best:
            return RANKINGS if c(rules.RANKING, 0) else PREFERENCE
        return PROMPTS

    def misfits(self, fmt: str) -> list[tuple[str, int, list[Problem]]]:
        """The lines that do not fit ``fmt``: per kind, the code, the count and the first lines."""
        out = []
        for kind, (code, message) in _MISFITS.get(fmt, {}).items():
            if self.counts.get(kind):
                text = message.format(kind=_KIND_NAMES[kind], fmt=fmt)
                lines = [Problem(line, code, text, ex) for line, ex in self.first_lines.get(kind, [])]
                out.append((code, self.counts[kind], lines))
        return out
