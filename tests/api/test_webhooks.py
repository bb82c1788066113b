"""Webhooks: endpoints, SSRF refusals, the outbox, and signed delivery that the openai
package's webhooks.unwrap() accepts."""

from __future__ import annotations

import httpx
import openai
import pytest
from sqlalchemy import update

from tests.api.conftest import Harness, auth
from tests.conftest import ADMIN_KEY, Receiver
from tuneforge.types import JobStatus
from tuneforge_api.db.tables import WebhookDeliveryRow
from tuneforge_api.store import jobs, webhooks
from tuneforge_scheduler import webhook_delivery

TINY = "tuneforge/tiny-llama"


@pytest.fixture
def open_api(api: Harness) -> Harness:
    """The harness with loopback webhooks allowed, as an operator running tests would set."""
    api.settings.webhooks_allow_private = True
    return api


def create_hook(api: Harness, url: str, key: str = ADMIN_KEY, **extra) -> httpx.Response:
    return api.http.post("/v1/webhooks", json={"url": url, **extra}, headers=auth(key))


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x",
        "http://localhost/x",
        "http://10.1.2.3/x",
        "http://169.254.169.254/latest",
        "http://[::1]/x",
        "http://192.168.0.1/x",
        "ftp://example.com/x",
        "http://user:pw@example.com/x",
        "not a url",
    ],
)
def test_private_and_malformed_urls_are_refused_by_default(api: Harness, url: str) -> None:
    r = create_hook(api, url)
    assert r.status_code == 400 and r.json()["error"]["param"] == "url", r.text
    assert api.http.get("/v1/webhooks", headers=auth(ADMIN_KEY)).json()["data"] == []


def test_create_list_delete(open_api: Harness, other_key: str) -> None:
    r = create_hook(open_api, "http://127.0.0.1:9/hook", events=["fine_tuning.job.failed"])
    assert r.status_code == 200
    hook = r.json()
    assert hook["secret"].startswith("whsec_") and hook["events"] == ["fine_tuning.job.failed"]
    listed = open_api.http.get("/v1/webhooks", headers=auth(ADMIN_KEY)).json()["data"]
    assert [h["id"] for h in listed] == [hook["id"]] and listed[0]["secret"] is None  # shown once
    assert create_hook(open_api, "http://127.0.0.1:9/x", events=["bogus"]).status_code == 400
    # another project sees nothing and touches nothing
    assert open_api.http.get("/v1/webhooks", headers=auth(other_key)).json()["data"] == []
    for method, path in [
        ("DELETE", f"/v1/webhooks/{hook['id']}"),
        ("GET", f"/v1/webhooks/{hook['id']}/deliveries"),
    ]:
        assert open_api.http.request(method, path, headers=auth(other_key)).status_code == 404
    assert (
        open_api.http.delete(f"/v1/webhooks/{hook['id']}", headers=auth(ADMIN_KEY)).json()["deleted"] is True
    )
    assert open_api.http.get("/v1/webhooks", headers=auth(ADMIN_KEY)).json()["data"] == []


def finish(api: Harness, job_id: str, to: JobStatus) -> None:
    async def go() -> None:
        async with api.app.state.services.sessions() as session:
            assert await jobs.transition(session, job_id, (JobStatus.validating_files,), to)
            await session.commit()

    api.http.portal.call(go)


def deliver_all(api: Harness) -> None:
    async def go() -> None:
        async with httpx.AsyncClient() as http:
            async with api.app.state.services.sessions() as session:
                due = await webhooks.due(session)
            for delivery_id in due:
                await webhook_delivery.deliver(api.app.state.services, http, delivery_id)

    api.http.portal.call(go)


def make_due(api: Harness) -> None:
    async def go() -> None:
        async with api.app.state.services.sessions() as session:
            await session.execute(update(WebhookDeliveryRow).values(next_attempt_at=0))
            await session.commit()

    api.http.portal.call(go)


def deliveries(api: Harness, hook_id: str) -> list[dict]:
    return api.http.get(f"/v1/webhooks/{hook_id}/deliveries", headers=auth(ADMIN_KEY)).json()["data"]


def test_finished_job_is_delivered_signed(open_api: Harness, webhook_receiver: Receiver) -> None:
    hook = create_hook(open_api, webhook_receiver.url).json()
    job = open_api.client().create_job(model=TINY, training_file=open_api.upload()["id"])
    finish(open_api, job.id, JobStatus.cancelled)
    assert [d["status"] for d in deliveries(open_api, hook["id"])] == ["pending"]  # in the outbox
    deliver_all(open_api)
    [(headers, body)] = webhook_receiver.received
    event = openai.OpenAI(api_key="unused").webhooks.unwrap(body, headers, secret=hook["secret"])
    assert event.type == "fine_tuning.job.cancelled" and event.data.id == job.id
    with pytest.raises(openai.InvalidWebhookSignatureError):
        openai.OpenAI(api_key="unused").webhooks.unwrap(body + b" ", headers, secret=hook["secret"])
    [record] = deliveries(open_api, hook["id"])
    assert record["status"] == "delivered" and record["attempts"] == 1 and record["last_status_code"] == 200
    deliver_all(open_api)
    assert len(webhook_receiver.received) == 1  # delivered once


def test_unsubscribed_events_are_not_sent(open_api: Harness, webhook_receiver: Receiver) -> None:
    hook = create_hook(open_api, webhook_receiver.url, events=["fine_tuning.job.succeeded"]).json()
    job = open_api.client().create_job(model=TINY, training_file=open_api.upload()["id"])
    finish(open_api, job.id, JobStatus.failed)
    assert deliveries(open_api, hook["id"]) == []


def test_failing_receiver_is_retried_with_backoff_then_given_up(
    open_api: Harness, webhook_receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    hook = create_hook(open_api, webhook_receiver.url).json()
    webhook_receiver.status_code = 503
    job = open_api.client().create_job(model=TINY, training_file=open_api.upload()["id"])
    finish(open_api, job.id, JobStatus.cancelled)
    deliver_all(open_api)
    [record] = deliveries(open_api, hook["id"])
    assert record["status"] == "pending" and record["attempts"] == 1 and record["last_error"] == "HTTP 503"
    deliver_all(open_api)  # not due yet: backoff
    assert len(webhook_receiver.received) == 1
    monkeypatch.setattr(webhooks, "BACKOFF_S", (0,))
    make_due(open_api)  # as if the first backoff had passed
    for _ in range(webhooks.MAX_ATTEMPTS):
        deliver_all(open_api)
    [record] = deliveries(open_api, hook["id"])
    assert record["status"] == "failed" and record["attempts"] == webhooks.MAX_ATTEMPTS
    assert len({h["webhook-id"] for h, _ in webhook_receiver.received}) == 1  # one id across retries
    assert open_api.client().jobs.get(job.id).status == JobStatus.cancelled  # the job never waited


def test_receiver_down_is_recorded(open_api: Harness) -> None:
    from tests.conftest import free_port

    hook = create_hook(open_api, f"http://127.0.0.1:{free_port()}/gone").json()
    job = open_api.client().create_job(model=TINY, training_file=open_api.upload()["id"])
    finish(open_api, job.id, JobStatus.cancelled)
    deliver_all(open_api)
    [record] = deliveries(open_api, hook["id"])
    assert record["status"] == "pending" and record["last_error"].startswith("ConnectError")


def test_delivery_refused_when_the_address_turned_private(api: Harness, webhook_receiver: Receiver) -> None:
    """Created while allowed, delivered after the operator closed private addresses: refused at send time."""
    api.settings.webhooks_allow_private = True
    hook = create_hook(api, webhook_receiver.url).json()
    api.settings.webhooks_allow_private = False
    job = api.client().create_job(model=TINY, training_file=api.upload()["id"])
    finish(api, job.id, JobStatus.cancelled)
    deliver_all(api)
    assert webhook_receiver.received == []
    assert deliveries(api, hook["id"])[0]["last_error"].startswith("refused")
