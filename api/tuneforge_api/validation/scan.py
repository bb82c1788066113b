"""One pass over a JSONL file, in blocks of whole lines, with bounded memory:

- a line longer than ``max_line_bytes`` is never held whole: it is reported and skipped;
- blocks are ~1 MiB; a block of plain chat lines goes through ``fast``, anything else through
  ``rules`` line by line; on a large file ``fast`` runs on worker processes (``parallel``), and
  only its per-line facts come back, so everything below happens here, in line order;
- duplicates are found with a set of 8-byte line hashes, capped at ``dedupe_cap`` examples
  (~80 MB for the default 1,000,000): beyond the cap a repeat of a remembered example is still
  found, but new examples are no longer remembered;
- the format is decided at the end (``formats``), and problems are sorted by line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import accumulate
from typing import IO, Any

from tuneforge_api.validation import fast, formats, parallel, rules
from tuneforge_api.validation.report import MAX_PROBLEMS, Problem, Report, SizeProfile, excerpt
from tuneforge_api.validation.tokens import DEFAULT_MAX_SEQ_LENGTH, TokenSample, token_stats

MAX_LINE_BYTES = 8 * 1024 * 1024
MAX_DEPTH = 32
DEDUPE_CAP = 1_000_000
BLOCK_BYTES = 1 << 20
TRAINED_SAMPLE_BYTES = 16 << 20
UTF8_BOM = b"\xef\xbb\xbf"
PARALLEL_MIN_BYTES = 32 << 20  # below this, starting the worker processes costs more than it saves

_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_DEPTH_STEP = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))


@dataclass
class Limits:
    max_line_bytes: int = MAX_LINE_BYTES
    dedupe_cap: int = DEDUPE_CAP
    block_bytes: int = BLOCK_BYTES
    keep_all_problem_lines: bool = False  # every problem's line in Report.problem_lines (unbounded)
    # Worker processes for the fast path (``parallel``) on files of at least parallel_min_bytes;
    # None: one per idle CPU (at most 8; none on a busy host); 0 or 1: none.
    workers: int | None = None
    parallel_min_bytes: int = PARALLEL_MIN_BYTES


def json_depth(line: bytes) -> int:
    """How deeply a line's JSON nests, without parsing it (so without recursion)."""
    if line.count(b"[") + line.count(b"{") <= MAX_DEPTH:
        return line.count(b"[") + line.count(b"{")  # a bound, and below the limit anyway
    brackets = _STRINGS.sub(b"", line).translate(None, _NOT_BRACKETS).translate(_DEPTH_STEP)
    # Each opener is +1, each closer -1 (0xff as a signed byte); the running sum is the depth.
    return max(accumulate(b if b < 128 else b - 256 for b in brackets), default=0)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_line(line: bytes) -> Any:
    """The JSON value of a line; raises rules.Invalid with not_utf8 / too_deep / not_json."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise rules.Invalid("not_utf8", f"not valid UTF-8 (byte {exc.start + 1} of the line)", line) from None
    if json_depth(line) > MAX_DEPTH:
        raise rules.Invalid("too_deep", f"JSON nests deeper than {MAX_DEPTH} levels", line)
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise rules.Invalid("not_json", f"not valid JSON: {reason}", line) from None


def iter_blocks(fh: IO[bytes], limits: Limits) -> Iterator[tuple[int, bytes, int]]:
    """(first line number, block of whole lines, line count).

    A too-long line is yielded as ``(line, its first bytes, 0)`` and skipped in bounded reads.
    """
    line_no = 1
    rest = b""
    while True:
        chunk = fh.read(limits.block_bytes)
        if not chunk:
            break
        cut = chunk.rfind(b"\n") + 1
        if cut:
            # One copy: the carried-over start of a line plus this chunk's whole lines.
            block = rest + memoryview(chunk)[:cut] if rest else chunk[:cut]
            rest = chunk[cut:]
            n = block.count(b"\n")
            yield line_no, block, n
            line_no += n
        else:
            rest += chunk
        if len(rest) > limits.max_line_bytes:
            yield line_no, rest[:200], 0
            line_no += 1
            rest = _skip_line(fh, limits.block_bytes)
    if rest:
        yield line_no, rest, 1  # the last line, without a newline


def _skip_line(fh: IO[bytes], size: int) -> bytes:
    """Read past the end of the current line; return what follows it in the last read."""
    while chunk := fh.read(size):
        nl = chunk.find(b"\n")
        if nl >= 0:
            return chunk[nl + 1 :]
    return b""


@dataclass
class Validator:
    """The state of one pass. ``validate_jsonl`` is the usual entry point."""

    limits: Limits = field(default_factory=Limits)
    sample: TokenSample | None = None
    use_fast_path: bool = True
    report: Report = field(default_factory=Report)
    kinds: formats.KindTally = field(default_factory=formats.KindTally)
    seen: set[int] = field(default_factory=set)
    profile: SizeProfile = field(default_factory=SizeProfile)
    trained_stride: int = 1  # trained sizes are measured on every n-th line (see validate_jsonl)
    workers: int = 0  # processes for the fast path; 0 or 1: this one (see validate_jsonl)
    fast_lines: int = 0  # lines the fast path proved valid (the rest went through the rules)

    def __post_init__(self) -> None:
        if self.limits.keep_all_problem_lines:
            self.report.problem_lines = set()
            self.kinds.keep = 1 << 62

    def feed(self, fh: IO[bytes]) -> Report:
        fast_path = self.use_fast_path and fast.AVAILABLE
        blocks: Iterator[tuple[int, bytes, int, fast.BlockFacts | None]]
        if fast_path and self.workers > 1:
            # Worker processes run the fast path a few blocks ahead; the rest stays here, in order.
            blocks = parallel.classified(
                iter_blocks(fh, self.limits), self.workers, self.trained_stride, self._sample_stride()
            )
        else:
            blocks = ((first, block, n, None) for first, block, n in iter_blocks(fh, self.limits))
        for first, block, n, facts in blocks:
            self.report.n_lines = first + max(n, 1) - 1
            if n == 0:
                self.report.n_examples += 1
                limit = self.limits.max_line_bytes
                self.report.add(first, "too_long", f"line is longer than {limit} bytes", block)
                continue
            lines = block.split(b"\n", n - 1) if n > 1 else [block]
            if fast_path:
                if facts is None:
                    facts = fast.classify(block, lines, first, self.trained_stride, self._sample_stride())
                self._fast_block(first, lines, facts)
            else:
                for i, line in enumerate(lines):
                    self._line(first + i, line)
        return self.finish()

    def _sample_stride(self) -> int:
        return self.sample.stride if self.sample is not None else 0

    def _fast_block(self, first: int, lines: list[bytes], facts: fast.BlockFacts) -> None:
        """Runs of lines the fast path proved valid are accounted in bulk (set and list
        operations in C); the other lines go through the rules, in line order."""
        kinds = facts.kinds
        limit = self.limits.max_line_bytes
        bad = [i for i, k in enumerate(kinds) if k is None] if None in kinds else []
        if max(map(len, lines)) > limit:
            bad = sorted(set(bad) | {i for i, line in enumerate(lines) if len(line) > limit})
        start = 0
        for stop in [*bad, len(lines)]:
            if stop > start:
                self._run(first, start, lines[start:stop], facts)
            if stop < len(lines):
                self._line(first + stop, lines[stop])
            start = stop + 1

    def _run(self, block_first: int, offset: int, lines: list[bytes], facts: fast.BlockFacts) -> None:
        """A run of lines the fast path proved valid, from index ``offset`` of the block that
        starts at line ``block_first``; a duplicate sends the run line by line."""
        first = block_first + offset
        stripped = list(map(bytes.strip, lines))
        keys = set(map(hash, stripped))
        if len(keys) != len(lines) or not self.seen.isdisjoint(keys):
            return self._mixed_run(block_first, offset, lines, facts)
        self._remember(keys)
        self.fast_lines += len(lines)
        self.report.n_examples += len(lines)
        sizes = list(map(len, stripped))
        stride = self.trained_stride
        measured = range(-first % stride, len(lines), stride)
        self.profile.add_many(
            sizes,
            trained=sum(facts.trained[offset + i] for i in measured),
            trained_of=sum(sizes[i] for i in measured),
        )
        kinds = facts.kinds[offset : offset + len(lines)]
        n_chat = kinds.count(rules.CHAT)
        for kind, count in ((rules.CHAT, n_chat), (rules.CHAT_OR_PROMPT, len(lines) - n_chat)):
            firsts = []
            if count and self.kinds.wants(kind):
                hits = [i for i, k in enumerate(kinds) if k == kind][: self.kinds.keep]
                shown = max(0, MAX_PROBLEMS - len(self.kinds.first_lines.get(kind, ())))
                firsts = [
                    (first + i, excerpt(lines[i][:400]) if j < shown else "") for j, i in enumerate(hits)
                ]
            self.kinds.add_many(kind, firsts, count)
        if self.sample is not None:
            for i in range(len(lines)):
                if self.sample.wants(first + i):
                    self.sample.add(*facts.texts[offset + i], sizes[i])

    def _mixed_run(self, block_first: int, offset: int, lines: list[bytes], facts: fast.BlockFacts) -> None:
        """Line by line, in order: the fast result where there is one, the rules elsewhere."""
        limit, cap, stride = self.limits.max_line_bytes, self.limits.dedupe_cap, self.trained_stride
        for i, line in enumerate(lines):
            kind, line_no = facts.kinds[offset + i], block_first + offset + i
            if kind is None or len(line) > limit:
                self._line(line_no, line)
                continue
            stripped = line.strip()
            key = hash(stripped)
            if key in self.seen:
                self._line(line_no, line)  # the rules name the duplicate
                continue
            if len(self.seen) < cap:
                self.seen.add(key)
            self.fast_lines += 1
            self.report.n_examples += 1
            size = len(stripped)
            if line_no % stride == 0:
                self.profile.add(size, facts.trained[offset + i], size)
            else:
                self.profile.add(size)
            self.kinds.add(kind, line_no, self._kind_excerpt(kind, stripped))
            if self.sample is not None and self.sample.wants(line_no):
                self.sample.add(*facts.texts[offset + i], size)

    def _kind_excerpt(self, kind: str, line: bytes) -> str:
        """Only the first lines of a kind can become problems that show an excerpt."""
        return excerpt(line[:400]) if len(self.kinds.first_lines.get(kind, ())) < MAX_PROBLEMS else ""

    def _remember(self, keys: set[int]) -> None:
        room = self.limits.dedupe_cap - len(self.seen)
        if len(keys) <= room:
            self.seen |= keys
        elif room > 0:
            self.seen.update(list(keys)[:room])

    def _line(self, line_no: int, line: bytes) -> None:
        line = line.rstrip(b"\n")
        stripped = line.strip()
        if line_no == 1 and stripped.startswith(UTF8_BOM):
            stripped = stripped[len(UTF8_BOM) :].strip()  # editors add it; json.loads(bytes) skips it too
        if not stripped:
            return  # blank lines are allowed, and skipped
        self.report.n_examples += 1
        if len(line) > self.limits.max_line_bytes:  # one that fit in a block
            self.report.add(
                line_no, "too_long", f"line is longer than {self.limits.max_line_bytes} bytes", line
            )
            return
        try:
            record = parse_line(stripped)
            if not isinstance(record, dict):
                raise rules.Invalid("not_object", "each line must be a JSON object", stripped)
            kind, measure = rules.check_record(record)
        except rules.Invalid as problem:
            self.report.add(line_no, problem.code, problem.message, problem.value)
            return
        key = hash(stripped)
        if key in self.seen:
            self.report.add(line_no, "duplicate_example", "the same example as an earlier line", stripped)
            return
        if len(self.seen) < self.limits.dedupe_cap:
            self.seen.add(key)
        self.kinds.add(kind, line_no, self._kind_excerpt(kind, stripped))
        size = len(stripped)
        if line_no % self.trained_stride == 0:
            self.profile.add(size, measure.sizes()[1], size)
        else:
            self.profile.add(size)
        if self.sample is not None and self.sample.wants(line_no):
            self.sample.add(measure.texts, measure.overhead, measure.trained_overhead, size)

    def finish(self) -> Report:
        report = self.report
        report.data_format = self.kinds.decide()
        if report.data_format is not None:
            misfits = self.kinds.misfits(report.data_format)
            for code, count, problems in misfits:
                report.count(None, code, count)
                report.problems.extend(problems)
                if report.problem_lines is not None:
                    report.problem_lines.update(p.line for p in problems if p.line)
            if misfits:
                report.problems = sorted(report.problems, key=_by_line)[:MAX_PROBLEMS]
        if report.n_examples == 0 and report.n_problems == 0:
            report.add(None, "empty_file", "the file has no examples")
        report.profile = self.profile
        limit = self.sample.ref.max_seq_length if self.sample else DEFAULT_MAX_SEQ_LENGTH
        report.stats = token_stats(self.profile, self.sample, limit)
        report.stats["duplicates_checked"] = min(self.profile.n, self.limits.dedupe_cap)
        return report


def _by_line(problem: Problem) -> int:
    return problem.line or 0


def validate_jsonl(
    fh: IO[bytes],
    *,
    sample: TokenSample | None = None,
    limits: Limits | None = None,
    use_fast_path: bool = True,
    size_hint: int | None = None,
) -> Report:
    """Validate a JSONL dataset read from ``fh``; the report says everything found.

    With ``size_hint`` (the file's size), a file over ``TRAINED_SAMPLE_BYTES`` has its trained
    (answer) sizes measured on a systematic sample of lines, and the total scaled from it; and a
    file of at least ``limits.parallel_min_bytes`` runs the fast path on worker processes.
    """
    limits = limits or Limits()
    stride = max(1, (size_hint or 0) // TRAINED_SAMPLE_BYTES)
    workers = 0
    if size_hint is not None and size_hint >= limits.parallel_min_bytes:
        workers = parallel.auto_workers() if limits.workers is None else limits.workers
    validator = Validator(
        limits=limits, sample=sample, use_fast_path=use_fast_path, trained_stride=stride, workers=workers
    )
    return validator.feed(fh)
