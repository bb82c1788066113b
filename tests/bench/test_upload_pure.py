"""The pure parts of bench/upload.py: the /proc status parser, the generator and the table."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from tests.bench.loader import load_bench
from tuneforge_api.validation import Limits, validate_jsonl

bench = load_bench("upload.py", "bench_upload")

STATUS = """Name:\tpython
Umask:\t0022
State:\tS (sleeping)
Pid:\t4242
VmPeak:\t  912340 kB
VmHWM:\t   81236 kB
VmRSS:\t   70000 kB
RssAnon:\t   50000 kB
Threads:\t4
SigQ:\t0/95751
voluntary_ctxt_switches:\t12
"""


def test_proc_status_values_are_bytes_and_only_the_kb_lines() -> None:
    values = bench.parse_proc_status(STATUS)
    assert values["VmHWM"] == 81236 * 1024
    assert values["VmRSS"] == 70000 * 1024
    assert values["RssAnon"] == 50000 * 1024
    assert "Threads" not in values and "Pid" not in values and "SigQ" not in values


def test_proc_status_of_this_process_has_rss_below_its_high_water_mark() -> None:
    values = bench.proc_status(os.getpid())
    assert 0 < values["VmRSS"] <= values["VmHWM"]


def test_cpu_ticks_are_counted_after_the_command_name() -> None:
    # Field 2 is the command in parentheses, which may itself hold ") " and spaces.
    stat = "4242 (py thon) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 1234 56 0 0 20 0 5 0 100"
    assert bench.parse_cpu_ticks(stat) == 1234 + 56


def test_peak_rss_of_this_process_can_be_reset() -> None:
    block = bytearray(64 << 20)  # touched: a peak 64 MiB above what stays after it is freed
    del block
    raised = bench.proc_status(os.getpid())
    assert raised["VmHWM"] >= raised["VmRSS"] + (32 << 20)
    if not bench.reset_peak_rss(os.getpid()):
        pytest.skip("this kernel or sandbox does not allow clear_refs")
    values = bench.proc_status(os.getpid())
    assert values["VmHWM"] <= values["VmRSS"] + (8 << 20)  # back to about the current RSS


def test_generated_file_is_valid_unique_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "u.jsonl"
    lines = bench.generate(path, 200_000, seed=1)
    data = path.read_bytes()
    assert len(data) >= 200_000 and data.count(b"\n") == lines
    report = validate_jsonl(io.BytesIO(data), limits=Limits(workers=0), size_hint=len(data))
    assert report.ok, report.summary()
    before = path.stat().st_mtime_ns
    assert bench.generate(path, 200_000, seed=1) == lines  # same size and seed: not rewritten
    assert path.stat().st_mtime_ns == before
    bench.generate(path, 200_000, seed=2)
    assert path.read_bytes() != data


def test_ratio_is_per_round_against_the_dd_just_before() -> None:
    mb = 10**6
    run = bench.Run("file", 1000 * mb, dd_bytes=2000 * mb, upload_s=[1.0, 4.0], dd_sync_s=[4.0, 2.0])
    assert run.ratios == [2.0, 0.25]  # 1000 MB/s vs 500 MB/s, then 250 MB/s vs 1000 MB/s


def test_table_reports_medians_and_flags_missed_targets() -> None:
    mb = 10**6

    def run(backend: str, upload_s: list[float], hwm: int) -> object:
        return bench.Run(
            backend,
            1000 * mb,
            dd_bytes=1000 * mb,
            upload_s=upload_s,
            processed_s=[s + 1 for s in upload_s],
            dd_sync_s=[1.25] * len(upload_s),
            dd_cache_s=[0.5] * len(upload_s),
            statuses=["processed"] * len(upload_s),
            api_cpu_s=[1.0] * len(upload_s),
            rss_before=[100 << 20] * len(upload_s),
            hwm_upload=[110 << 20, hwm << 20, 100 << 20][: len(upload_s)],
            hwm_processed=[(hwm + 50) << 20] * len(upload_s),
            sampled_peak=[105 << 20] * len(upload_s),
        )

    fast, slow = run("file", [1.0, 2.0, 0.5], 120), run("s3", [10.0, 10.0, 10.0], 300)
    text = bench.table([fast, slow], (1.0, 2.0, 3.0), 42)
    assert "| API -> file:// | 1.0 (0.5-2.0) | 1000 (500-2000) | 1.25x (0.62x-2.50x) |" in text
    assert "| dd, page cache only (before file) | 0.5 (0.5-0.5) | 2000 (2000-2000) |" in text
    assert "Target file:// >= 0.8x dd fdatasync (median of rounds): met (1.25x)" in text
    assert "(file://): met (20 MiB)" in text
    assert "(s3://): MISSED (200 MiB)" in text  # the worst round counts
    assert "| 100 MiB | 20 MiB | 5 MiB (0 samples) | 70 MiB |" in text
    assert "Target s3:// >=" not in text  # the dd target is for file:// only
