"""Upload benchmark (not a test): MB/s of a ~2 GB chat JSONL uploaded through the API, to
file:// storage and to a local S3-compatible server, beside dd to the same disk in the same run,
and the API process's peak RSS growth during the upload.

The service runs as separate processes, as the chaos harness starts it (tests/chaos/cluster.py):
a redis-server and the API (uvicorn on ``create_app``, SQLite in a fresh TUNEFORGE_HOME), one
fresh API process per backend, its upload limit (``TUNEFORGE_MAX_UPLOAD_BYTES``) raised to the
file. The S3 server is moto's (the one the tests use), in its own process (not sharing the
client's GIL), reached through the usual AWS variables; it keeps objects in memory or spools
them to its TMPDIR, so its MB/s say what the API costs on top of a slow S3, not what S3 does.

The client is the SDK's ``client.files.upload``: it streams the file in 64 KiB reads (chunked
encoding) and sends an Idempotency-Key, as every SDK POST does (so the API hashes the file).
Before the measured uploads a small file is uploaded once, so that lazy imports and first-use
allocations are not counted.

Each backend runs ``--rounds`` rounds of: dd with ``conv=fdatasync`` (one sync at the end), dd
without it (page cache only), both of the file's size into the folder that holds the file://
storage, then the upload. Why dd in every round, right before its upload: on this VM the speed
of a synced write depends on the disk's recent history (a 2 GiB dd took 4.4 s, then 1.2 s and
0.9 s when repeated at once), so an upload is compared with the dd just before it, which sees
the same state (each follows a 2 GiB write that was deleted). FileStorage fsyncs each file once
before renaming it into place, so the like-for-like comparison is with fdatasync.

Measured per round: the wall time of the upload request (until its 200), MB/s (MB = 10^6
bytes), the API process's CPU seconds during it (all threads, /proc/<pid>/stat), and the time
until the file's status becomes ``processed`` (a file this large is validated in the background
after the response). Memory, per round: the API process's VmRSS just before the upload, its
VmHWM (/proc/<pid>/status) at the response minus that RSS (VmHWM is reset to the current RSS
before each upload by writing 5 to /proc/<pid>/clear_refs; where that is refused, the table says
so and VmHWM is the peak since the process started, which is why each backend gets a fresh API
process), the highest VmRSS sampled every 50 ms during the upload, and VmHWM once the file is
processed (the background validation's share). Each stored copy is deleted after its round.

Targets (issue 5): upload to file:// at least 0.8x dd (fdatasync); RSS growth at most 64 MB.
Usage: python bench/upload.py [--size-mb 2048] [--backends file,s3] [--rounds 3] [--keep-data]
       [--py-spy BIN] [--write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
RESULTS = Path(__file__).with_name("RESULTS.md")
GENERATOR_VERSION = 1
API_KEY = "tf-bench-" + "u" * 32
SAMPLE_EVERY_S = 0.05
TARGET_DD_RATIO = 0.8
TARGET_RSS_GROWTH = 64 * 1024 * 1024


# -- the data --------------------------------------------------------------------------------


def _validate_bench():
    """bench/validate.py's generator of realistic chat examples (loaded by path: bench is no package)."""
    spec = importlib.util.spec_from_file_location("bench_validate", ROOT / "bench" / "validate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_validate", module)
    spec.loader.exec_module(module)
    return module


def generate(path: Path, target_bytes: int, seed: int = 0) -> int:
    """A valid chat JSONL of at least ``target_bytes`` (bench/validate.py's examples without its
    planted errors or cut-off tail); returns its line count. Reused while size and seed match."""
    meta_path = path.with_suffix(".meta.json")
    wanted = {"version": GENERATOR_VERSION, "bytes": target_bytes, "seed": seed}
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in wanted} == wanted:
            return int(meta["lines"])
    make_example = _validate_bench().make_example
    rng = random.Random(seed)
    written = lines = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        while written < target_bytes:
            lines += 1
            data = (json.dumps(make_example(rng, lines), ensure_ascii=False) + "\n").encode()
            fh.write(data)
            written += len(data)
    os.replace(tmp, path)
    meta_path.write_text(json.dumps({**wanted, "lines": lines}))
    return lines


# -- /proc -----------------------------------------------------------------------------------


def parse_proc_status(text: str) -> dict[str, int]:
    """The ``Vm*``/``Rss*`` lines of /proc/<pid>/status, in bytes (the kernel writes kB)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            values[name.strip()] = int(parts[0]) * 1024
    return values


def proc_status(pid: int) -> dict[str, int]:
    return parse_proc_status(Path(f"/proc/{pid}/status").read_text())


def parse_cpu_ticks(stat: str) -> int:
    """utime + stime (fields 14 and 15, all threads) from /proc/<pid>/stat; the command name in
    field 2 may hold spaces and parentheses, so fields are counted after its last ')'."""
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields[0] is field 3 (state)


def cpu_seconds(pid: int) -> float:
    return parse_cpu_ticks(Path(f"/proc/{pid}/stat").read_text()) / os.sysconf("SC_CLK_TCK")


def reset_peak_rss(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (``5`` to /proc/<pid>/clear_refs, Linux 4.0+);
    False where not allowed, and VmHWM then keeps the peak since the process started."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class RssSampler:
    """Samples a process's VmRSS every ``SAMPLE_EVERY_S`` on a thread; keeps the highest."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, proc_status(self.pid).get("VmRSS", 0))
                self.samples += 1
            except OSError:
                return
            self._stop.wait(SAMPLE_EVERY_S)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- dd --------------------------------------------------------------------------------------


def dd_seconds(folder: Path, size_mb: int, *, fdatasync: bool) -> float:
    """Seconds for dd to write ``size_mb`` MiB of zeros into ``folder``; the file is removed."""
    target = folder / f"dd-{uuid.uuid4().hex[:8]}.bin"
    argv = ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={size_mb}"]
    if fdatasync:
        argv.append("conv=fdatasync")
    try:
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        return time.perf_counter() - started
    finally:
        target.unlink(missing_ok=True)


# -- the service -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """moto's S3 server in its own process, so that it does not share the client's GIL."""

    def __init__(self, tmpdir: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "TMPDIR": str(tmpdir)}  # moto spools large objects to disk
        code = (
            "import sys, time\n"
            "from moto.server import ThreadedMotoServer\n"
            "ThreadedMotoServer(ip_address='127.0.0.1', port=int(sys.argv[1]), verbose=False).start()\n"
            "while True: time.sleep(3600)\n"
        )
        with open(tmpdir / "moto.log", "ab") as log:  # werkzeug logs every request
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, str(self.port)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.3):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the moto server did not start") from None
                time.sleep(0.1)

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def create_bucket(self) -> str:
        import boto3

        name = f"tf-bench-{uuid.uuid4().hex[:8]}"
        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
        ).create_bucket(Bucket=name)
        return name

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start_service(root: Path, storage_uri: str, max_upload: int, extra_env: dict[str, str]):
    """Redis and a fresh API process, as the chaos harness starts them; returns the Cluster."""
    sys.path.insert(0, str(ROOT))
    from tests.chaos.cluster import Cluster

    env = {
        "TUNEFORGE_STORAGE_URI": storage_uri,
        "TUNEFORGE_MAX_UPLOAD_BYTES": str(max_upload),
        "TUNEFORGE_MAX_STORAGE_BYTES": "0",
        "TUNEFORGE_RATE_LIMIT_PER_S": "0",
        **extra_env,
    }
    cluster = Cluster(root, root / "models-cache", API_KEY, extra_env=env)
    try:
        cluster.start("redis")
        cluster.start("api")
    except BaseException:
        cluster.close()
        raise
    return cluster


# -- the rounds ------------------------------------------------------------------------------


@dataclass
class Run:
    """One backend: a fresh API process, then ``rounds`` of (dd with fdatasync, dd to the page
    cache, upload) back to back, so that each upload is compared with a dd on the same disk state."""

    backend: str
    bytes: int
    dd_bytes: int = 0
    upload_s: list[float] = field(default_factory=list)
    processed_s: list[float] = field(default_factory=list)
    dd_sync_s: list[float] = field(default_factory=list)
    dd_cache_s: list[float] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    api_cpu_s: list[float] = field(default_factory=list)  # the API process's, during the upload
    # Per round, in bytes: VmRSS just before the upload; VmHWM at the response and when the
    # file was processed (reset to the RSS before the upload, where the kernel allows); the
    # highest VmRSS sampled during the upload.
    rss_before: list[int] = field(default_factory=list)
    hwm_upload: list[int] = field(default_factory=list)
    hwm_processed: list[int] = field(default_factory=list)
    sampled_peak: list[int] = field(default_factory=list)
    samples: int = 0
    hwm_reset: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        """Per round: the upload's MB/s over the MB/s of the dd (fdatasync) just before it."""
        return [
            (self.bytes / up) / (self.dd_bytes / dd)
            for up, dd in zip(self.upload_s, self.dd_sync_s, strict=True)
        ]

    @property
    def rss_growth(self) -> int:
        """As issue 5 defines it: VmHWM at the response minus VmRSS just before the upload (the
        worst round)."""
        return max(h - r for h, r in zip(self.hwm_upload, self.rss_before, strict=True))

    @property
    def sampled_growth(self) -> int:
        return max(p - r for p, r in zip(self.sampled_peak, self.rss_before, strict=True))

    @property
    def processed_growth(self) -> int:
        """The same through the background validation that follows the response."""
        return max(h - r for h, r in zip(self.hwm_processed, self.rss_before, strict=True))


def py_spy(binary: str | None, pid: int, backend: str) -> subprocess.Popen[bytes] | None:
    """With ``--py-spy``, record the API process (all threads, idle ones too) as collapsed stacks."""
    if not binary:
        return None
    out = OUT / f"upload-profile-{backend}.txt"
    argv = [binary, "record", "-p", str(pid), "-r", "200", "-f", "raw", "-o", str(out), "--idle"]
    return subprocess.Popen([*argv, "--threads", "--nonblocking"], stdout=subprocess.DEVNULL)


def measure_rounds(
    url: str,
    pid: int,
    data: Path,
    run: Run,
    work: Path,
    warmup: Path,
    rounds: int,
    profiler: str | None = None,
) -> None:
    from tuneforge import Client

    dd_mb = run.dd_bytes // 2**20
    with Client(url, API_KEY, timeout=900, max_retries=0) as client:
        small = client.files.upload(warmup)  # lazy imports and first-use buffers happen here
        client.files.delete(small.id)
        for _ in range(rounds):
            run.dd_sync_s.append(dd_seconds(work, dd_mb, fdatasync=True))
            run.dd_cache_s.append(dd_seconds(work, dd_mb, fdatasync=False))
            spy = py_spy(profiler, pid, run.backend)
            run.hwm_reset = reset_peak_rss(pid) and run.hwm_reset
            run.rss_before.append(proc_status(pid)["VmRSS"])
            cpu_before = cpu_seconds(pid)
            with RssSampler(pid) as sampler:
                started = time.perf_counter()
                uploaded = client.files.upload(data)
                run.upload_s.append(time.perf_counter() - started)
                run.hwm_upload.append(proc_status(pid)["VmHWM"])
            run.api_cpu_s.append(cpu_seconds(pid) - cpu_before)
            run.sampled_peak.append(max(sampler.peak, run.rss_before[-1]))
            run.samples += sampler.samples
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
                spy.wait()
                profiler = None  # the first round only
                run.notes.append(f"round 1 profiled with py-spy: bench/out/upload-profile-{run.backend}.txt")
            done = client.files.wait_for_processing(uploaded.id, timeout=3600, poll_interval=0.2)
            run.processed_s.append(time.perf_counter() - started)
            run.hwm_processed.append(proc_status(pid)["VmHWM"])
            run.statuses.append(done.status)
            if done.status != "processed":
                run.notes.append(f"status {done.status}: {done.status_details}")
            client.files.delete(uploaded.id)  # the stored copy goes; the disk is shared


def bench_backend(
    backend: str,
    data: Path,
    work: Path,
    max_upload: int,
    moto: MotoServer | None,
    rounds: int,
    profiler: str | None = None,
) -> Run:
    root = work / f"{backend}-{uuid.uuid4().hex[:6]}"
    root.mkdir(parents=True)
    extra: dict[str, str] = {}
    if backend == "file":
        storage_uri = (root / "storage").resolve().as_uri()
    else:
        assert moto is not None
        storage_uri = f"s3://{moto.create_bucket()}/bench"
        extra = moto.env()
    warmup = root / "warmup.jsonl"
    with data.open("rb") as fh:
        warmup.write_bytes(b"".join(fh.readline() for _ in range(4)))
    size = data.stat().st_size
    run = Run(backend, size, dd_bytes=-(-size // 2**20) * 2**20)  # dd: the size in whole MiB
    cluster = start_service(root, storage_uri, max_upload, extra)
    try:
        measure_rounds(cluster.url, cluster.procs["api"].pid, data, run, root, warmup, rounds, profiler)
    except BaseException:
        print(cluster.log_tail("api"), file=sys.stderr)
        raise
    finally:
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)
    return run


# -- the table -------------------------------------------------------------------------------


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """The median, and the range when there is more than one value."""
    med = fmt.format(statistics.median(values))
    return med if len(values) < 2 else f"{med} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def table(runs: list[Run], load: tuple[float, float, float], lines: int) -> str:
    size = runs[0].bytes
    out = [
        f"Upload of {size / 1e6:.0f} MB ({lines} chat lines) through the SDK, {len(runs[0].upload_s)} "
        f"round(s) per backend; load average before {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
        f"on {os.cpu_count()} CPUs. Seconds, MB/s, ratios: median (min-max) of the rounds; a ratio "
        "compares an upload with the dd (fdatasync) run just before it. RSS growth: the worst round.",
        "",
        "| what | seconds | MB/s | vs dd fdatasync | API CPU s | until processed (s) | RSS before | "
        "VmHWM growth | sampled RSS growth | VmHWM growth until processed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        dd_rate = [r.dd_bytes / 1e6 / s for s in r.dd_sync_s]
        cache_rate = [r.dd_bytes / 1e6 / s for s in r.dd_cache_s]
        rate = [r.bytes / 1e6 / s for s in r.upload_s]
        statuses = ", ".join(sorted(set(r.statuses)))
        out += [
            f"| dd conv=fdatasync (before {r.backend}) | {spread(r.dd_sync_s)} | "
            f"{spread(dd_rate, '{:.0f}')} | 1.00x | | | | | | |",
            f"| dd, page cache only (before {r.backend}) | {spread(r.dd_cache_s)} | "
            f"{spread(cache_rate, '{:.0f}')} | | | | | | | |",
            f"| API -> {r.backend}:// | {spread(r.upload_s)} | {spread(rate, '{:.0f}')} | "
            f"{spread(r.ratios, '{:.2f}x')} | {spread(r.api_cpu_s)} | {spread(r.processed_s)} ({statuses}) | "
            f"{mib(min(r.rss_before))} | {mib(r.rss_growth)} | "
            f"{mib(r.sampled_growth)} ({r.samples} samples) | {mib(r.processed_growth)} |",
        ]
    out.append("")
    for r in runs:
        if r.backend == "file":
            ratio = statistics.median(r.ratios)
            out.append(
                f"Target file:// >= {TARGET_DD_RATIO}x dd fdatasync (median of rounds): "
                f"{'met' if ratio >= TARGET_DD_RATIO else 'MISSED'} ({ratio:.2f}x)."
            )
        rss_ok = r.rss_growth <= TARGET_RSS_GROWTH
        out.append(
            f"Target RSS growth <= {mib(TARGET_RSS_GROWTH)} ({r.backend}://): "
            f"{'met' if rss_ok else 'MISSED'} ({mib(r.rss_growth)})."
        )
        if not r.hwm_reset:
            r.notes.append("VmHWM could not be reset: it is the peak since the API started")
        out += [f"Note ({r.backend}://): {n}" for n in r.notes]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=2048, help="upload size in MiB (dd writes as many)")
    parser.add_argument("--backends", default="file,s3", help="comma-separated: file, s3")
    parser.add_argument("--rounds", type=int, default=3, help="dd + upload rounds per backend")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-data", action="store_true", help="keep the generated JSONL for the next run")
    parser.add_argument("--py-spy", metavar="BINARY", help="profile the API's upload with this py-spy")
    parser.add_argument("--write", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(backends) - {"file", "s3"}
    if unknown:
        parser.error(f"unknown backends: {sorted(unknown)}")

    size = args.size_mb * 2**20
    data = OUT / f"upload-{args.size_mb}mb.jsonl"
    print(f"generating {data} ...", flush=True)
    lines = generate(data, size, seed=args.seed)
    work = OUT / "upload-run"  # the same disk as the file:// storage, which lives under it
    work.mkdir(parents=True, exist_ok=True)
    max_upload = data.stat().st_size + (1 << 20)  # settings.max_upload_bytes, raised for the run
    moto = MotoServer(work) if "s3" in backends else None
    try:
        load = os.getloadavg()
        runs = []
        for backend in backends:
            print(f"{args.rounds} round(s) of dd + upload to {backend}:// ...", flush=True)
            runs.append(bench_backend(backend, data, work, max_upload, moto, args.rounds, args.py_spy))
    finally:
        if moto is not None:
            moto.close()
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep_data:
            data.unlink(missing_ok=True)
            data.with_suffix(".meta.json").unlink(missing_ok=True)
    text = table(runs, load, lines)
    print(text)
    if args.write:
        stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        header = f"\n## Upload ({stamp}, {platform.node()}, {platform.processor() or platform.machine()})\n\n"
        with open(RESULTS, "a") as fh:
            fh.write(header + text + "\n")


if __name__ == "__main__":
    main()
