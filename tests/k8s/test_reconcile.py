"""The real scheduler (lifecycle.Scheduler) and its reconcile loop, with the kubernetes
executor, a real SQLite database, real file:// storage and the real API (to upload the data
and create jobs), against the FAKE Kubernetes API server (kmock's emulator; see
fake_apiserver.py). The fake runs no controllers: the tests write the Job status the Job
controller would write, and the adapter or error.json the trainer would write.

The scheduler's methods are called directly, so no Redis is needed (the API's enqueue fails
fast against a closed port and is only logged, which is its documented behaviour).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import ADMIN_KEY, free_port
from tests.k8s.conftest import make_spec, wait_until
from tests.k8s.fake_apiserver import FakeKubernetes
from tuneforge.storage import MANIFEST, adapter_prefix, job_prefix
from tuneforge.types import JobStatus
from tuneforge_api.app import create_app
from tuneforge_api.db.engine import migrate
from tuneforge_api.services import Services
from tuneforge_api.store import jobs
from tuneforge_scheduler.executors import run_name
from tuneforge_scheduler.executors.kubernetes import KubernetesExecutor
from tuneforge_scheduler.k8s.manifests import build_job
from tuneforge_scheduler.k8s.names import RECORDED
from tuneforge_scheduler.lifecycle import Scheduler
from tuneforge_scheduler.settings import KubernetesSettings, SchedulerSettings

CHAT = b"".join(
    json.dumps(
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
    ).encode()
    + b"\n"
    for i in range(4)
)


@pytest.fixture
def settings(tmp_path: Path, namespace: str) -> SchedulerSettings:
    return SchedulerSettings(
        home=tmp_path / "home",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens: enqueues fail fast
        api_key=ADMIN_KEY,
        executor="kubernetes",
        kubernetes=KubernetesSettings(namespace=namespace),
    )


@pytest.fixture
def api(settings: SchedulerSettings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {ADMIN_KEY}"
        yield client


@pytest.fixture
async def scheduler(
    settings: SchedulerSettings, fake_k8s: FakeKubernetes, api: TestClient
) -> AsyncIterator[Scheduler]:
    # Its own engine, as in the scheduler's own process (the API's lives on the TestClient's loop).
    services = Services.build(settings)
    await migrate(services.engine)
    # The per-pass LIST (deterministic after a status write); test_reconcile_with_the_watch below
    # runs the loop on the watch cache.
    executor = KubernetesExecutor(
        settings.kubernetes, api_client=fake_k8s.api_client(), cancel_wait_s=2, watch=False
    )
    yield Scheduler(services=services, executor=executor)
    executor.shutdown()
    await services.close()


def create_job(api: TestClient) -> str:
    r = api.post("/v1/files", files={"file": ("train.jsonl", CHAT)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    r = api.post(
        "/v1/fine_tuning/jobs", json={"model": "tuneforge/tiny-llama", "training_file": r.json()["id"]}
    )
    assert r.status_code == 200, r.text
    return r.json()["id"]


def job_json(api: TestClient, job_id: str) -> dict[str, Any]:
    return api.get(f"/v1/fine_tuning/jobs/{job_id}").json()


def events(api: TestClient, job_id: str) -> list[str]:
    data = api.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    return [e["message"] for e in reversed(data)]


def finish(fake: FakeKubernetes, namespace: str, name: str, condition: dict[str, str]) -> None:
    fake.patch(
        "batch/v1/jobs", name, {"status": {"conditions": [{"status": "True", **condition}]}}, namespace
    )


async def test_running_to_succeeded(
    api: TestClient, scheduler: Scheduler, fake_k8s: FakeKubernetes, namespace: str
) -> None:
    job_id = create_job(api)
    await scheduler.reconcile()  # validating_files -> queued -> running: the Job is created
    name = run_name(job_id, 1)
    assert job_json(api, job_id)["status"] == "running"
    job = fake_k8s.get("batch/v1/jobs", name, namespace)
    assert job is not None and job["metadata"]["labels"]["tuneforge.io/job-id"] == job_id

    # The trainer's token works against the API: the scheduler stored its hash, the Secret has it.
    token = fake_k8s.get("v1/secrets", name, namespace)["stringData"]["TUNEFORGE_JOB_TOKEN"]
    r = api.post(
        f"/internal/v1/jobs/{job_id}/events",
        json={"message": "step 1"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert r.status_code == 204, r.text

    await scheduler.reconcile()
    assert job_json(api, job_id)["status"] == "running"

    # The trainer publishes the adapter (manifest last) and the Job controller marks it Complete.
    storage = scheduler.services.storage
    project = job_json(api, job_id)["organization_id"]
    storage.put_bytes(adapter_prefix(project, job_id) + "adapter_model.safetensors", b"weights")
    manifest = {"files": {}, "metrics": {"trained_tokens": 123}}
    storage.put_bytes(adapter_prefix(project, job_id) + MANIFEST, json.dumps(manifest).encode())
    finish(fake_k8s, namespace, name, {"type": "Complete"})

    await scheduler.reconcile()
    job = job_json(api, job_id)
    assert (job["status"], job["trained_tokens"]) == ("succeeded", 123)
    # Recorded: the Job leaves the per-pass list and Kubernetes may delete it after the TTL.
    k8s_job = fake_k8s.get("batch/v1/jobs", name, namespace)
    assert k8s_job["metadata"]["labels"][RECORDED] == "true"
    assert k8s_job["spec"]["ttlSecondsAfterFinished"] == 3600


async def test_running_to_failed_on_exit_42(
    api: TestClient, scheduler: Scheduler, fake_k8s: FakeKubernetes, namespace: str
) -> None:
    job_id = create_job(api)
    await scheduler.reconcile()
    project = job_json(api, job_id)["organization_id"]
    error = {
        "code": "invalid_training_file",
        "message": "Line 3 has no assistant turn.",
        "param": "training_file",
    }
    scheduler.services.storage.put_bytes(
        job_prefix(project, job_id) + "error.json", json.dumps(error).encode()
    )
    finish(
        fake_k8s,
        namespace,
        run_name(job_id, 1),
        {
            "type": "Failed",
            "reason": "PodFailurePolicy",
            "message": "Container trainer for pod x/y failed with exit code 42 matching FailJob rule",
        },
    )

    await scheduler.reconcile()
    job = job_json(api, job_id)
    assert job["status"] == "failed"
    assert job["error"] == error
    assert fake_k8s.names("batch/v1/jobs", namespace) == [run_name(job_id, 1)]  # no second attempt


async def test_deadline_exceeded_fails_with_its_reason(
    api: TestClient, scheduler: Scheduler, fake_k8s: FakeKubernetes, namespace: str
) -> None:
    job_id = create_job(api)
    await scheduler.reconcile()
    finish(fake_k8s, namespace, run_name(job_id, 1), {"type": "Failed", "reason": "DeadlineExceeded"})
    await scheduler.reconcile()
    job = job_json(api, job_id)
    assert job["status"] == "failed"
    assert "maximum duration" in job["error"]["message"]


async def test_retriable_failure_starts_attempt_2(
    api: TestClient, scheduler: Scheduler, fake_k8s: FakeKubernetes, namespace: str
) -> None:
    job_id = create_job(api)
    await scheduler.reconcile()
    first = run_name(job_id, 1)
    # The trainer was OOM-killed (137): a retriable failure, the Job fails (backoffLimit 0).
    fake_k8s.put(
        "v1/pods",
        {
            "metadata": {"name": f"{first}-abcde", "labels": {"tuneforge.io/run": first}},
            "status": {
                "phase": "Failed",
                "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 137}}}],
            },
        },
        namespace,
    )
    finish(fake_k8s, namespace, first, {"type": "Failed", "reason": "BackoffLimitExceeded"})

    await scheduler.reconcile()
    second = run_name(job_id, 2)
    assert job_json(api, job_id)["status"] == "running"
    assert fake_k8s.names("batch/v1/jobs", namespace) == [first, second]
    assert fake_k8s.get("batch/v1/jobs", first, namespace)["metadata"]["labels"][RECORDED] == "true"
    assert RECORDED not in fake_k8s.get("batch/v1/jobs", second, namespace)["metadata"]["labels"]
    spec = json.loads(fake_k8s.get("v1/configmaps", second, namespace)["data"]["spec.json"])
    assert spec["attempt"] == 2
    assert "Attempt 1 failed (exit code 137); retrying" in events(api, job_id)

    # The next pass lists only the new attempt's Job.
    fake_k8s.clear_requests()
    await scheduler.reconcile()
    assert set(scheduler.executor._snapshot.jobs) == {second}


async def test_kueue_waiting_job_stays_running_then_cancel(
    api: TestClient, scheduler: Scheduler, fake_k8s: FakeKubernetes, namespace: str
) -> None:
    scheduler.executor.settings = scheduler.executor.settings.model_copy(update={"kueue_queue": "team-a"})
    job_id = create_job(api)
    await scheduler.reconcile()
    name = run_name(job_id, 1)
    assert fake_k8s.get("batch/v1/jobs", name, namespace)["spec"]["suspend"] is True
    status = scheduler.executor.status(name)
    assert status.detail == "Waiting for quota: Kueue queue team-a has not admitted the job yet"
    await scheduler.reconcile()
    await scheduler.reconcile()
    assert job_json(api, job_id)["status"] == "running"
    # The user sees why it waits, once, however many passes see the same thing.
    waiting = [m for m in events(api, job_id) if m.startswith("Waiting for quota")]
    assert waiting == ["Waiting for quota: Kueue queue team-a has not admitted the job yet"]

    assert api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 200
    await scheduler.cancel(job_id)  # what the arq task (or the next reconcile pass) does
    assert job_json(api, job_id)["status"] == "cancelled"
    assert fake_k8s.get("batch/v1/jobs", name, namespace) is None
    deletes = [r for r in fake_k8s.requests() if r[0] == "DELETE" and r[1].endswith(f"/jobs/{name}")]
    assert deletes and deletes[0][2]["propagationPolicy"] == "Foreground"


async def test_a_job_lost_before_launch_is_launched_again(
    api: TestClient, scheduler: Scheduler, fake_k8s: FakeKubernetes, namespace: str
) -> None:
    """The scheduler committed "running" but died before creating the Job: reconcile creates it."""
    job_id = create_job(api)
    await scheduler.reconcile()
    name = run_name(job_id, 1)
    fake_k8s.run(lambda emu: emu.objects[("batch/v1/jobs", namespace, name)].delete())
    await scheduler.reconcile()
    assert fake_k8s.get("batch/v1/jobs", name, namespace) is not None
    async with scheduler.services.sessions() as session:
        row = await jobs.get_row_any_project(session, job_id)
    assert (row.status, row.attempt) == ("running", 1)


async def test_orphan_jobs_are_deleted_after_a_grace_period_and_nothing_else_is(
    api: TestClient,
    scheduler: Scheduler,
    fake_k8s: FakeKubernetes,
    namespace: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    executor = scheduler.executor
    running_id, finished_id = create_job(api), create_job(api)
    await scheduler.reconcile()  # both start: their Jobs exist
    project = job_json(api, running_id)["organization_id"]
    # The scheduler recorded the end of `finished_id` but could not release its Job (API down).
    async with scheduler.services.sessions() as session:
        assert await jobs.transition(session, finished_id, (JobStatus.running,), JobStatus.failed)
        await session.commit()

    def job_of(job_id: str, project_id: str, **labels: str) -> dict[str, Any]:
        spec = make_spec(job_id=job_id).model_copy(update={"project_id": project_id})
        job = build_job(spec, executor.settings, name=run_name(job_id, 1), namespace=namespace)
        job["metadata"]["labels"].update(labels)
        return job

    unknown = "ftjob-" + "f" * 24  # no row: created after the backup this database was restored from
    fake_k8s.put("batch/v1/jobs", job_of(unknown, project), namespace)
    # Never ours to judge: another installation's project, and a Job without our labels.
    stranger = "ftjob-" + "e" * 24
    fake_k8s.put("batch/v1/jobs", job_of(stranger, "proj-of-another-installation"), namespace)
    mimic = "ftjob-" + "d" * 24
    fake_k8s.put(
        "batch/v1/jobs", job_of(mimic, project, **{"app.kubernetes.io/managed-by": "helm"}), namespace
    )
    # Recorded: out of our hands already (its TTL deletes it).
    recorded = "ftjob-" + "c" * 24
    fake_k8s.put("batch/v1/jobs", job_of(recorded, project, **{RECORDED: "true"}), namespace)
    every_job = fake_k8s.names("batch/v1/jobs", namespace)

    executor.orphan_grace_s = 3600
    await scheduler.reconcile()
    await scheduler.reconcile()
    assert fake_k8s.names("batch/v1/jobs", namespace) == every_job  # within the grace period

    executor.orphan_grace_s = 0  # the grace period has passed
    with caplog.at_level(logging.WARNING, logger="tuneforge.scheduler.kubernetes"):
        await scheduler.reconcile()
    gone = {run_name(unknown, 1), run_name(finished_id, 1)}
    assert fake_k8s.names("batch/v1/jobs", namespace) == sorted(set(every_job) - gone)
    deletes = [r for r in fake_k8s.requests() if r[0] == "DELETE" and f"/{namespace}/jobs/" in r[1]]
    assert sorted(r[1].rsplit("/", 1)[-1] for r in deletes) == sorted(gone)
    for _, _, _, body in deletes:
        assert body["propagationPolicy"] == "Foreground" and body["preconditions"]["uid"]
    logged = [r.getMessage() for r in caplog.records if "orphan" in r.getMessage()]
    prefix = f"deleting orphan Job {namespace}/"
    assert sorted(logged) == sorted(
        [
            f"{prefix}{run_name(unknown, 1)}: job {unknown} has no record in the database",
            f"{prefix}{run_name(finished_id, 1)}: job {finished_id} is already failed",
        ]
    )
    # The running job is untouched and still running.
    assert job_json(api, running_id)["status"] == "running"
    assert run_name(running_id, 1) in fake_k8s.names("batch/v1/jobs", namespace)


async def test_reconcile_with_the_watch_reads_status_from_it(
    api: TestClient, scheduler: Scheduler, fake_k8s: FakeKubernetes, namespace: str
) -> None:
    listing = scheduler.executor
    scheduler.executor = KubernetesExecutor(listing.settings, api_client=fake_k8s.api_client())
    try:
        await _succeed_through_the_watch(api, scheduler, fake_k8s, namespace)
    finally:
        scheduler.executor.shutdown()
        scheduler.executor = listing


async def _succeed_through_the_watch(
    api: TestClient, scheduler: Scheduler, fake_k8s: FakeKubernetes, namespace: str
) -> None:
    executor = scheduler.executor
    job_id = create_job(api)
    await scheduler.reconcile()  # the Job is created
    await scheduler.reconcile()  # the first pass with a running job starts the watch (and lists)
    name = run_name(job_id, 1)
    watch = executor.jobs_watch
    wait_until(lambda: watch.healthy and name in watch.items(), "the watch has the new Job")

    project = job_json(api, job_id)["organization_id"]
    storage = scheduler.services.storage
    storage.put_bytes(adapter_prefix(project, job_id) + MANIFEST, json.dumps({"metrics": {}}).encode())
    finish(fake_k8s, namespace, name, {"type": "Complete"})
    wait_until(
        lambda: "Complete" in str((watch.items().get(name) or {}).get("status")), "the Complete event arrived"
    )
    fake_k8s.clear_requests()
    await scheduler.reconcile()
    assert job_json(api, job_id)["status"] == "succeeded"
    # The pass read the Job from the watch: its only request is the release (label + TTL).
    sent = [(m, p.rsplit("/", 1)[-1]) for m, p, _, _ in fake_k8s.requests() if f"/{namespace}/" in p]
    assert sent == [("PATCH", name)]
    wait_until(lambda: name not in watch.items(), "the recorded Job left the watch")
    assert watch.stats.lists == 1
