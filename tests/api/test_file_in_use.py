"""DELETE /v1/files/{id} answers 409 file_in_use while an unfinished job uses the file, and a
concurrent job create and delete never leave a job whose file is gone (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio

import pytest

from tests.api.conftest import Harness, auth
from tests.conftest import ADMIN_KEY
from tuneforge.types import JobCreate, JobStatus
from tuneforge_api.errors import ApiError
from tuneforge_api.job_create import create_job
from tuneforge_api.store import files, jobs, projects

TINY = "tuneforge/tiny-llama"


def delete(api: Harness, file_id: str, key: str = ADMIN_KEY):
    return api.http.delete(f"/v1/files/{file_id}", headers=auth(key))


def new_job(api: Harness, training: str, validation: str | None = None) -> str:
    body = {"model": TINY, "training_file": training}
    if validation:
        body["validation_file"] = validation
    r = api.http.post("/v1/fine_tuning/jobs", json=body, headers=auth(ADMIN_KEY))
    assert r.status_code == 200, r.text
    return r.json()["id"]


def move(api: Harness, job_id: str, from_: JobStatus, to: JobStatus) -> None:
    async def go() -> None:
        async with api.app.state.services.sessions() as session:
            assert await jobs.transition(session, job_id, (from_,), to)
            await session.commit()

    api.http.portal.call(go)


@pytest.mark.parametrize("role", ["training", "validation"])
def test_file_of_unfinished_job_cannot_be_deleted(api: Harness, role: str) -> None:
    train, val = api.upload()["id"], api.upload()["id"]
    job_id = new_job(api, train, val)
    target = train if role == "training" else val
    previous = JobStatus.validating_files
    for state in (JobStatus.validating_files, JobStatus.queued, JobStatus.running):
        if state != previous:
            move(api, job_id, previous, state)
            previous = state
        r = delete(api, target)
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == "file_in_use" and job_id in error["message"]
        assert r.headers["x-should-retry"] == "false"
    assert api.http.get(f"/v1/files/{target}", headers=auth(ADMIN_KEY)).status_code == 200
    assert any(target in key for key in api.stored_objects())  # the object is kept too
    move(api, job_id, JobStatus.running, JobStatus.succeeded)
    assert delete(api, target).json() == {"id": target, "object": "file", "deleted": True}
    assert not any(target in key for key in api.stored_objects())


def test_cancelled_job_releases_its_file(api: Harness) -> None:
    f = api.upload()["id"]
    job_id = new_job(api, f)
    assert delete(api, f).status_code == 409
    api.client().jobs.cancel(job_id)
    assert delete(api, f).status_code == 200


def test_unknown_file_is_404(api: Harness) -> None:
    r = delete(api, "file-doesnotexist")
    assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found"


def test_another_project_gets_404_not_409(api: Harness, other_key: str) -> None:
    f = api.upload()["id"]
    new_job(api, f)
    r = delete(api, f, key=other_key)
    assert r.status_code == 404 and r.json()["error"]["code"] == "file_not_found"
    # This project's jobs hold only this project's files.
    g = api.upload(key=other_key)["id"]
    assert delete(api, g, key=other_key).status_code == 200


async def _principal(api: Harness) -> projects.Principal:
    async with api.app.state.services.sessions() as session:
        principal = await projects.authenticate(session, ADMIN_KEY)
    assert principal is not None
    return principal


async def _delete(api: Harness, project_id: str, file_id: str) -> str:
    async with api.app.state.services.sessions() as session:
        try:
            found = await files.delete_unless_in_use(session, project_id, file_id)
        except files.FileInUse:
            return "in_use"
        await session.commit()
        return "deleted" if found else "missing"


def test_race_create_first_then_delete_sees_the_job(api: Harness) -> None:
    """The create holds the file when the delete starts: the delete waits and answers in_use."""
    file_id = api.upload()["id"]

    async def go() -> tuple[str, int]:
        services = api.app.state.services
        principal = await _principal(api)
        async with services.sessions() as session:
            job = await create_job(session, services, principal, JobCreate(model=TINY, training_file=file_id))
            deleting = asyncio.create_task(_delete(api, principal.project_id, file_id))
            await asyncio.sleep(0.3)  # give the delete every chance to run ahead of the commit
            assert not deleting.done()  # it waits: on the row lock (PostgreSQL) or the connection (SQLite)
            await session.commit()
        async with services.sessions() as session:
            n_jobs = len(await files.jobs_using(session, principal.project_id, file_id))
        assert job.training_file == file_id
        return await deleting, n_jobs

    outcome, n_jobs = api.http.portal.call(go)
    assert (outcome, n_jobs) == ("in_use", 1)
    assert api.http.get(f"/v1/files/{file_id}", headers=auth(ADMIN_KEY)).status_code == 200


def test_race_delete_first_then_create_finds_no_file(api: Harness) -> None:
    """The delete holds the file when the create starts: the create waits, then finds no file."""
    file_id = api.upload()["id"]

    async def go() -> str:
        services = api.app.state.services
        principal = await _principal(api)
        async with services.sessions() as session:
            assert await files.delete_unless_in_use(session, principal.project_id, file_id)

            async def create() -> str:
                async with services.sessions() as other:
                    try:
                        await create_job(
                            other, services, principal, JobCreate(model=TINY, training_file=file_id)
                        )
                    except ApiError as exc:
                        return exc.code
                    await other.commit()
                    return "created"

            creating = asyncio.create_task(create())
            await asyncio.sleep(0.3)
            assert not creating.done()
            await session.commit()
        return await creating

    assert api.http.portal.call(go) == "file_not_found"
    assert api.client().jobs.list().data == []


def test_concurrent_requests_never_orphan_a_job(api: Harness) -> None:
    """Create and delete sent at once, several times: either the job exists and the file too, or
    the delete won and the create was refused."""
    for _ in range(4):
        file_id = api.upload()["id"]

        async def go(file_id: str = file_id) -> tuple[int, int]:
            import httpx

            transport = httpx.ASGITransport(app=api.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                body = {"model": TINY, "training_file": file_id}
                made, gone = await asyncio.gather(
                    http.post("/v1/fine_tuning/jobs", json=body, headers=auth(ADMIN_KEY)),
                    http.delete(f"/v1/files/{file_id}", headers=auth(ADMIN_KEY)),
                )
            return made.status_code, gone.status_code

        made, gone = api.http.portal.call(go)
        assert (made, gone) in {(200, 409), (400, 200)}
        exists = api.http.get(f"/v1/files/{file_id}", headers=auth(ADMIN_KEY)).status_code == 200
        assert exists == (made == 200)
