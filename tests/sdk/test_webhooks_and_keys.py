"""``client.webhooks`` and ``client.admin.revoke_key``, sync and async, against the real app
served by uvicorn on loopback (``live_url``), on the same database as the ``api`` harness."""

from __future__ import annotations

import uuid

import pytest

from tests.api.conftest import Harness, api, live_url  # noqa: F401  (fixtures)
from tests.conftest import ADMIN_KEY, Receiver
from tuneforge import AsyncClient, AuthenticationError, BadRequestError, Client, NotFoundError
from tuneforge._shared import Webhook, WebhookDelivery

TINY = "tuneforge/tiny-llama"


def test_webhooks_create_list_deliveries_delete(
    api: Harness,  # noqa: F811
    live_url: str,  # noqa: F811
    webhook_receiver: Receiver,
) -> None:
    api.settings.webhooks_allow_private = True  # the receiver listens on 127.0.0.1
    client = Client(base_url=live_url, api_key=ADMIN_KEY, max_retries=0)
    hook = client.webhooks.create(webhook_receiver.url, events=["fine_tuning.job.cancelled"])
    assert isinstance(hook, Webhook) and hook.url == webhook_receiver.url
    assert hook.events == ["fine_tuning.job.cancelled"] and (hook.secret or "").startswith("whsec_")
    everything = client.webhooks.create(webhook_receiver.url)  # events left out: all job events
    assert set(everything.events) >= {"fine_tuning.job.succeeded", "fine_tuning.job.cancelled"}
    listed = client.webhooks.list()
    assert {h.id for h in listed} == {hook.id, everything.id}
    assert all(h.secret is None for h in listed)  # the secret is shown once

    assert client.webhooks.deliveries(hook.id) == []
    job = client.create_job(model=TINY, training_file=api.upload()["id"])
    client.jobs.cancel(job.id)
    [delivery] = client.webhooks.deliveries(hook.id)
    assert isinstance(delivery, WebhookDelivery)
    assert delivery.event_type == "fine_tuning.job.cancelled" and delivery.status == "pending"

    with pytest.raises(BadRequestError) as bad:
        client.webhooks.create(webhook_receiver.url, events=["fine_tuning.job.bogus"])
    assert bad.value.code == "invalid_event"
    assert client.webhooks.delete(hook.id) is True
    assert [h.id for h in client.webhooks.list()] == [everything.id]
    for gone in (lambda: client.webhooks.delete(hook.id), lambda: client.webhooks.deliveries(hook.id)):
        with pytest.raises(NotFoundError):
            gone()


def test_webhook_to_a_private_address_is_refused(api: Harness, live_url: str) -> None:  # noqa: F811
    client = Client(base_url=live_url, api_key=ADMIN_KEY, max_retries=0)
    with pytest.raises(BadRequestError) as exc:
        client.webhooks.create("http://127.0.0.1:9/hook")
    assert exc.value.code == "invalid_url" and client.webhooks.list() == []


def test_revoke_key(api: Harness, live_url: str) -> None:  # noqa: F811
    admin = Client(base_url=live_url, api_key=ADMIN_KEY, max_retries=0)
    project = admin.admin.create_project(f"revoke-{uuid.uuid4().hex[:6]}")
    key = admin.admin.create_key(project.id, name="ci")
    member = Client(base_url=live_url, api_key=key.key or "", max_retries=0)
    assert member.files.list() == []
    assert admin.admin.revoke_key(project.id, key.id) is True
    with pytest.raises(AuthenticationError):
        member.files.list()
    assert admin.admin.revoke_key(project.id, key.id) is True  # revoking again is harmless
    with pytest.raises(NotFoundError):
        admin.admin.revoke_key(project.id, "key-nope")
    with pytest.raises(NotFoundError):
        admin.admin.revoke_key("proj-nope", key.id)  # the key belongs to another project


async def test_async_webhooks_and_revoke_key(
    api: Harness,  # noqa: F811
    live_url: str,  # noqa: F811
    webhook_receiver: Receiver,
) -> None:
    api.settings.webhooks_allow_private = True
    async with AsyncClient(base_url=live_url, api_key=ADMIN_KEY, max_retries=0) as client:
        hook = await client.webhooks.create(webhook_receiver.url, events=["fine_tuning.job.cancelled"])
        assert (hook.secret or "").startswith("whsec_")
        assert [(h.id, h.secret) for h in await client.webhooks.list()] == [(hook.id, None)]
        job = await client.create_job(model=TINY, training_file=api.upload()["id"])
        await client.jobs.cancel(job.id)
        [delivery] = await client.webhooks.deliveries(hook.id)
        assert delivery.event_type == "fine_tuning.job.cancelled"
        assert await client.webhooks.delete(hook.id) is True
        assert await client.webhooks.list() == []
        with pytest.raises(NotFoundError):
            await client.webhooks.deliveries(hook.id)

        project = await client.admin.create_project(f"revoke-{uuid.uuid4().hex[:6]}")
        key = await client.admin.create_key(project.id)
        assert await client.admin.revoke_key(project.id, key.id) is True
        async with AsyncClient(base_url=live_url, api_key=key.key or "", max_retries=0) as member:
            with pytest.raises(AuthenticationError):
                await member.files.list()
        with pytest.raises(NotFoundError):
            await client.admin.revoke_key(project.id, "key-nope")


def test_sync_and_async_surfaces_match() -> None:
    sync, async_ = Client(api_key="k"), AsyncClient(api_key="k")
    for name in ("webhooks", "admin"):
        public = lambda obj: {m for m in dir(obj) if not m.startswith("_")}  # noqa: E731
        assert public(getattr(sync, name)) == public(getattr(async_, name)), name
