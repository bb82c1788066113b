"""One pass over a JSONL file, in blocks of whole lines, with bounded memory:

- a line longer than ``max_line_bytes`` is never held whole: it is reported and skipped;
- blocks are ~1 MiB; a block goes through ``fast`` (the C scanner, then msgspec), and the lines
  it cannot prove valid through ``rules``; ``fast`` can run on worker processes (``parallel``),
  and then only its per-line facts come back, so everything below happens here, in line order;
- duplicates are found with a set of 8-byte line hashes, capped at ``dedupe_cap`` examples
  (~80 MB for the default 1,000,000): beyond the cap a repeat of a remembered example is still
  found, but new examples are no longer remembered;
- the format is decided at the end (``formats``), and problems are sorted by line.
"""

from __future__ import annotations

import json
import os
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
    # None: ``parallel.auto_workers()`` (none where the C scanner is built); 0 or 1: none.
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


def iter_blocks(fh: IO[bytes], limits: Limits) -> Iterator[tuple[bytes, bool]]:
    """(block of whole lines, False), or (a too-long line's first bytes, True).

    A too-long line is skipped in bounded reads. Where blocks start depends only on the bytes
    (each holds the lines that end in one ``block_bytes`` read), never on who reads them.
    """
    rest = b""
    while True:
        chunk = fh.read(limits.block_bytes)
        if not chunk:
            break
        cut = chunk.rfind(b"\n") + 1
        if cut:
            # One copy: the carried-over start of a line plus this chunk's whole lines.
            block = rest + memoryview(chunk)[:cut] if rest else chunk[:cut] if cut < len(chunk) else chunk
            rest = chunk[cut:]
            yield block, False
        else:
            rest += chunk
        if len(rest) > limits.max_line_bytes:
            yield rest[:200], True
            rest = _skip_line(fh, limits.block_bytes)
    if rest:
        yield rest, False  # the last line, without a newline


def iter_spans(fd: int, start: int, end: int, limits: Limits) -> Iterator[tuple[tuple[int, int], bool]]:
    """``iter_blocks`` of bytes ``start:end`` of the open file ``fd``, as byte ranges: the same
    blocks, found by reading only the tail of each ``block_bytes`` read (back to its last
    newline), so that worker processes can read the blocks themselves."""
    size, rest, pos = limits.block_bytes, start, start
    while pos < end:
        stop = min(pos + size, end)
        cut = _last_newline(fd, pos, stop)
        if cut >= 0:
            yield (rest, cut + 1), False
            rest = cut + 1
        pos = stop
        if pos - rest > limits.max_line_bytes:
            yield (rest, min(rest + 200, pos)), True
            newline = -1
            while newline < 0 and pos < end:
                stop = min(pos + size, end)
                found = parallel.read_span(fd, pos, stop).find(b"\n")
                newline = pos + found if found >= 0 else -1
                pos = stop
            rest = newline + 1 if newline >= 0 else end
    if rest < end:
        yield (rest, end), False  # the last line, without a newline


def _last_newline(fd: int, start: int, stop: int, step: int = 1 << 16) -> int:
    """The offset of the last newline in bytes ``start:stop`` of ``fd``, or -1."""
    while stop > start:
        piece_start = max(start, stop - step)
        found = parallel.read_span(fd, piece_start, stop).rfind(b"\n")
        if found >= 0:
            return piece_start + found
        stop = piece_start
    return -1


def _skip_line(fh: IO[bytes], size: int) -> bytes:
    """Read past the end of the current line; return what follows it in the last read."""
    while chunk := fh.read(size):
        nl = chunk.find(b"\n")
        if nl >= 0:
            return chunk[nl + 1 :]
    return b""


class _Block:
    """A block (its bytes, or its byte range in an open file, read only when asked) and its
    lines, split only when someone asks: rare lines (problems, duplicates, the first excerpts of
    a format), or a block that the fast path did not classify."""

    __slots__ = ("_data", "_fd", "_span", "_lines")

    def __init__(self, payload: bytes | tuple[int, int], fd: int | None = None) -> None:
        self._data = payload if isinstance(payload, bytes) else None
        self._span = payload if isinstance(payload, tuple) else None
        self._fd = fd
        self._lines: list[bytes] | None = None

    def data(self) -> bytes:
        if self._data is None:
            assert self._fd is not None and self._span is not None
            self._data = parallel.read_span(self._fd, *self._span)
        return self._data

    def lines(self) -> list[bytes]:
        if self._lines is None:
            self._lines = fast.split_lines(self.data())
        return self._lines

    def excerpt(self, i: int) -> str:
        """Line ``i``'s excerpt, as a format's first lines show it."""
        return excerpt(self.lines()[i].strip()[:400])


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
    trained_stride: int = 1  # trained sizes are measured on lines whose key % stride == 0
    workers: int = 0  # processes for the fast path; 0 or 1: this one (see validate_jsonl)
    fast_lines: int = 0  # lines the fast path proved valid (the rest went through the rules)

    def __post_init__(self) -> None:
        if self.limits.keep_all_problem_lines:
            self.report.problem_lines = set()
            self.kinds.keep = 1 << 62

    def feed(self, fh: IO[bytes]) -> Report:
        fast_path = self.use_fast_path and fast.AVAILABLE
        strides = (self.trained_stride, self._sample_stride())
        fd = None
        blocks: Iterator[tuple[bytes | tuple[int, int], bool, fast.BlockFacts | None]]
        if fast_path and self.workers > 1:
            # Worker processes run the fast path a few blocks ahead; the rest stays here, in order.
            path = parallel.local_file(fh)
            if path is not None:  # the workers read their blocks from the file themselves
                fd = fh.fileno()
                stat = os.fstat(fd)
                spans = iter_spans(fd, fh.tell(), stat.st_size, self.limits)
                source = (path, stat.st_dev, stat.st_ino)
                blocks = parallel.classified(spans, self.workers, *strides, source=source)
            else:
                blocks = parallel.classified(iter_blocks(fh, self.limits), self.workers, *strides)
        else:
            blocks = ((block, too_long, None) for block, too_long in iter_blocks(fh, self.limits))
        line_no = 1
        for payload, too_long, facts in blocks:
            block = _Block(payload, fd)
            if too_long:
                self.report.n_lines = line_no
                self.report.n_examples += 1
                limit = self.limits.max_line_bytes
                self.report.add(line_no, "too_long", f"line is longer than {limit} bytes", block.data())
                line_no += 1
                continue
            if fast_path:
                if facts is None:
                    facts = fast.classify(block.data(), *strides)
                self._fast_block(line_no, block, facts)
                line_no += facts.n
            else:
                for line in block.lines():
                    self._line(line_no, line)
                    line_no += 1
            self.report.n_lines = line_no - 1
        return self.finish()

    def _sample_stride(self) -> int:
        return self.sample.stride if self.sample is not None else 0

    def _fast_block(self, first: int, block: _Block, facts: fast.BlockFacts) -> None:
        """Runs of lines the fast path proved valid are accounted in bulk (set and list
        operations in C); the other lines go through the rules, in line order."""
        bad = sorted(facts.odd)
        limit = self.limits.max_line_bytes
        if facts.longest > limit:
            long_lines = {i for i, line in enumerate(block.lines()) if len(line) > limit}
            bad = sorted(set(bad) | long_lines)
        start = 0
        for stop in [*bad, facts.n]:
            if stop > start:
                self._run(first, start, stop, block, facts)
            if stop < facts.n:
                self._line(first + stop, facts.odd[stop] if stop in facts.odd else block.lines()[stop])
            start = stop + 1

    def _run(self, first: int, start: int, stop: int, block: _Block, facts: fast.BlockFacts) -> None:
        """Lines ``start:stop`` of the block that starts at line ``first``, all proved valid by
        the fast path; a duplicate among them sends the run line by line."""
        keys = set(facts.keys[start:stop])
        if len(keys) != stop - start or not self.seen.isdisjoint(keys):
            return self._mixed_run(first, start, stop, block, facts)
        self._remember(keys, facts.keys[start:stop])
        self.fast_lines += stop - start
        self.report.n_examples += stop - start
        sizes = facts.sizes[start:stop]
        whole = start == 0 and stop == facts.n
        measured = facts.trained if whole else {i: v for i, v in facts.trained.items() if start <= i < stop}
        self.profile.add_many(
            sizes,
            trained=sum(measured.values()),
            trained_of=sum(facts.sizes[i] for i in measured),
        )
        kinds = facts.kinds[start:stop]
        n_chat = kinds.count(rules.CHAT)
        for kind, count in ((rules.CHAT, n_chat), (rules.CHAT_OR_PROMPT, len(kinds) - n_chat)):
            firsts = []
            if count and self.kinds.wants(kind):
                hits = [i for i, k in enumerate(kinds, start) if k == kind][: self.kinds.keep]
                shown = max(0, MAX_PROBLEMS - len(self.kinds.first_lines.get(kind, ())))
                firsts = [(first + i, block.excerpt(i) if j < shown else "") for j, i in enumerate(hits)]
            self.kinds.add_many(kind, firsts, count)
        if self.sample is not None:
            for i, texts in facts.texts.items():
                if start <= i < stop:
                    self.sample.add(*texts, facts.sizes[i])

    def _mixed_run(self, first: int, start: int, stop: int, block: _Block, facts: fast.BlockFacts) -> None:
        """Line by line, in order: the fast result where there is one, the rules elsewhere."""
        cap = self.limits.dedupe_cap
        for i in range(start, stop):
            kind, key, line_no = facts.kinds[i], facts.keys[i], first + i
            if kind is None or key in self.seen:
                self._line(line_no, block.lines()[i])  # the rules name the problem or duplicate
                continue
            if len(self.seen) < cap:
                self.seen.add(key)
            self.fast_lines += 1
            self.report.n_examples += 1
            size = facts.sizes[i]
            if i in facts.trained:
                self.profile.add(size, facts.trained[i], size)
            else:
                self.profile.add(size)
            self.kinds.add(kind, line_no, block.excerpt(i) if self._shows_excerpt(kind) else "")
            if self.sample is not None and i in facts.texts:
                self.sample.add(*facts.texts[i], size)

    def _shows_excerpt(self, kind: str) -> bool:
        """Only the first lines of a kind can become problems that show an excerpt."""
        return len(self.kinds.first_lines.get(kind, ())) < MAX_PROBLEMS

    def _remember(self, keys: set[int], in_order: list[int]) -> None:
        """Remember a run's keys; near the cap, the first lines' ones, as line by line would."""
        room = self.limits.dedupe_cap - len(self.seen)
        if len(keys) <= room:
            self.seen |= keys
        elif room > 0:
            self.seen.update(in_order[:room])

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
        key = fast.line_key(stripped)
        if key in self.seen:
            self.report.add(line_no, "duplicate_example", "the same example as an earlier line", stripped)
            return
        if len(self.seen) < self.limits.dedupe_cap:
            self.seen.add(key)
        self.kinds.add(kind, line_no, excerpt(stripped[:400]) if self._shows_excerpt(kind) else "")
        size = len(stripped)
        if key % self.trained_stride == 0:
            self.profile.add(size, measure.sizes()[1], size)
        else:
            self.profile.add(size)
        if self.sample is not None and self.sample.wants(key):
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
    (answer) sizes measured on a sample of lines (chosen by line key), and the total scaled from it; and a
    file of at least ``limits.parallel_min_bytes`` may run the fast path on worker processes.
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
