"""Idempotency-Key on job creation: a retry never starts a second job."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid

import uvicorn

from tests.api.conftest import Harness, auth
from tests.conftest import ADMIN_KEY, free_port
from tuneforge import Client
from tuneforge_api.app import create_app

TINY = "tuneforge/tiny-llama"


def post(api: Harness, body: dict, key: str, api_key: str = ADMIN_KEY):
    return api.http.post("/v1/fine_tuning/jobs", json=body, headers={**auth(api_key), "Idempotency-Key": key})


def test_same_key_same_body_returns_the_first_job(api: Harness) -> None:
    body = {"model": TINY, "training_file": api.upload()["id"]}
    first = post(api, body, "k1")
    again = post(api, dict(reversed(list(body.items()))), "k1")  # same request, keys in another order
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert len(api.client().jobs.list().data) == 1


def test_same_key_other_body_is_422(api: Harness) -> None:
    fid = api.upload()["id"]
    assert post(api, {"model": TINY, "training_file": fid}, "k2").status_code == 200
    r = post(api, {"model": TINY, "training_file": fid, "seed": 3}, "k2")
    assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused"
    assert r.headers["x-should-retry"] == "false"
    assert len(api.client().jobs.list().data) == 1


def test_keys_are_per_project(api: Harness, other_key: str) -> None:
    a = post(api, {"model": TINY, "training_file": api.upload()["id"]}, "shared")
    b = post(
        api, {"model": TINY, "training_file": api.upload(key=other_key)["id"]}, "shared", api_key=other_key
    )
    assert a.status_code == b.status_code == 200 and a.json()["id"] != b.json()["id"]


def test_failed_request_does_not_burn_the_key(api: Harness) -> None:
    fid = api.upload()["id"]
    assert post(api, {"model": "nope", "training_file": fid}, "k3").status_code == 400
    assert post(api, {"model": TINY, "training_file": fid}, "k3").status_code == 200


def test_bad_key_is_400(api: Harness) -> None:
    r = post(api, {"model": TINY, "training_file": api.upload()["id"]}, "x" * 256)
    assert r.status_code == 400 and r.json()["error"]["param"] == "Idempotency-Key"


def test_connection_dropped_after_commit_then_retried(api: Harness) -> None:
    """The client sends a create and hangs up before reading the answer; its retry with the
    same key gets the job that was committed, and exactly one job exists."""
    port = free_port()
    # A second app on the same database, in the server's own event loop.
    app = create_app(api.settings)
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        body = json.dumps({"model": TINY, "training_file": api.upload()["id"]}).encode()
        key = uuid.uuid4().hex
        raw = (
            f"POST /v1/fine_tuning/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_KEY}\r\n"
            f"Idempotency-Key: {key}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(raw.encode() + body)
            sock.shutdown(socket.SHUT_WR)  # hang up without reading the response
        client = Client(base_url=f"http://127.0.0.1:{port}", api_key=ADMIN_KEY)
        deadline = time.monotonic() + 10
        while not client.jobs.list().data:  # the server finishes the dropped request on its own
            assert time.monotonic() < deadline
            time.sleep(0.05)
        retry = client._http.post(
            f"http://127.0.0.1:{port}/v1/fine_tuning/jobs",
            content=body,
            headers={**auth(ADMIN_KEY), "Idempotency-Key": key, "Content-Type": "application/json"},
        )
        jobs = client.jobs.list().data
        assert retry.status_code == 200 and len(jobs) == 1 and retry.json()["id"] == jobs[0].id
    finally:
        server.should_exit = True
        thread.join(5)


def test_expired_keys_are_purged_by_the_scheduler(api: Harness) -> None:
    """Keys live 24 h: the scheduler's hourly cron removes older ones, fresh ones stay."""
    from types import SimpleNamespace

    from sqlalchemy import func, select, update

    from tuneforge_api.db.tables import IdempotencyRow
    from tuneforge_scheduler.worker import purge_idempotency_keys

    body = {"model": TINY, "training_file": api.upload()["id"]}
    assert post(api, body, "old").status_code == post(api, body, "fresh").status_code == 200
    services = api.app.state.services

    async def age_and_purge() -> int:
        async with services.sessions() as session:
            await session.execute(
                update(IdempotencyRow).where(IdempotencyRow.key == "old").values(created_at=0)
            )
            await session.commit()
        await purge_idempotency_keys({"scheduler": SimpleNamespace(services=services)})
        async with services.sessions() as session:
            return await session.scalar(select(func.count()).select_from(IdempotencyRow))

    assert api.http.portal.call(age_and_purge) == 1
    assert post(api, body, "fresh").headers["idempotent-replayed"] == "true"
