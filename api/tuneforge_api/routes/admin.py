"""/v1/admin: projects and API keys (admin keys only)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError

from tuneforge.types import ApiKey, Page, Project
from tuneforge_api.deps import AdminDep, SessionDep
from tuneforge_api.errors import ApiError, not_found
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
async def create_project(body: ProjectCreate, _: AdminDep, session: SessionDep) -> Project:
    try:
        project = await projects.create_project(session, body.name)
        await session.commit()
    except IntegrityError as exc:
        raise ApiError(400, "project_exists", f"A project named {body.name!r} exists.", param="name") from exc
    return project


@router.get("/projects", response_model=Page[Project])
async def list_projects(_: AdminDep, session: SessionDep) -> Page[Project]:
    return Page[Project](data=await projects.list_projects(session))


@router.post("/projects/{project_id}/api_keys", response_model=ApiKey)
async def create_key(project_id: str, body: KeyCreate, _: AdminDep, session: SessionDep) -> ApiKey:
    if await projects.get_project(session, project_id) is None:
        raise not_found("project", project_id, "project_id")
    key = await projects.create_key(session, project_id, name=body.name, role=body.role)
    await session.commit()
    return key
