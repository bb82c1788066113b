"""/v1/webhooks: a project's endpoints for job events, and their delivery record."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.concurrency import run_in_threadpool

from tuneforge.types import Page
from tuneforge_api.deps import PrincipalDep, ServicesDep, SessionDep
from tuneforge_api.errors import ApiError, not_found
from tuneforge_api.idempotency import commit_or_replay, idempotent_request
from tuneforge_api.store import webhooks
from tuneforge_api.store.webhooks import JOB_EVENTS, Delivery, Webhook
from tuneforge_api.webhooks.signing import new_secret
from tuneforge_api.webhooks.urls import UnsafeUrl, check_url

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
MAX_PER_PROJECT = 20


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(min_length=1, max_length=2048)
    events: list[str] = Field(default_factory=lambda: list(JOB_EVENTS), min_length=1)


@router.post("", response_model=Webhook)
async def create(
    body: WebhookCreate,
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    services: ServicesDep,
) -> Webhook | JSONResponse:
    # The stored response leaves the signing secret out; a replay reads it from the webhook's row.
    async def restore(session: AsyncSession, stored: dict[str, Any]) -> str | None:
        row = await webhooks.get_row(session, principal.project_id, stored["id"])
        return row.secret if row is not None else None

    idem = idempotent_request(request, principal, body)
    if idem and (replayed := await idem.replay(session, restore)):
        return replayed
    unknown = sorted(set(body.events) - set(JOB_EVENTS))
    if unknown:
        raise ApiError(
            400, "invalid_event", f"Unknown events {unknown}; known: {list(JOB_EVENTS)}.", param="events"
        )
    try:
        await run_in_threadpool(check_url, body.url, allow_private=services.settings.webhooks_allow_private)
    except UnsafeUrl as exc:
        raise ApiError(400, "invalid_url", f"Webhook URL refused: {exc}.", param="url") from exc
    if len(await webhooks.list_for(session, principal.project_id)) >= MAX_PER_PROJECT:
        raise ApiError(400, "too_many_webhooks", f"A project has at most {MAX_PER_PROJECT} webhooks.")
    hook = await webhooks.create(
        session, principal.project_id, body.url, sorted(set(body.events)), new_secret()
    )
    if idem:
        await idem.save(session, hook, withhold="secret")
    if replayed := await commit_or_replay(session, idem, restore):
        return replayed
    return hook


@router.get("", response_model=Page[Webhook])
async def list_webhooks(principal: PrincipalDep, session: SessionDep) -> Page[Webhook]:
    rows = await webhooks.list_for(session, principal.project_id)
    return Page[Webhook](data=[webhooks.webhook_model(r) for r in rows])


@router.get("/{webhook_id}/deliveries", response_model=Page[Delivery])
async def deliveries(webhook_id: str, principal: PrincipalDep, session: SessionDep) -> Page[Delivery]:
    if await webhooks.get_row(session, principal.project_id, webhook_id) is None:
        raise not_found("webhook", webhook_id, "webhook_id")
    return Page[Delivery](data=await webhooks.recent_deliveries(session, webhook_id))


@router.delete("/{webhook_id}")
async def delete(webhook_id: str, principal: PrincipalDep, session: SessionDep) -> dict:
    if await webhooks.get_row(session, principal.project_id, webhook_id) is None:
        raise not_found("webhook", webhook_id, "webhook_id")
    await webhooks.remove(session, principal.project_id, webhook_id)
    await session.commit()
    return {"id": webhook_id, "object": "webhook_endpoint", "deleted": True}
