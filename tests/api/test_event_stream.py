"""The SSE event stream, through a real uvicorn server: live delivery, resume with
Last-Event-ID, heartbeats, the end of the stream, and isolation."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.api.conftest import Harness, auth
from tests.conftest import ADMIN_KEY
from tuneforge import Client, NotFoundError
from tuneforge.types import JobStatus
from tuneforge_api import event_stream
from tuneforge_api.store import jobs
from tuneforge_api.store.ids import hash_secret

TOKEN = "tfjob-stream-token"


@pytest.fixture
def live(api: Harness, live_url: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Harness]:
    monkeypatch.setattr(event_stream, "POLL_S", 0.05)
    monkeypatch.setattr(event_stream, "HEARTBEAT_S", 0.2)
    return live_url, api


def set_state(api: Harness, job_id: str, from_: JobStatus, to: JobStatus, **values) -> None:
    async def go() -> None:
        async with api.app.state.services.sessions() as session:
            assert await jobs.transition(session, job_id, (from_,), to, **values)
            await session.commit()

    api.http.portal.call(go)


def trainer_event(url: str, job_id: str, message: str) -> None:
    r = httpx.post(f"{url}/internal/v1/jobs/{job_id}/events", json={"message": message}, headers=auth(TOKEN))
    assert r.status_code == 204, r.text


def test_stream_live_resume_and_end(live) -> None:
    url, api = live
    client = Client(base_url=url, api_key=ADMIN_KEY)
    job = client.create_job(model="tuneforge/tiny-llama", training_file=api.upload()["id"])
    set_state(
        api, job.id, JobStatus.validating_files, JobStatus.running, attempt=1, token_hash=hash_secret(TOKEN)
    )
    got: list[str] = []

    def consume() -> None:
        got.extend(e.message for e in client.jobs.stream(job.id))

    reader = threading.Thread(target=consume)
    reader.start()
    for i in range(3):
        trainer_event(url, job.id, f"step {i}")
        time.sleep(0.1)
    time.sleep(0.5)  # long enough for heartbeats, which the client skips
    assert got[-1] == "step 2" and reader.is_alive()
    set_state(api, job.id, JobStatus.running, JobStatus.succeeded)
    reader.join(10)
    assert not reader.is_alive()  # the stream ended with the job
    assert got == [f"Created fine-tuning job {job.id}", "step 0", "step 1", "step 2"]

    first_two = client.jobs.list_events(job.id, limit=100).data[::-1][:2]
    resumed = [e.message for e in client.jobs.stream(job.id, last_event_id=first_two[1].id)]
    assert resumed == ["step 1", "step 2"]


def test_raw_sse_has_ids_and_heartbeats(live) -> None:
    url, api = live
    client = Client(base_url=url, api_key=ADMIN_KEY)
    job = client.create_job(model="tuneforge/tiny-llama", training_file=api.upload()["id"])
    set_state(
        api, job.id, JobStatus.validating_files, JobStatus.running, attempt=1, token_hash=hash_secret(TOKEN)
    )
    lines: list[str] = []
    with httpx.stream(
        "GET",
        f"{url}/v1/fine_tuning/jobs/{job.id}/events",
        params={"stream": "true"},
        headers=auth(ADMIN_KEY),
        timeout=10,
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        started = time.monotonic()
        for line in r.iter_lines():
            lines.append(line)
            if line == ": heartbeat" or time.monotonic() - started > 5:
                break
    assert any(line.startswith("id: ftevent-") for line in lines) and ": heartbeat" in lines


def test_stream_of_another_projects_job_is_404(live, other_key: str) -> None:
    url, api = live
    job = Client(base_url=url, api_key=ADMIN_KEY).create_job(
        model="tuneforge/tiny-llama", training_file=api.upload()["id"]
    )
    with pytest.raises(NotFoundError):
        list(Client(base_url=url, api_key=other_key).jobs.stream(job.id))
