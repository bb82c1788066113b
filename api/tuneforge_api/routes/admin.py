"""/v1/admin: projects and API keys (admin keys only)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError

from tuneforge.types import ApiKey, Page, Project
from tuneforge_api.deps import AdminDep, ServicesDep, SessionDep
from tuneforge_api.errors import ApiError, not_found
from tuneforge_api.idempotency import commit_or_replay, idempotent_request
from tuneforge_api.store import projects

router = APIRouter(prefix="/v1/admin", tags=["admin"])


class ProjectCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("default", min_length=1, max_length=128)
    role: Literal["admin", "member"] = "member"


@router.post("/projects", response_model=Project)
async def create_project(
    body: ProjectCreate, request: Request, principal: AdminDep, session: SessionDep
) -> Project | JSONResponse:
    idem = idempotent_request(request, principal, body)
    if idem and (replayed := await idem.replay(session)):
        return replayed
    try:
        project = await projects.create_project(session, body.name)
        if idem:
            await idem.save(session, project)
        if replayed := await commit_or_replay(session, idem):
            return replayed
    except IntegrityError as exc:
        raise ApiError(400, "project_exists", f"A project named {body.name!r} exists.", param="name") from exc
    return project


@router.get("/projects", response_model=Page[Project])
async def list_projects(_: AdminDep, session: SessionDep) -> Page[Project]:
    return Page[Project](data=await projects.list_projects(session))


@router.post("/projects/{project_id}/api_keys", response_model=ApiKey)
async def create_key(
    project_id: str, body: KeyCreate, request: Request, principal: AdminDep, session: SessionDep
) -> ApiKey | JSONResponse:
    if await projects.get_project(session, project_id) is None:
        raise not_found("project", project_id, "project_id")
    # Only the key's hash is stored, so a replay cannot show the secret again: it answers 409.
    idem = idempotent_request(request, principal, body)
    if idem and (replayed := await idem.replay(session)):
        return replayed
    key = await projects.create_key(session, project_id, name=body.name, role=body.role)
    if idem:
        await idem.save(session, key, withhold="key")
    if replayed := await commit_or_replay(session, idem):
        return replayed
    return key


@router.delete("/projects/{project_id}/api_keys/{key_id}")
async def revoke_key(
    project_id: str, key_id: str, _: AdminDep, session: SessionDep, services: ServicesDep
) -> dict:
    """Revoke a key; for instance one whose create response was lost, since its secret cannot be
    shown again. This process forgets it at once; other processes within their cache's seconds."""
    if not await projects.revoke_key(session, project_id, key_id):
        raise not_found("api_key", key_id, "key_id")
    await session.commit()
    services.auth_cache.clear()
    return {"id": key_id, "object": "api_key", "deleted": True}
