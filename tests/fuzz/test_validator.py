"""hypothesis against the JSONL validator: it never raises, never hangs, keeps memory bounded,
and its fast path never disagrees with the reference rules.

Inputs are bounded (a few KB per example, a few MB for the memory cases). A hang is caught
by a watchdog (SIGALRM) set far above any real run: it fails a stuck validator instead of
letting CI wait; it is not a speed assertion.
"""

from __future__ import annotations

import io
import json
import os
import signal
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuneforge_api.validation import MAX_PROBLEMS, Limits, Report, validate_jsonl
from tuneforge_api.validation import fast as fast_path

WATCHDOG_S = 60
# 150 examples per property in CI; `make fuzz` raises TUNEFORGE_FUZZ_EXAMPLES (x15 here).
FUZZ = settings(
    max_examples=15 * int(os.environ.get("TUNEFORGE_FUZZ_EXAMPLES", "10")),
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
# The "paths agree" properties run once with the C line scanner and once without it (msgspec
# alone), on the same examples, half as many each: the same time in CI as one run.
FUZZ_EACH = settings(FUZZ, max_examples=max(1, FUZZ.max_examples // 2))
NO_SCANNER = pytest.mark.skipif(not fast_path.NATIVE, reason="the C scanner is not built")
BOTH_SCANNERS = pytest.mark.parametrize(
    "native", [pytest.param(True, id="c-scanner", marks=NO_SCANNER), pytest.param(False, id="msgspec-only")]
)


class Hang(Exception):
    pass


@contextmanager
def watchdog(seconds: int = WATCHDOG_S) -> Iterator[None]:
    def fire(*_: object) -> None:
        raise Hang(f"the validator ran past the {seconds} s watchdog: a hang")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool", "wizard", "", None, 7])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
MESSAGE = st.fixed_dictionaries(
    {"role": ROLES, "content": st.one_of(st.text(max_size=60), JSON_VALUES)},
    optional={
        "weight": st.one_of(
            st.integers(-1, 2), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=3)
        ),
        "name": st.text(max_size=10),
        "tool_calls": JSON_VALUES,
    },
)
RECORD = st.one_of(
    st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=5)}),
    st.fixed_dictionaries({"prompt": st.text(max_size=40), "completion": st.text(max_size=40)}),
    st.fixed_dictionaries(
        {
            "input": st.fixed_dictionaries({"messages": st.lists(MESSAGE, max_size=3)}),
            "preferred_output": st.lists(MESSAGE, max_size=2),
            "non_preferred_output": st.lists(MESSAGE, max_size=2),
        }
    ),
    st.dictionaries(st.text(max_size=12), JSON_VALUES, max_size=5),
    JSON_VALUES,
)
# Lines that are hostile on their own: bombs, edge numbers, broken UTF-8, constants JSON forbids.
HOSTILE_LINE = st.one_of(
    st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 5000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.integers(1, 5000).map(lambda n: b"[" * n),
    st.integers(4000, 20000).map(lambda n: b'{"messages": [{"role": "user", "content": ' + b"9" * n + b"}]}"),
    st.sampled_from(
        [b"NaN", b"Infinity", b"-Infinity", b'{"a": NaN}', b"\xef\xbb\xbf{}", b"\xff\xfe", b"\x00" * 8]
    ),
    st.binary(max_size=300),
)


def _line(record: object) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode()


FILES = st.lists(st.one_of(RECORD.map(_line), HOSTILE_LINE), max_size=12).flatmap(
    lambda lines: st.sampled_from([b"\n", b"\r\n"]).map(lambda sep: sep.join(lines))
)
LIMITS = st.builds(
    Limits,
    max_line_bytes=st.sampled_from([64, 1024, 8 * 1024 * 1024]),
    block_bytes=st.sampled_from([16, 257, 1 << 20]),
    dedupe_cap=st.sampled_from([1, 1_000_000]),
    workers=st.just(0),
)


def _validate(data: bytes, limits: Limits, fast: bool = True) -> Report:
    with watchdog():
        return validate_jsonl(io.BytesIO(data), limits=limits, use_fast_path=fast, size_hint=len(data))


def _check(report: Report, data: bytes) -> None:
    assert isinstance(report, Report)
    assert (
        len(report.problems) <= MAX_PROBLEMS <= report.n_problems or len(report.problems) == report.n_problems
    )
    assert report.ok == (report.n_problems == 0)
    lines = data.count(b"\n") + 1
    assert all(p.line is None or 1 <= p.line <= lines for p in report.problems)
    assert all(len(p.excerpt) <= 200 for p in report.problems)


@BOTH_SCANNERS
@FUZZ_EACH
@given(data=FILES, limits=LIMITS)
def test_structured_files_never_raise_and_paths_agree(
    data: bytes, limits: Limits, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fast_path, "NATIVE", native)  # what fast.classify reads
    fast = _validate(data, limits, fast=True)
    _check(fast, data)
    reference = _validate(data, limits, fast=False)
    assert [(p.line, p.code) for p in fast.problems] == [(p.line, p.code) for p in reference.problems]
    assert (fast.n_examples, fast.data_format) == (reference.n_examples, reference.data_format)


# Chat lines the fast path can prove valid, mixed with the near misses it must hand on: blank
# texts, untrained answers, tool results for no call.
TEXT = st.sampled_from(["hi", "x y", "café 東京", "   ", "\t"])
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
CHAT_MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user"]), "content": TEXT}),
    st.fixed_dictionaries(
        {"role": st.just("assistant"), "content": TEXT}, optional={"weight": st.sampled_from([0, 1])}
    ),
    st.just({"role": "assistant", "content": None, "tool_calls": [CALL]}),
    st.fixed_dictionaries(
        {"role": st.just("tool"), "tool_call_id": st.sampled_from(["c1", "zz"]), "content": TEXT}
    ),
)
CHAT_LINES = st.lists(
    st.fixed_dictionaries({"messages": st.lists(CHAT_MESSAGE, min_size=1, max_size=5)}).map(_line),
    min_size=1,
    max_size=12,
)


@st.composite
def rewrapped_chat_files(draw: st.DrawFn) -> bytes:
    """Chat lines whose line breaks moved: some lines joined by a space, some split after a
    comma, so that values and lines no longer match one to one."""
    data = bytearray(b"\n".join(draw(CHAT_LINES)) + b"\n")
    breaks = [i for i, b in enumerate(data) if b == 0x0A][:-1]
    commas = [i + 1 for i in range(len(data) - 1) if data[i : i + 2] == b", "]
    for i in draw(st.sets(st.sampled_from(breaks), max_size=3)) if breaks else ():
        data[i] = 0x20
    for i in draw(st.sets(st.sampled_from(commas), max_size=3)) if commas else ():
        data[i] = 0x0A
    return bytes(data)


@BOTH_SCANNERS
@FUZZ_EACH
@given(data=rewrapped_chat_files(), limits=LIMITS)
def test_rewrapped_chat_lines_paths_agree(
    data: bytes, limits: Limits, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fast_path, "NATIVE", native)
    fast = _validate(data, limits, fast=True)
    reference = _validate(data, limits, fast=False)
    assert [(p.line, p.code) for p in fast.problems] == [(p.line, p.code) for p in reference.problems]
    assert (fast.n_examples, fast.data_format) == (reference.n_examples, reference.data_format)


@FUZZ
@given(data=st.binary(max_size=4096), limits=LIMITS)
def test_arbitrary_bytes_never_raise(data: bytes, limits: Limits) -> None:
    _check(_validate(data, limits), data)


def _peak_bytes(data: bytes, limits: Limits) -> int:
    tracemalloc.start()
    try:
        _validate(data, limits)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


SMALL_LIMITS = Limits(max_line_bytes=64 * 1024, block_bytes=64 * 1024, workers=0)
MEMORY_BOUND = 32 * 1024 * 1024  # generous: several times the inputs below
# Inputs of many lines are smaller: tracemalloc slows every allocation down a lot.
CASES = {
    "one_long_line": lambda: b'{"messages": [{"role": "user", "content": "' + b"x" * (4 << 20) + b'"}]}\n',
    "many_short_distinct": lambda: b"".join(b'{"prompt": "%d"}\n' % i for i in range(15_000)),
    "deep_nesting": lambda: (b"[" * 60_000 + b"]" * 60_000 + b"\n") * 16,
    "huge_numbers": lambda: (b'{"prompt": ' + b"7" * 60_000 + b"}\n") * 16,
    "many_problems": lambda: b"not json\n" * 20_000,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_memory_stays_bounded(name: str) -> None:
    data = CASES[name]()
    peak = _peak_bytes(data, SMALL_LIMITS)
    print(f"{name}: {len(data)} bytes in, peak {peak / 2**20:.1f} MiB traced")
    assert peak < MEMORY_BOUND, f"{name}: peak {peak} bytes for {len(data)} bytes of input"


@settings(
    max_examples=20, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck)
)
@given(data=FILES)
def test_memory_is_bounded_for_fuzzed_files(data: bytes) -> None:
    assert _peak_bytes(data, SMALL_LIMITS) < 16 * 1024 * 1024
