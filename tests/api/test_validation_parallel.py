"""The fast path on worker processes (``validation.parallel``) gives the very report of the
single-process pass: the same problems, codes, line numbers, counts, sizes and token sample."""

from __future__ import annotations

import io
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.api.test_validation import chat, j, make_tokenizer, random_file
from tuneforge_api.validation import Limits, fast, validate_jsonl
from tuneforge_api.validation import parallel as par
from tuneforge_api.validation.scan import iter_blocks, iter_spans
from tuneforge_api.validation.tokens import TokenSample, load

SMALL_BLOCKS = {"block_bytes": 4096, "keep_all_problem_lines": True, "parallel_min_bytes": 0}


def both(data: bytes, sample: tuple | None = None, **limits: object):
    """(single-process report, parallel report) of ``data``."""
    reports = []
    for workers in (0, 2):
        made = TokenSample(load(sample[0]), sample[0], stride=sample[1]) if sample else None
        lim = Limits(**{**SMALL_BLOCKS, **limits, "workers": workers})
        reports.append(validate_jsonl(io.BytesIO(data), limits=lim, sample=made, size_hint=len(data)))
    return reports


def assert_same(serial, parallel) -> None:
    assert parallel.to_json() == serial.to_json()
    assert parallel.problem_lines == serial.problem_lines
    assert parallel.profile.to_json() == serial.profile.to_json()


@pytest.mark.parametrize("seed", range(4))
def test_parallel_report_equals_the_serial_one(seed: int) -> None:
    data = random_file(seed, n=1500)  # problems, duplicates across blocks, other formats
    serial, parallel = both(data)
    assert serial.n_problems > 0 and serial.n_lines > 1000
    assert_same(serial, parallel)


def test_trained_sizes_sampled_as_in_the_serial_pass() -> None:
    # A size hint over the trained-sample threshold measures a sample of lines: the same ones either way.
    data = random_file(7, n=1500)
    reports = [
        validate_jsonl(io.BytesIO(data), limits=Limits(**SMALL_BLOCKS, workers=w), size_hint=64 << 20)
        for w in (0, 2)
    ]
    assert_same(*reports)


def test_token_sample_matches(tmp_path: Path) -> None:
    ref = make_tokenizer(tmp_path / "org--words")
    data = b"".join(
        j(chat(i)) if i % 11 else b'{"messages": [{"role": "user", "content": "x"}]}\n' for i in range(1200)
    )
    serial, parallel = both(data, sample=(ref, 3))
    assert serial.stats["method"] == "calibrated"
    assert_same(serial, parallel)


def test_too_long_lines_and_bad_lines_keep_their_numbers() -> None:
    data = random_file(3, n=600)
    lines = data.split(b"\n")
    lines.insert(100, b'{"messages": "' + b"x" * 20_000 + b'"}')
    lines.insert(400, b"\xff not utf-8")
    serial, parallel = both(b"\n".join(lines), max_line_bytes=8192)
    codes = {p.code: p.line for p in serial.problems}
    assert codes.get("too_long") == 101 and "not_utf8" in codes
    assert_same(serial, parallel)


def file_reports(tmp_path: Path, data: bytes, **limits: object):
    """(single-process report, parallel report) of ``data`` read from a file: the workers read
    their blocks from it by byte range (``parallel.local_file``)."""
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    reports = []
    for workers in (0, 2):
        with open(path, "rb") as fh:
            lim = Limits(**{**SMALL_BLOCKS, **limits, "workers": workers})
            reports.append(validate_jsonl(fh, limits=lim, size_hint=len(data)))
    return reports


@pytest.mark.parametrize("seed", range(3))
def test_workers_reading_the_file_give_the_serial_report(tmp_path: Path, seed: int) -> None:
    lines = random_file(seed, n=1500).split(b"\n")
    lines.insert(700, b'{"messages": "' + b"x" * 20_000 + b'"}')  # too long: skipped in bounded reads
    serial, parallel = file_reports(tmp_path, b"\n".join(lines), max_line_bytes=8192)
    assert serial.n_problems > 0 and any(p.code == "too_long" for p in serial.problems)
    assert_same(serial, parallel)


def test_a_file_deleted_while_it_is_validated_is_still_read(tmp_path: Path) -> None:
    data = random_file(8, n=1500)
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    with open(path, "rb") as fh:
        assert par.local_file(fh) is not None
        path.unlink()  # the workers read the open file by its descriptor, not by this name
        parallel = validate_jsonl(fh, limits=Limits(**SMALL_BLOCKS, workers=2), size_hint=len(data))
    serial = validate_jsonl(io.BytesIO(data), limits=Limits(**SMALL_BLOCKS, workers=0), size_hint=len(data))
    assert_same(serial, parallel)


@pytest.mark.parametrize("seed", range(6))
def test_spans_are_the_blocks(tmp_path: Path, seed: int) -> None:
    """``iter_spans`` finds the very blocks ``iter_blocks`` reads, too-long lines included."""
    rng = random.Random(seed)
    lines = [b"x" * rng.choice([0, 1, 10, 300, 2000, 5000, 9000]) for _ in range(300)]
    data = b"\n".join(lines) + rng.choice([b"", b"\n", b"tail"])
    path = tmp_path / "lines"
    path.write_bytes(data)
    limits = Limits(block_bytes=rng.choice([1024, 4096]), max_line_bytes=rng.choice([3000, 8192]))
    blocks = list(iter_blocks(io.BytesIO(data), limits))
    with open(path, "rb") as fh:
        spans = list(iter_spans(fh.fileno(), 0, len(data), limits))
    assert [(data[a:b], too_long) for (a, b), too_long in spans] == blocks
    assert any(too_long for _, too_long in blocks)


def test_a_worker_reads_only_the_file_being_validated(tmp_path: Path) -> None:
    """A queued block may run after its descriptor was closed and its number reused: a worker
    that finds another file there refuses it, and the caller then classifies the block itself."""
    data = random_file(9, n=300)
    path, other = tmp_path / "data.jsonl", tmp_path / "other.jsonl"
    path.write_bytes(data)
    other.write_bytes(data)
    limits = Limits(block_bytes=4096)
    with open(path, "rb") as fh, open(other, "rb") as wrong:
        found = os.fstat(wrong.fileno())  # the path names `path`, the identity names `other`
        source = (par.local_file(fh), found.st_dev, found.st_ino)
        with pytest.raises(OSError, match="no longer the file"):
            par.classify_span(source, 0, 10, 1, 0)
        spans = list(iter_spans(fh.fileno(), 0, len(data), limits))
        results = list(par.classified(iter(spans), 2, 1, 0, source=source))
    assert [facts for _, _, facts in results] == [None] * len(spans)  # each block left to the caller


def test_only_regular_local_files_are_read_by_range(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"{}\n")
    with open(path, "rb") as fh:
        assert par.local_file(fh) == f"/proc/{os.getpid()}/fd/{fh.fileno()}"
    assert par.local_file(io.BytesIO(b"{}\n")) is None
    read, write = os.pipe()
    with os.fdopen(read, "rb") as pipe:
        os.close(write)
        assert par.local_file(pipe) is None


def test_blocks_in_flight_are_bounded() -> None:
    data = random_file(1, n=2000)
    read = 0

    def counted():
        nonlocal read
        for item in iter_blocks(io.BytesIO(data), Limits(block_bytes=2048)):
            read += 1
            yield item

    ahead = 2 * par.AHEAD_PER_WORKER
    for taken, item in enumerate(par.classified(counted(), 2, 1, 0), start=1):
        assert read <= taken + ahead  # never more than `ahead` blocks read but not yet handed on
        assert item[2] is not None or item[1]  # facts for every block but a too-long line
    assert read == taken > ahead


def test_a_killed_worker_does_not_change_the_report() -> None:
    data = random_file(5, n=1500)
    serial, _ = both(data)
    pool = par._get_pool(2)
    os.kill(pool.submit(os.getpid).result(), signal.SIGKILL)  # a worker dies, as under the OOM killer
    _, parallel = both(data)
    assert_same(serial, parallel)


def test_auto_workers_follow_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the C scanner, msgspec decodes every line, and a worker per CPU pays."""
    monkeypatch.setattr(par.fast, "NATIVE", False)
    monkeypatch.setattr(par, "available_cpus", lambda: 16)
    assert par.auto_workers() == par.MAX_WORKERS
    monkeypatch.setattr(par, "available_cpus", lambda: 2)
    assert par.auto_workers() == 2
    monkeypatch.setattr(par, "available_cpus", lambda: 1)
    assert par.auto_workers() == 0  # one CPU validates in the calling process


def test_auto_workers_none_with_the_c_scanner(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the C scanner the calling process's books cost what a worker's scan does, so the
    pool would only add processes; an explicit ``Limits.workers`` still gets one."""
    monkeypatch.setattr(par.fast, "NATIVE", True)
    for cpus in (1, 2, 16):
        monkeypatch.setattr(par, "available_cpus", lambda cpus=cpus: cpus)
        assert par.auto_workers() == 0


def test_concurrent_validations_survive_a_killed_worker() -> None:
    """Two validations with blocks in flight on a pool whose workers die: each drops only the pool
    its failed blocks came from, so neither shuts down the replacement the other one uses."""
    data = random_file(6, n=1500)
    limits = Limits(block_bytes=2048)
    expected = [
        None if too_long else fast.classify(b, 1, 0) for b, too_long in iter_blocks(io.BytesIO(data), limits)
    ]
    par._drop_pool(par._get_pool(2))  # a fresh pool with both of its workers started
    pool = par._get_pool(2)
    for f in [pool.submit(time.sleep, 0.3) for _ in range(2)]:
        f.result()
    workers = list(pool._processes)
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)  # blocks stay in flight until the workers die
    ahead = 2 * par.AHEAD_PER_WORKER
    in_flight = [threading.Event(), threading.Event()]
    results: list[list | BaseException] = [[], []]

    def validate(i: int) -> None:
        def blocks():
            for taken, item in enumerate(iter_blocks(io.BytesIO(data), limits), start=1):
                if taken == ahead:  # the blocks before this one are in flight
                    in_flight[i].set()
                yield item

        try:
            for block, too_long, facts in par.classified(blocks(), 2, 1, 0):
                results[i].append(facts if facts is not None or too_long else fast.classify(block, 1, 0))
        except Exception as exc:  # noqa: BLE001 - reported below, with the other validation's outcome
            results[i] = exc
            in_flight[i].set()

    threads = [threading.Thread(target=validate, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for event in in_flight:
        assert event.wait(60)
    for pid in workers:
        os.kill(pid, signal.SIGKILL)  # as under the OOM killer
    for t in threads:
        t.join(120)
    assert results[0] == expected and results[1] == expected
    assert par._get_pool(2).submit(os.getpid).result() > 0  # the pool left behind works
