"""What a validation finds: problems (the first 100, and a count of all), the file's format,
and size statistics that turn into token statistics for a given tokenizer.

An example's size is the byte length of its JSON line (the keys and quotes around the texts
stand in for a chat template's markup), so one pass over a file serves every tokenizer: tokens
are ``size × ratio``, where the ratio is 1/4 (the usual bytes-per-token rule of thumb) or is
calibrated by tokenizing a sample of examples. When every example was tokenized, the counts
are exact instead. Trained (answer) sizes are texts' bytes plus an end-of-turn allowance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_PROBLEMS = 100
EXCERPT_CHARS = 80
DEFAULT_RATIO = 0.25  # tokens per size unit when no tokenizer is available: bytes/4


def excerpt(value: Any) -> str:
    """At most 80 characters of the offending value, for a human to find it."""
    if isinstance(value, bytes | bytearray):
        text = bytes(value[: EXCERPT_CHARS * 4]).decode("utf-8", errors="replace")
    elif isinstance(value, str):
        text = value[: EXCERPT_CHARS * 2]
    else:
        import json

        try:
            text = json.dumps(value, ensure_ascii=False)[: EXCERPT_CHARS * 2]
        except (TypeError, ValueError, RecursionError):
            text = repr(value)[: EXCERPT_CHARS * 2]
    text = " ".join(text.split())  # one line, no control characters
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1] + "…"


@dataclass(frozen=True)
class Problem:
    line: int | None  # 1-based; None for a problem with the whole file
    code: str
    message: str
    excerpt: str = ""

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.message} [{self.code}]"

    def to_json(self) -> dict[str, Any]:
        return {"line": self.line, "code": self.code, "message": self.message, "excerpt": self.excerpt}


class Histogram:
    """Counts of non-negative ints in buckets ~1.6% wide (exact below 128): a few hundred
    entries whatever the file, mergeable, and good enough for a p95."""

    def __init__(self, counts: dict[int, int] | None = None) -> None:
        self.counts: dict[int, int] = counts or {}

    @staticmethod
    def bucket(value: int) -> int:
        if value < 128:
            return value
        shift = value.bit_length() - 7
        return (value >> shift) << shift

    @staticmethod
    def width(lower: int) -> int:
        return 1 if lower < 128 else 1 << (lower.bit_length() - 7)

    @classmethod
    def of(cls, values: list[int]) -> Histogram:
        hist = cls()
        for value in values:
            key = cls.bucket(value)
            hist.counts[key] = hist.counts.get(key, 0) + 1
        return hist

    def quantile(self, q: float) -> float:
        """The middle of the bucket that holds the q-quantile."""
        total = sum(self.counts.values())
        seen = 0
        for lower in sorted(self.counts):
            seen += self.counts[lower]
            if seen >= q * total:
                return lower + (self.width(lower) - 1) / 2
        return 0.0

    def fraction_above(self, limit: float) -> float:
        """The share of values above ``limit``; a bucket that straddles it counts in proportion."""
        total = sum(self.counts.values())
        n = 0.0
        for lower, count in self.counts.items():
            upper = lower + self.width(lower) - 1
            if lower > limit:
                n += count
            elif upper > limit:
                n += count * (upper - limit) / (upper - lower + 1)
        return n / total if total else 0.0

    def to_json(self) -> list[list[int]]:
        return [[k, v] for k, v in sorted(self.counts.items())]

    @classmethod
    def from_json(cls, data: list[list[int]]) -> Histogram:
        return cls({int(k): int(v) for k, v in data})


SAMPLE_CAP = 8192


@dataclass
class SizeProfile:
    """Per-example sizes of a file (see the module docstring): exact count, sum, min and max, a
    systematic sample of at most 8192 sizes (every ``stride``-th example; the stride doubles when
    the sample fills) for the p95 and the share over a length limit, and the trained (answer)
    sizes, measured on the examples whose sizes sum to ``trained_of`` (all, or a sample)."""

    n: int = 0
    total: int = 0
    trained: int = 0
    trained_of: int = 0
    smallest: int = 0
    largest: int = 0
    sample: list[int] = field(default_factory=list)
    stride: int = 1
    hist: Histogram | None = None  # set when loaded from storage instead of sampled

    def add(self, size: int, trained: int = 0, trained_of: int = 0) -> None:
        self.add_many([size], trained, trained_of)

    def add_many(self, sizes: list[int], trained: int = 0, trained_of: int = 0) -> None:
        if not sizes:
            return
        self.smallest = min(sizes) if not self.n else min(self.smallest, min(sizes))
        self.largest = max(self.largest, max(sizes))
        offset = -self.n % self.stride
        self.n += len(sizes)
        self.total += sum(sizes)
        self.trained += trained
        self.trained_of += trained_of
        self.sample.extend(sizes[offset :: self.stride])
        while len(self.sample) > SAMPLE_CAP:
            self.sample = self.sample[::2]
            self.stride *= 2

    def trained_total(self) -> float:
        return self.trained * self.total / self.trained_of if self.trained_of else 0.0

    def histogram(self) -> Histogram:
        return self.hist if self.hist is not None else Histogram.of(self.sample)

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "total": self.total,
            "trained": self.trained,
            "trained_of": self.trained_of,
            "min": self.smallest,
            "max": self.largest,
            "hist": self.histogram().to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SizeProfile:
        return cls(
            n=data["n"],
            total=data["total"],
            trained=data["trained"],
            trained_of=data["trained_of"],
            smallest=data["min"],
            largest=data["max"],
            hist=Histogram.from_json(data["hist"]),
        )

    def token_stats(self, ratio: float, max_seq_length: int) -> dict[str, Any]:
        """Token statistics for a tokenizer that makes ``ratio`` tokens per size unit."""
        hist = self.histogram()
        return {
            "tokens_per_example": {
                "min": round(self.smallest * ratio),
                "mean": round(self.total * ratio / self.n, 1) if self.n else 0.0,
                "p95": round(hist.quantile(0.95) * ratio),
                "max": round(self.largest * ratio),
            },
            "total_tokens": round(self.total * ratio),
            "trained_tokens": round(self.trained_total() * ratio),
            "max_seq_length": max_seq_length,
            "n_over_max_seq_length": round(hist.fraction_above(max_seq_length / ratio) * self.n)
            if ratio
            else 0,
        }


@dataclass
class Report:
    """The outcome of one validation. ``ok`` only with examples and no problem at all: a file
    is never partially accepted."""

    n_examples: int = 0
    n_lines: int = 0
    data_format: str | None = None
    problems: list[Problem] = field(default_factory=list)
    n_problems: int = 0
    profile: SizeProfile = field(default_factory=SizeProfile)
    stats: dict[str, Any] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)  # every problem, counted by code
    problem_lines: set[int] | None = None  # every problem's line, when asked for (tests, benchmarks)

    def wants_detail(self) -> bool:
        return len(self.problems) < MAX_PROBLEMS

    def count(self, line: int | None, code: str, n: int = 1) -> None:
        self.n_problems += n
        self.codes[code] = self.codes.get(code, 0) + n
        if self.problem_lines is not None and line is not None:
            self.problem_lines.add(line)

    def add(self, line: int | None, code: str, message: str, value: Any | Callable[[], Any] = "") -> None:
        """Count a problem; keep its details while fewer than MAX_PROBLEMS are kept."""
        self.count(line, code)
        if self.wants_detail():
            raw = value() if callable(value) else value
            self.problems.append(Problem(line, code, message, excerpt(raw) if raw != "" else ""))

    @property
    def ok(self) -> bool:
        return self.n_problems == 0 and self.n_examples > 0

    def summary(self, shown: int = 5) -> str:
        head = "; ".join(str(p) for p in self.problems[:shown])
        more = self.n_problems - min(shown, len(self.problems))
        return head + (f"; and {more} more problems" if more > 0 else "")

    def to_json(self) -> dict[str, Any]:
        """The public report, as stored with the file and returned on the file object."""
        return {
            "format": self.data_format,
            "n_examples": self.n_examples,
            "n_problems": self.n_problems,
            "problem_counts": dict(sorted(self.codes.items())),
            "problems": [p.to_json() for p in self.problems],
            "stats": self.stats,
        }
