"""The trainer's job token (routes/internal.py): it posts events for its own job only, is not
an API key, is stored hashed, stops working when the job ends or a new attempt gets a new
token, and cannot set what the server owns."""

from __future__ import annotations

import pytest

from tests.api.conftest import Harness, auth
from tests.conftest import ADMIN_KEY
from tests.security.world import TINY, member_key_of_new_project, snapshot
from tuneforge.types import JobStatus
from tuneforge_api.store import jobs
from tuneforge_api.store.ids import hash_secret, new_secret


def _job(api: Harness, key: str = ADMIN_KEY) -> str:
    f = api.upload(key=key)
    r = api.http.post(
        "/v1/fine_tuning/jobs", json={"model": TINY, "training_file": f["id"]}, headers=auth(key)
    )
    return r.json()["id"]


def _set(api: Harness, job_id: str, to: JobStatus, **values) -> None:
    async def go() -> None:
        async with api.app.state.services.sessions() as session:
            row = await jobs.get_row_any_project(session, job_id)
            assert await jobs.transition(session, job_id, (JobStatus(row.status),), to, **values)
            await session.commit()

    api.http.portal.call(go)


def _start(api: Harness, job_id: str) -> str:
    """What the scheduler does when it launches an attempt: a fresh token, stored hashed."""
    token = new_secret("tfjob")
    _set(api, job_id, JobStatus.running, attempt=1, token_hash=hash_secret(token))
    return token


def _post(api: Harness, job_id: str, token: str, body: dict | None = None):
    return api.http.post(
        f"/internal/v1/jobs/{job_id}/events", json=body or {"message": "step"}, headers=auth(token)
    )


def test_token_is_scoped_to_its_job(api: Harness) -> None:
    mine, sibling = _job(api), _job(api)
    key_b, _ = member_key_of_new_project(api)
    theirs = _job(api, key_b)
    token, token_b = _start(api, mine), _start(api, theirs)
    _start(api, sibling)
    assert _post(api, mine, token).status_code == 204
    before = snapshot(api)
    for job_id, tok in ((sibling, token), (theirs, token), (mine, token_b), ("ftjob-nope", token)):
        r = _post(api, job_id, tok)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_job_token"
    assert snapshot(api) == before
    # A job token is no API key, and no API key is a job token.
    assert api.http.get("/v1/files", headers=auth(token)).status_code == 401
    assert _post(api, mine, ADMIN_KEY).status_code == 401


def test_token_is_stored_hashed(api: Harness) -> None:
    job = _job(api)
    token = _start(api, job)
    dump = repr(snapshot(api)["db"])
    assert token not in dump and hash_secret(token) in dump


@pytest.mark.parametrize("end", [JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled])
def test_token_dies_with_the_job(api: Harness, end: JobStatus) -> None:
    job = _job(api)
    token = _start(api, job)
    assert _post(api, job, token).status_code == 204
    _set(
        api, job, end, error={"code": "x", "message": "y", "param": None} if end == JobStatus.failed else None
    )
    before = snapshot(api)
    assert _post(api, job, token).status_code == 401
    assert snapshot(api) == before


def test_a_new_attempt_revokes_the_old_token(api: Harness) -> None:
    job = _job(api)
    old = _start(api, job)
    new = new_secret("tfjob")

    async def relaunch() -> None:
        async with api.app.state.services.sessions() as session:
            await jobs.update_fields(session, job, token_hash=hash_secret(new), attempt=2)
            await session.commit()

    api.http.portal.call(relaunch)
    assert _post(api, job, old).status_code == 401
    assert _post(api, job, new).status_code == 204


def test_events_cannot_set_server_owned_fields(api: Harness) -> None:
    job = _job(api)
    token = _start(api, job)
    forged = {
        "type": "metrics",
        "message": "done!",
        "data": {"status": "succeeded", "fine_tuned_model": "ft:x", "project_id": "proj-x", "step": 1},
    }
    assert _post(api, job, token, forged).status_code == 204
    got = api.http.get(f"/v1/fine_tuning/jobs/{job}", headers=auth(ADMIN_KEY)).json()
    assert got["status"] == "running" and got["fine_tuned_model"] is None
    r = _post(api, job, token, {"message": "x", "status": "succeeded"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "status"
