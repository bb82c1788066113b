"""Control-plane benchmark (not a test): prints numbers, and with --write records them.

1. Job-create latency, p50 and p99, with 32 concurrent clients, against the API alone
   (no worker, so no trainer competes for the CPU).
2. The rate of a bare endpoint (/healthz) on the same server: the ceiling for this stack.
3. Submit-to-start: from create_job returning to the trainer process existing, with the
   whole service (`tuneforge up`) and an idle queue.

Targets (issue 2): create p99 < 50 ms, submit-to-start < 2 s.
Usage: python bench/control_plane.py [--seconds 10] [--starts 5] [--write]
Needs wrk (apt-get install wrk) as the load generator.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.conftest import ADMIN_KEY, free_port  # noqa: E402
from tests.e2e.conftest import start_service, stop_service, trainer_pids  # noqa: E402

KEY = "tf-bench-" + uuid.uuid4().hex
DATA = ROOT / "examples" / "demo_chat.jsonl"
CONCURRENCY = 32


def redis_url() -> str:
    from tuneforge_scheduler.embedded_redis import EmbeddedRedis, redis_answers

    if redis_answers("127.0.0.1", 6379):
        return "redis://127.0.0.1:6379/0"
    return EmbeddedRedis(Path(tempfile.mkdtemp()) / "redis").start().url


def start_api(
    home: Path, redis: str, database_url: str | None, workers: int
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "TUNEFORGE_HOME": str(home),
        "TUNEFORGE_API_KEY": KEY,
        "TUNEFORGE_REDIS_URL": redis,
        "TUNEFORGE_QUEUE_NAME": f"tf-bench:{uuid.uuid4().hex}",
        # A load test of one project: its rate limit and job quota would only measure 429s.
        "TUNEFORGE_RATE_LIMIT_PER_S": "0",
        "TUNEFORGE_MAX_ACTIVE_JOBS": "0",
    }
    if database_url:
        env["TUNEFORGE_DATABASE_URL"] = database_url
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "tuneforge_api.app:create_app",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
        "--workers",
        str(workers),
    ]
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError("API did not start")


def wrk(url: str, seconds: int, script: Path | None = None) -> dict[str, float]:
    """Closed-loop load with wrk: CONCURRENCY connections, each sending its next request
    when the last returns. A Python load generator saturates before this server does."""
    if shutil.which("wrk") is None:
        sys.exit("bench needs wrk (Debian/Ubuntu: apt-get install wrk)")
    cmd = ["wrk", "-t2", f"-c{CONCURRENCY}", f"-d{seconds}s", "--latency", url]
    if script:
        cmd[1:1] = ["-s", str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"errors under load:\n{out}")

    def ms(label: str) -> float:
        value = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert value, out
        return float(value[1]) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[value[2]]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    return {"p50_ms": ms("50%"), "p99_ms": ms("99%"), "rps": rps}


def bench_api(seconds: int, database_url: str | None = None, workers: int = 1) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="tf-bench-"))
    proc, url = start_api(home, redis_url(), database_url, workers)
    try:
        with open(DATA, "rb") as fh:
            r = httpx.post(
                url + "/v1/files",
                files={"file": ("d.jsonl", fh)},
                data={"purpose": "fine-tune"},
                headers={"Authorization": f"Bearer {KEY}"},
            )
        body = json.dumps({"model": "tuneforge/tiny-llama", "training_file": r.json()["id"]})
        script = home / "create.lua"
        script.write_text(
            f"wrk.method = 'POST'\nwrk.body = '{body}'\n"
            f"wrk.headers['Content-Type'] = 'application/json'\n"
            f"wrk.headers['Authorization'] = 'Bearer {KEY}'\n"
        )
        wrk(url + "/v1/fine_tuning/jobs", 2, script)  # warm-up
        create = wrk(url + "/v1/fine_tuning/jobs", seconds, script)
        health = wrk(url + "/healthz", seconds)
        return {
            "create_p50_ms": create["p50_ms"],
            "create_p99_ms": create["p99_ms"],
            "create_rps": create["rps"],
            "healthz_rps": health["rps"],
        }
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)


def bench_submit_to_start(starts: int) -> list[float]:
    from tuneforge import Client

    home = Path(tempfile.mkdtemp(prefix="tf-bench-up-"))
    svc = start_service(home, redis_url(), home / "models", f"tf-bench:{uuid.uuid4().hex}")
    try:
        client = Client(base_url=svc.url, api_key=ADMIN_KEY)  # start_service sets this key
        file_id = client.files.upload(DATA).id
        delays = []
        for _ in range(starts):
            job = client.create_job(model="tuneforge/tiny-llama", training_file=file_id)
            t0 = time.perf_counter()
            while not trainer_pids(job.id, python_only=True):
                time.sleep(0.002)
            delays.append(time.perf_counter() - t0)
            client.jobs.cancel(job.id)
            client.jobs.wait(job.id, timeout=30, poll_interval=0.1)
        return delays
    finally:
        stop_service(svc)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10, help="length of each load run")
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument(
        "--database-url", help="e.g. postgresql+asyncpg://postgres@127.0.0.1/bench (default: SQLite)"
    )
    parser.add_argument("--workers", type=int, default=1, help="API worker processes (SQLite: keep 1)")
    parser.add_argument("--write", action="store_true", help="append the results to bench/RESULTS.md")
    args = parser.parse_args()

    print(
        f"create latency: {args.seconds} s of creates from {CONCURRENCY} concurrent clients ...", flush=True
    )
    api = bench_api(args.seconds, args.database_url, args.workers)
    print(f"submit-to-start: {args.starts} jobs on an idle queue ...", flush=True)
    starts = bench_submit_to_start(args.starts)
    machine = f"{platform.node()} ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    rows = [
        ("job create p50", f"{api['create_p50_ms']:.1f} ms", ""),
        ("job create p99", f"{api['create_p99_ms']:.1f} ms", "< 50 ms"),
        ("job create throughput", f"{api['create_rps']:.0f} req/s", ""),
        ("bare endpoint (/healthz) ceiling", f"{api['healthz_rps']:.0f} req/s", ""),
        ("submit-to-start median", f"{statistics.median(starts):.2f} s", "< 2 s"),
        ("submit-to-start max", f"{max(starts):.2f} s", "< 2 s"),
    ]
    table = "| metric | value | target |\n|---|---|---|\n" + "\n".join(
        f"| {a} | {b} | {c} |" for a, b, c in rows
    )
    print(table)
    if args.write:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        section = (
            f"\n## Control plane ({stamp})\n\nMachine: {machine}, Python {platform.python_version()}, "
            f"{'PostgreSQL' if args.database_url else 'SQLite'}, {args.workers} API worker(s), local Redis. "
            f"`python bench/control_plane.py --seconds {args.seconds} --workers {args.workers} "
            f"--starts {args.starts}`\n\n{table}\n"
        )
        with open(ROOT / "bench" / "RESULTS.md", "a") as fh:
            fh.write(section)
        print("appended to bench/RESULTS.md")


if __name__ == "__main__":
    main()
