"""/internal/v1: a trainer's token works for its own running job only."""

from __future__ import annotations

from tests.api.conftest import Harness, auth
from tuneforge.types import JobStatus
from tuneforge_api.store import jobs
from tuneforge_api.store.ids import hash_secret

TOKEN = "tfjob-test-token"


def _start(api: Harness, job_id: str) -> None:
    async def go() -> None:
        async with api.app.state.services.sessions() as session:
            assert await jobs.transition(
                session,
                job_id,
                (JobStatus.validating_files,),
                JobStatus.running,
                attempt=1,
                token_hash=hash_secret(TOKEN),
            )
            await session.commit()

    api.http.portal.call(go)


def _finish(api: Harness, job_id: str) -> None:
    async def go() -> None:
        async with api.app.state.services.sessions() as session:
            assert await jobs.transition(
                session,
                job_id,
                (JobStatus.running,),
                JobStatus.failed,
                error={"code": "x", "message": "y", "param": None},
            )
            await session.commit()

    api.http.portal.call(go)


def test_job_token_scope(api: Harness) -> None:
    f = api.upload()
    client = api.client()
    job = client.create_job(model="tuneforge/tiny-llama", training_file=f["id"])
    other = client.create_job(model="tuneforge/tiny-llama", training_file=f["id"])
    url = f"/internal/v1/jobs/{job.id}/events"
    metrics = {
        "type": "metrics",
        "message": "step 1/10",
        "data": {"step": 1, "eta_seconds": 30, "trained_tokens": 123},
    }
    assert api.http.post(url, json=metrics, headers=auth(TOKEN)).status_code == 401  # not started
    _start(api, job.id)
    assert api.http.post(url, json=metrics, headers=auth(TOKEN)).status_code == 204
    got = client.jobs.get(job.id)
    assert got.trained_tokens == 123 and got.estimated_finish is not None
    assert list(client.jobs.events(job.id))[-1].data["step"] == 1
    assert (
        api.http.post(f"/internal/v1/jobs/{other.id}/events", json=metrics, headers=auth(TOKEN)).status_code
        == 401
    )  # another job
    assert api.http.post(url, json={"message": "x", "bogus": 1}, headers=auth(TOKEN)).status_code == 400
    assert api.http.post(url, json=metrics, headers=auth("tfjob-wrong")).status_code == 401
    _finish(api, job.id)
    assert api.http.post(url, json=metrics, headers=auth(TOKEN)).status_code == 401  # token died with the job
