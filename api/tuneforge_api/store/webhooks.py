"""Webhook endpoints and the delivery outbox."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from tuneforge_api.db.tables import WebhookDeliveryRow, WebhookRow
from tuneforge_api.store.ids import new_id, now

JOB_EVENTS = ("fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled")
MAX_ATTEMPTS = 8
# Seconds before attempt n+1: about 1 h 20 min of retries in all, then the delivery is given up.
BACKOFF_S = (5, 30, 120, 300, 600, 1200, 2400)


class Webhook(BaseModel):
    id: str
    object: str = "webhook_endpoint"
    url: str
    events: list[str]
    created_at: int
    secret: str | None = None  # returned once, at creation


class Delivery(BaseModel):
    id: str
    object: str = "webhook_delivery"
    event_type: str
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    created_at: int
    delivered_at: int | None
    data: dict[str, Any]


def webhook_model(row: WebhookRow, *, with_secret: bool = False) -> Webhook:
    return Webhook(
        id=row.id,
        url=row.url,
        events=row.events,
        created_at=row.created_at,
        secret=row.secret if with_secret else None,
    )


def delivery_model(row: WebhookDeliveryRow) -> Delivery:
    return Delivery(
        id=row.id,
        event_type=row.event_type,
        status=row.status,
        attempts=row.attempts,
        last_status_code=row.last_status_code,
        last_error=row.last_error,
        created_at=row.created_at,
        delivered_at=row.delivered_at,
        data=row.payload.get("data", {}),
    )


async def create(session: AsyncSession, project_id: str, url: str, events: list[str], secret: str) -> Webhook:
    row = WebhookRow(
        id=new_id("wh"), project_id=project_id, url=url, secret=secret, events=events, created_at=now()
    )
    session.add(row)
    await session.flush()
    return webhook_model(row, with_secret=True)


async def list_for(session: AsyncSession, project_id: str) -> list[WebhookRow]:
    return list(
        await session.scalars(
            select(WebhookRow).where(WebhookRow.project_id == project_id).order_by(WebhookRow.seq.desc())
        )
    )


async def get_row(session: AsyncSession, project_id: str, webhook_id: str) -> WebhookRow | None:
    return await session.scalar(
        select(WebhookRow).where(WebhookRow.project_id == project_id, WebhookRow.id == webhook_id)
    )


async def remove(session: AsyncSession, project_id: str, webhook_id: str) -> None:
    await session.execute(delete(WebhookDeliveryRow).where(WebhookDeliveryRow.webhook_id == webhook_id))
    await session.execute(
        delete(WebhookRow).where(WebhookRow.project_id == project_id, WebhookRow.id == webhook_id)
    )


async def recent_deliveries(session: AsyncSession, webhook_id: str, limit: int = 50) -> list[Delivery]:
    rows = await session.scalars(
        select(WebhookDeliveryRow)
        .where(WebhookDeliveryRow.webhook_id == webhook_id)
        .order_by(WebhookDeliveryRow.seq.desc())
        .limit(limit)
    )
    return [delivery_model(r) for r in rows]


async def record_job_event(session: AsyncSession, project_id: str, job_id: str, status: str) -> None:
    """Queue ``fine_tuning.job.<status>`` for every subscribed endpoint of the project. Runs in
    the transaction that finishes the job, so the event is sent if and only if the job ended."""
    event_type = f"fine_tuning.job.{status}"
    ts = now()
    for hook in await list_for(session, project_id):
        if event_type not in hook.events:
            continue
        event_id = new_id("evt")
        payload = {
            "id": event_id,
            "object": "event",
            "type": event_type,
            "created_at": ts,
            "data": {"id": job_id},
        }
        session.add(
            WebhookDeliveryRow(
                id=event_id,
                webhook_id=hook.id,
                project_id=project_id,
                event_type=event_type,
                payload=payload,
                status="pending",
                attempts=0,
                next_attempt_at=ts,
                created_at=ts,
            )
        )
    await session.flush()


async def due(session: AsyncSession, limit: int = 100) -> list[str]:
    return list(
        await session.scalars(
            select(WebhookDeliveryRow.id)
            .where(WebhookDeliveryRow.status == "pending", WebhookDeliveryRow.next_attempt_at <= now())
            .order_by(WebhookDeliveryRow.next_attempt_at)
            .limit(limit)
        )
    )


async def claim(session: AsyncSession, delivery_id: str) -> tuple[WebhookDeliveryRow, WebhookRow] | None:
    row = await session.scalar(select(WebhookDeliveryRow).where(WebhookDeliveryRow.id == delivery_id))
    if row is None or row.status != "pending" or row.next_attempt_at > now():
        return None
    hook = await session.scalar(select(WebhookRow).where(WebhookRow.id == row.webhook_id))
    return (row, hook) if hook is not None else None


def body(row: WebhookDeliveryRow) -> bytes:
    return json.dumps(row.payload, separators=(",", ":")).encode()


async def record_attempt(
    session: AsyncSession, row: WebhookDeliveryRow, *, ok: bool, status_code: int | None, error: str | None
) -> None:
    attempts = row.attempts + 1
    values: dict[str, Any] = {"attempts": attempts, "last_status_code": status_code, "last_error": error}
    if ok:
        values.update(status="delivered", delivered_at=now())
    elif attempts >= MAX_ATTEMPTS:
        values.update(status="failed")
    else:
        values.update(next_attempt_at=now() + BACKOFF_S[min(attempts - 1, len(BACKOFF_S) - 1)])
    await session.execute(
        update(WebhookDeliveryRow)
        .where(WebhookDeliveryRow.id == row.id, WebhookDeliveryRow.status == "pending")
        .values(**values)
    )
