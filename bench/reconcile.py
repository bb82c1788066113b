"""Reconcile-pass benchmark (not a test): one pass of the real scheduler with the kubernetes
executor, with 500 active and 10,000 finished jobs, against the FAKE Kubernetes API server
(kmock's in-memory emulator over HTTP on loopback, tests/k8s/fake_apiserver.py).

The database (SQLite) holds 500 running and 10,000 succeeded jobs; the fake API server holds
their 10,500 Jobs, the finished ones labelled tuneforge.io/recorded=true as the scheduler leaves
them. A pass reads the active rows and answers each status from the watch cache of the unrecorded
Jobs (no request); then the same passes with the watch stopped, where each pass lists the
unrecorded Jobs once (the fallback while a watch is down). With --compare-gets, also the same
pass without the per-pass list (one GET per job); the fake's GET scans all its objects, so that
comparison exaggerates what a real API server costs.

The fake runs in its own process (as an API server would), filters by label in Python over all
10,500 objects, as an API server filters its cache, and answers over loopback HTTP.

Target (issue 6): a pass under 1 s.
Usage: python bench/reconcile.py [--active 500] [--finished 10000] [--passes 5] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from sqlalchemy import select  # noqa: E402

from tests.k8s.conftest import make_spec  # noqa: E402
from tests.k8s.fake_apiserver import FakeKubernetes  # noqa: E402
from tuneforge_api.bootstrap import ensure_default_project  # noqa: E402
from tuneforge_api.db.engine import migrate  # noqa: E402
from tuneforge_api.db.tables import ProjectRow  # noqa: E402
from tuneforge_api.services import Services  # noqa: E402
from tuneforge_api.store import jobs  # noqa: E402
from tuneforge_scheduler.executors import run_name  # noqa: E402
from tuneforge_scheduler.executors.kubernetes import KubernetesExecutor  # noqa: E402
from tuneforge_scheduler.k8s.manifests import build_job  # noqa: E402
from tuneforge_scheduler.k8s.names import RECORDED  # noqa: E402
from tuneforge_scheduler.lifecycle import Scheduler  # noqa: E402
from tuneforge_scheduler.settings import KubernetesSettings, SchedulerSettings  # noqa: E402

NAMESPACE = "bench"


def job_id(i: int) -> str:
    return f"ftjob-{i:024x}"


def fill_cluster(fake: FakeKubernetes, settings: KubernetesSettings, active: int, finished: int) -> None:
    objects = []
    for i in range(active + finished):
        name = run_name(job_id(i), 1)
        job = build_job(make_spec(job_id=job_id(i)), settings, name=name, namespace=NAMESPACE)
        job["metadata"]["uid"] = f"uid-{i}"
        if i < active:
            job["status"] = {"active": 1, "ready": 1}
        else:
            job["metadata"]["labels"][RECORDED] = "true"
            job["spec"]["ttlSecondsAfterFinished"] = 3600
            job["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
        objects.append((name, job))

    def store(emu) -> None:  # type: ignore[no-untyped-def]
        import kmock

        resource = kmock.resource("batch/v1/jobs")
        for rv, (name, job) in enumerate(objects, start=1):
            job["metadata"]["resourceVersion"] = str(rv)
            emu.objects[resource, NAMESPACE, name] = job
        emu.last_rv = len(objects)

    fake.run(store)


async def fill_database(services: Services, active: int, finished: int) -> None:
    await migrate(services.engine)
    await ensure_default_project(services)
    async with services.sessions() as session:
        project = await session.scalar(select(ProjectRow.id))
        now = int(time.time())
        rows = []
        for i in range(active + finished):
            rows.append(
                dict(
                    id=job_id(i),
                    project_id=project,
                    created_at=now,
                    updated_at=now,
                    finished_at=None if i < active else now,
                    model="tuneforge/tiny-llama",
                    status="running" if i < active else "succeeded",
                    training_file="file-x",
                    validation_file=None,
                    method={"type": "supervised"},
                    lora={},
                    quantization=None,
                    resources={"gpus": 1, "nodes": 1},
                    seed=1,
                    suffix=None,
                    metadata_=None,
                    attempt=1,
                    max_attempts=3,
                    cancel_requested=False,
                    init_adapter_key=None,
                )
            )
        for start in range(0, len(rows), 1000):
            for values in rows[start : start + 1000]:
                await jobs.insert(session, values)
        await session.commit()


def api_client_for(url: str):  # type: ignore[no-untyped-def]
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = url
    return client.ApiClient(configuration)


async def measure(scheduler: Scheduler, passes: int) -> tuple[list[float], int, float]:
    """Pass times, the Kubernetes API requests per pass (counted in the client), and the
    scheduler process's CPU seconds per pass (less sensitive than wall time to a busy machine)."""
    api_client = scheduler.executor.api_client
    sent = 0
    request = api_client.request

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal sent
        sent += 1
        return request(*args, **kwargs)

    await scheduler.reconcile()  # warm up (connection pool, statement cache)
    api_client.request = counting
    times = []
    cpu_started = time.process_time()
    for _ in range(passes):
        started = time.perf_counter()
        await scheduler.reconcile()
        times.append(time.perf_counter() - started)
    cpu = (time.process_time() - cpu_started) / passes
    api_client.request = request
    return times, sent // passes, cpu


def serve_fake(active: int, finished: int, urls: multiprocessing.Queue, stop: multiprocessing.Event) -> None:
    """The fake API server's own process: fill it, publish its URL, serve until told to stop."""
    fake = FakeKubernetes().start()
    fill_cluster(fake, KubernetesSettings(namespace=NAMESPACE), active, finished)
    urls.put(fake.url)
    stop.wait()
    fake.stop()


async def run(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    urls: multiprocessing.Queue = multiprocessing.Queue()
    stop = multiprocessing.Event()
    server = multiprocessing.Process(target=serve_fake, args=(args.active, args.finished, urls, stop))
    print(f"filling the fake API server with {args.active + args.finished} Jobs ...", flush=True)
    server.start()
    url = urls.get(timeout=300)
    home = Path(tempfile.mkdtemp(prefix="tf-bench-reconcile-"))
    settings = SchedulerSettings(
        home=home,
        redis_url="redis://127.0.0.1:1/0",
        executor="kubernetes",
        kubernetes=KubernetesSettings(namespace=NAMESPACE),
    )
    services = Services.build(settings)
    print(f"filling SQLite with {args.active + args.finished} jobs ...", flush=True)
    await fill_database(services, args.active, args.finished)
    executor = KubernetesExecutor(settings.kubernetes, api_client=api_client_for(url))
    scheduler = Scheduler(services=services, executor=executor)

    started = time.perf_counter()
    listed_jobs = executor._list_jobs()
    list_s = time.perf_counter() - started
    assert len(listed_jobs) == args.active, "the list must hold the active Jobs only"

    # The watch: the first refresh starts it (that pass still lists); wait until it has caught up.
    started = time.perf_counter()
    executor.refresh()
    watch = executor.jobs_watch
    while not (watch.healthy and len(watch.items()) == args.active):
        if time.perf_counter() - started > 120:
            raise RuntimeError("the watch did not catch up")
        time.sleep(0.01)
    sync_s = time.perf_counter() - started

    print(f"{args.passes} passes reading the watch cache ...", flush=True)
    watched, watched_requests, watched_cpu = await measure(scheduler, args.passes)
    print(
        f"{args.passes} passes with the per-pass LIST (the fallback while the watch is down) ...", flush=True
    )
    watch.stop()
    listed, listed_requests, listed_cpu = await measure(scheduler, args.passes)

    rows = [
        ("reconcile pass, watch cache, median", f"{statistics.median(watched) * 1000:.0f} ms", "< 1000 ms"),
        ("reconcile pass, watch cache, max", f"{max(watched) * 1000:.0f} ms", "< 1000 ms"),
        ("Kubernetes API requests per pass, watch cache", str(watched_requests), "O(1)"),
        ("scheduler CPU per pass, watch cache", f"{watched_cpu * 1000:.0f} ms", ""),
        ("reconcile pass, LIST fallback, median", f"{statistics.median(listed) * 1000:.0f} ms", "< 1000 ms"),
        ("reconcile pass, LIST fallback, max", f"{max(listed) * 1000:.0f} ms", "< 1000 ms"),
        ("Kubernetes API requests per pass, LIST fallback", str(listed_requests), "O(1)"),
        ("scheduler CPU per pass, LIST fallback", f"{listed_cpu * 1000:.0f} ms", ""),
        (
            f"the LIST alone ({args.active} Jobs returned of {args.active + args.finished})",
            f"{list_s * 1000:.0f} ms",
            "",
        ),
        ("watch start: LIST, then watch caught up", f"{sync_s * 1000:.0f} ms", ""),
    ]
    if args.compare_gets:
        print("1 pass with one GET per job (no refresh), for comparison ...", flush=True)
        executor.refresh = lambda: None  # type: ignore[method-assign]
        executor._snapshot = None
        per_get, per_get_requests, _ = await measure(scheduler, 1)
        rows.append(("pass with one GET per job instead (fake GETs scan)", f"{per_get[0] * 1000:.0f} ms", ""))
        rows.append(("requests per pass with one GET per job", str(per_get_requests), ""))

    executor.shutdown()
    await services.close()
    stop.set()
    server.join(30)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--active", type=int, default=500)
    parser.add_argument("--finished", type=int, default=10_000)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--compare-gets", action="store_true", help="also time one GET per job (slow)")
    parser.add_argument("--write", action="store_true", help="append the results to bench/RESULTS.md")
    args = parser.parse_args()

    rows = asyncio.run(run(args))
    table = "| metric | value | target |\n|---|---|---|\n" + "\n".join(
        f"| {a} | {b} | {c} |" for a, b, c in rows
    )
    print(table)
    if args.write:
        machine = f"{platform.node()} ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        section = (
            f"\n## Reconcile pass, kubernetes executor ({stamp})\n\nMachine: {machine}, "
            f"Python {platform.python_version()}, SQLite, the fake Kubernetes API server (kmock) "
            "on loopback; the machine is shared with other engineers' test runs. "
            f"{args.active} active and {args.finished} finished jobs. "
            f"`python bench/reconcile.py --active {args.active} --finished {args.finished} "
            f"--passes {args.passes}`\n\n{table}\n"
        )
        with open(ROOT / "bench" / "RESULTS.md", "a") as fh:
            fh.write(section)
        print("appended to bench/RESULTS.md")


if __name__ == "__main__":
    main()
