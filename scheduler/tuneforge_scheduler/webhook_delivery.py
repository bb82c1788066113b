"""Sends due webhook deliveries. The outbox row is the record: each attempt is one short
task, its outcome is written back, and the next attempt is scheduled with backoff. A
receiver that is down only delays its own deliveries; jobs never wait on it."""

from __future__ import annotations

import logging

import httpx
from arq.connections import ArqRedis
from starlette.concurrency import run_in_threadpool

from tuneforge_api.services import Services
from tuneforge_api.store import webhooks
from tuneforge_api.store.ids import now
from tuneforge_api.webhooks import signing
from tuneforge_api.webhooks.urls import UnsafeUrl, check_url

log = logging.getLogger("tuneforge.webhooks")
TIMEOUT_S = 10.0


async def deliver(services: Services, http: httpx.AsyncClient, delivery_id: str) -> None:
    async with services.sessions() as session:
        claimed = await webhooks.claim(session, delivery_id)
    if claimed is None:
        return  # delivered, given up, not due yet, or its endpoint was deleted
    row, hook = claimed
    body = webhooks.body(row)
    status_code: int | None = None
    try:
        # Checked again at send time: the name may resolve elsewhere than at creation.
        await run_in_threadpool(check_url, hook.url, allow_private=services.settings.webhooks_allow_private)
        response = await http.post(
            hook.url,
            content=body,
            headers=signing.headers(hook.secret, row.id, now(), body),
            timeout=TIMEOUT_S,
            follow_redirects=False,
        )
        status_code = response.status_code
        ok, error = 200 <= status_code < 300, None if 200 <= status_code < 300 else f"HTTP {status_code}"
    except UnsafeUrl as exc:
        ok, error = False, f"refused: {exc}"
    except httpx.HTTPError as exc:
        ok, error = False, f"{type(exc).__name__}: {exc}"[:500]
    async with services.sessions() as session:
        await webhooks.record_attempt(session, row, ok=ok, status_code=status_code, error=error)
        await session.commit()
    if not ok:
        log.info("webhook delivery %s attempt %d failed: %s", row.id, row.attempts + 1, error)


async def enqueue_due(services: Services, redis: ArqRedis) -> int:
    async with services.sessions() as session:
        due = await webhooks.due(session)
    for delivery_id in due:
        await redis.enqueue_job("deliver_webhook", delivery_id, _job_id=f"deliver_webhook:{delivery_id}")
    return len(due)
