"""Uploaded files; each row is visible only after its object is fully in storage."""

from __future__ import annotations

from typing import Any, NamedTuple

from sqlalchemy import delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import undefer

from tuneforge.types import FileObject, Page
from tuneforge_api.db.tables import FileRow, JobRow
from tuneforge_api.store import jobs
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


async def facts(
    session: AsyncSession, project_id: str, file_id: str, *, hold: bool = False
) -> FileFacts | None:
    """The file's facts. ``hold=True`` (job create) takes a share lock on its row until the
    transaction ends, so a concurrent ``delete_unless_in_use`` waits for the new job and sees it."""
    query = select(
        FileRow.id,
        FileRow.purpose,
        FileRow.status,
        FileRow.data_format,
        FileRow.n_examples,
        FileRow.status_details,
    ).where(FileRow.project_id == project_id, FileRow.id == file_id)
    if hold:
        query = query.with_for_update(read=True)  # FOR SHARE on PostgreSQL; SQLite: see below
    row = (await session.execute(query)).first()
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


async def jobs_using(session: AsyncSession, project_id: str, file_id: str) -> list[str]:
    """Ids of the unfinished jobs that train or evaluate on the file."""
    rows = await session.scalars(
        select(JobRow.id)
        .where(
            JobRow.project_id == project_id,
            JobRow.status.in_(jobs.ACTIVE),
            or_(JobRow.training_file == file_id, JobRow.validation_file == file_id),
        )
        .order_by(JobRow.seq)
        .limit(10)
    )
    return list(rows)


class FileInUse(Exception):
    def __init__(self, job_ids: list[str]) -> None:
        super().__init__(", ".join(job_ids))
        self.job_ids = job_ids


async def delete_unless_in_use(session: AsyncSession, project_id: str, file_id: str) -> bool:
    """Delete the row (uncommitted) unless an unfinished job uses the file (``FileInUse``);
    False when there is no such file.

    Race-safe with job create: on PostgreSQL the row is locked FOR UPDATE before the jobs are
    looked up, and create holds a share lock on it (``facts(hold=True)``) until it commits; so
    the lookup, a new statement under READ COMMITTED, runs after any such create has committed
    (and sees its job), and a create that comes later waits, then finds no file. On SQLite a
    process has one connection, so the two transactions cannot interleave at all.
    """
    locked = await session.scalar(
        select(FileRow.id).where(FileRow.project_id == project_id, FileRow.id == file_id).with_for_update()
    )
    if locked is None:
        return False
    if users := await jobs_using(session, project_id, file_id):
        raise FileInUse(users)
    return await remove(session, project_id, file_id)


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
