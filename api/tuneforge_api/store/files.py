"""Uploaded files; each row is visible only after its object is fully in storage."""

from __future__ import annotations

from typing import Any, NamedTuple

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import undefer

from tuneforge.types import FileObject, Page
from tuneforge_api.db.tables import FileRow
from tuneforge_api.store.pages import newest_first


def to_model(row: FileRow) -> FileObject:
    return FileObject(
        id=row.id,
        bytes=row.bytes,
        created_at=row.created_at,
        filename=row.filename,
        purpose=row.purpose,
        status=row.status,  # type: ignore[arg-type]
        status_details=row.status_details,
        validation=row.validation,  # type: ignore[arg-type]
    )


async def insert(session: AsyncSession, row: FileRow) -> FileObject:
    session.add(row)
    await session.flush()
    return to_model(row)


class FileFacts(NamedTuple):
    """What a job needs to know of its file, without the (large) validation report."""

    id: str
    purpose: str
    status: str
    data_format: str | None
    n_examples: int
    status_details: str | None


async def facts(session: AsyncSession, project_id: str, file_id: str) -> FileFacts | None:
    row = (
        await session.execute(
            select(
                FileRow.id,
                FileRow.purpose,
                FileRow.status,
                FileRow.data_format,
                FileRow.n_examples,
                FileRow.status_details,
            ).where(FileRow.project_id == project_id, FileRow.id == file_id)
        )
    ).first()
    return FileFacts(*row) if row else None


async def get_row(session: AsyncSession, project_id: str, file_id: str) -> FileRow | None:
    return await session.scalar(
        select(FileRow).where(FileRow.project_id == project_id, FileRow.id == file_id)
    )


async def list_page(
    session: AsyncSession, project_id: str, *, purpose: str | None, after: str | None, limit: int
) -> Page[FileObject]:
    where = [FileRow.project_id == project_id]
    if purpose:
        where.append(FileRow.purpose == purpose)
    return await newest_first(session, FileRow, where, to_model, after=after, limit=limit)


async def remove(session: AsyncSession, project_id: str, file_id: str) -> bool:
    result = await session.execute(
        delete(FileRow).where(FileRow.project_id == project_id, FileRow.id == file_id)
    )
    return result.rowcount > 0


async def get_row_with_profile(session: AsyncSession, project_id: str, file_id: str) -> FileRow | None:
    """The row with its (deferred) size profile loaded."""
    return await session.scalar(
        select(FileRow)
        .where(FileRow.project_id == project_id, FileRow.id == file_id)
        .options(undefer(FileRow.size_profile))
    )


async def uploaded(session: AsyncSession) -> list[tuple[str, str]]:
    """(project, file) of every file still waiting for its validation, in every project."""
    rows = await session.execute(
        select(FileRow.project_id, FileRow.id).where(FileRow.status == "uploaded").order_by(FileRow.seq)
    )
    return [(p, f) for p, f in rows.all()]


async def set_validated(session: AsyncSession, project_id: str, file_id: str, **values: Any) -> bool:
    """Record a validation outcome; a compare-and-set on ``uploaded``, so a second validator of the
    same file (a restart, another API process) changes nothing."""
    result = await session.execute(
        update(FileRow)
        .where(FileRow.project_id == project_id, FileRow.id == file_id, FileRow.status == "uploaded")
        .values(**values)
    )
    return result.rowcount > 0
