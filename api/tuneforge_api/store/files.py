"""Uploaded files; each row is visible only after its object is fully in storage."""

from __future__ import annotations

from typing import NamedTuple

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

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


async def facts(session: AsyncSession, project_id: str, file_id: str) -> FileFacts | None:
    row = (
        await session.execute(
            select(
                FileRow.id, FileRow.purpose, FileRow.status, FileRow.data_format, FileRow.n_examples
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
