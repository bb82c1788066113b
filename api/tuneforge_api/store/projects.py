"""Projects and their API keys."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from tuneforge.types import ApiKey, Project
from tuneforge_api.db.tables import ApiKeyRow, ProjectRow
from tuneforge_api.store.ids import hash_secret, new_id, new_secret, now, same_hash

DEFAULT_PROJECT = "default"
# A labeler key may only rank answers in its project's feedback sessions (deps.get_principal).
LABELER = "labeler"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a project's key, with its role."""

    project_id: str
    key_id: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def is_labeler(self) -> bool:
        return self.role == LABELER


def _project(row: ProjectRow) -> Project:
    return Project(id=row.id, name=row.name, created_at=row.created_at)


async def create_project(session: AsyncSession, name: str) -> Project:
    row = ProjectRow(id=new_id("proj"), name=name, created_at=now())
    session.add(row)
    await session.flush()
    return _project(row)


async def get_project_by_name(session: AsyncSession, name: str) -> Project | None:
    row = await session.scalar(select(ProjectRow).where(ProjectRow.name == name))
    return _project(row) if row else None


async def get_project(session: AsyncSession, project_id: str) -> Project | None:
    row = await session.scalar(select(ProjectRow).where(ProjectRow.id == project_id))
    return _project(row) if row else None


async def list_projects(session: AsyncSession) -> list[Project]:
    rows = await session.scalars(select(ProjectRow).order_by(ProjectRow.seq))
    return [_project(r) for r in rows]


async def create_key(
    session: AsyncSession, project_id: str, *, name: str, role: str, secret: str | None = None
) -> ApiKey:
    """Store only the hash; the secret is returned in this one response."""
    secret = secret or new_secret("tf")
    row = ApiKeyRow(
        id=new_id("key"),
        project_id=project_id,
        name=name,
        role=role,
        key_hash=hash_secret(secret),
        created_at=now(),
        revoked=False,
    )
    session.add(row)
    await session.flush()
    return ApiKey(
        id=row.id, project_id=project_id, name=name, role=role, created_at=row.created_at, key=secret
    )


async def authenticate(session: AsyncSession, secret: str) -> Principal | None:
    digest = hash_secret(secret)
    row = await session.scalar(select(ApiKeyRow).where(ApiKeyRow.key_hash == digest))
    if row is None or row.revoked or not same_hash(row.key_hash, digest):
        return None
    return Principal(project_id=row.project_id, key_id=row.id, role=row.role)


async def has_any_key(session: AsyncSession) -> bool:
    return await session.scalar(select(ApiKeyRow.seq).limit(1)) is not None


async def key_names(session: AsyncSession, project_id: str, key_ids: list[str]) -> dict[str, str]:
    """Key id -> name, for this project's keys among ``key_ids``."""
    if not key_ids:
        return {}
    rows = await session.execute(
        select(ApiKeyRow.id, ApiKeyRow.name).where(
            ApiKeyRow.project_id == project_id, ApiKeyRow.id.in_(key_ids)
        )
    )
    return {key_id: name for key_id, name in rows}


async def revoke_key(session: AsyncSession, project_id: str, key_id: str) -> bool:
    """Mark the project's key revoked; False when the project has no such key."""
    row = await session.scalar(
        select(ApiKeyRow).where(ApiKeyRow.project_id == project_id, ApiKeyRow.id == key_id)
    )
    if row is None:
        return False
    row.revoked = True
    await session.flush()
    return True
