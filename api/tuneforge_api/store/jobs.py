"""Fine-tuning jobs and their events.

State changes go through ``transition``, a compare-and-set on the status column, so the
API, the arq tasks and the reconcile loop can race without losing or reviving a job.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert as sql_insert
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from tuneforge.types import ErrorInfo, Event, Job, JobStatus, Page
from tuneforge_api.db.tables import JobEventRow, JobRow
from tuneforge_api.store import webhooks
from tuneforge_api.store.ids import new_id, now
from tuneforge_api.store.pages import newest_first

_INSERT_JOB = sql_insert(JobRow)
_INSERT_EVENT = sql_insert(JobEventRow)
ACTIVE = (JobStatus.validating_files.value, JobStatus.queued.value, JobStatus.running.value)


def to_model(row: JobRow) -> Job:
    method = row.method or {}
    params = method.get(method.get("type", ""), {}) or {}
    return Job(
        id=row.id,
        created_at=row.created_at,
        finished_at=row.finished_at,
        estimated_finish=row.estimated_finish if row.status == "running" else None,
        model=row.model,
        fine_tuned_model=row.fine_tuned_model,
        organization_id=row.project_id,
        status=JobStatus(row.status),
        training_file=row.training_file,
        validation_file=row.validation_file,
        hyperparameters=params.get("hyperparameters", {}),
        method=method,
        trained_tokens=row.trained_tokens,
        error=ErrorInfo(**row.error) if row.error else None,
        seed=row.seed,
        metadata=row.metadata_,
        user_provided_suffix=row.suffix,
        lora=row.lora,
        quantization=row.quantization,
        resources=row.resources,
    )


def event_model(row: JobEventRow) -> Event:
    return Event(
        id=row.id,
        created_at=row.created_at,
        level=row.level,  # type: ignore[arg-type]
        message=row.message,
        type=row.type,  # type: ignore[arg-type]
        data=row.data,
    )


async def insert(session: AsyncSession, values: dict[str, Any]) -> Job:
    """A Core insert: the ORM unit of work costs more than the whole rest of a create."""
    # Parameters, not .values(): the statement stays the same object, so its compiled form is cached.
    await session.execute(_INSERT_JOB, [values])
    return to_model(JobRow(**values))


async def get_row(session: AsyncSession, project_id: str, job_id: str) -> JobRow | None:
    return await session.scalar(select(JobRow).where(JobRow.project_id == project_id, JobRow.id == job_id))


async def get_row_any_project(session: AsyncSession, job_id: str) -> JobRow | None:
    """For the scheduler and the trainer's token check, which act on a job id they were given."""
    return await session.scalar(select(JobRow).where(JobRow.id == job_id))


async def list_page(session: AsyncSession, project_id: str, *, after: str | None, limit: int) -> Page[Job]:
    return await newest_first(
        session, JobRow, [JobRow.project_id == project_id], to_model, after=after, limit=limit
    )


async def active_rows(session: AsyncSession) -> list[JobRow]:
    return list(await session.scalars(select(JobRow).where(JobRow.status.in_(ACTIVE)).order_by(JobRow.seq)))


async def transition(
    session: AsyncSession, job_id: str, from_: tuple[JobStatus, ...], to: JobStatus, **values: Any
) -> bool:
    """Move a job to ``to`` only if it is still in one of ``from_``; True if it moved."""
    ts = now()
    values.setdefault("updated_at", ts)
    if to.is_finished():
        values.setdefault("finished_at", ts)
        values.setdefault("token_hash", None)  # the trainer's token dies with the job
    result = await session.execute(
        update(JobRow)
        .where(JobRow.id == job_id, JobRow.status.in_([s.value for s in from_]))
        .values(status=to.value, **values)
        .execution_options(synchronize_session=False)
    )
    moved = result.rowcount == 1
    if moved and to.is_finished():
        # The webhook outbox is written in the same transaction: an event exists iff the job ended.
        project_id = await session.scalar(select(JobRow.project_id).where(JobRow.id == job_id))
        await webhooks.record_job_event(session, project_id, job_id, to.value)
    return moved


async def update_fields(session: AsyncSession, job_id: str, **values: Any) -> None:
    values.setdefault("updated_at", now())
    await session.execute(
        update(JobRow)
        .where(JobRow.id == job_id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


async def add_event(
    session: AsyncSession,
    job_id: str,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> None:
    await session.execute(
        sql_insert(JobEventRow).values(
            id=new_id("ftevent"),
            job_id=job_id,
            created_at=now(),
            level=level,
            type=type,
            message=message,
            data=data,
        )
    )


async def events_page(session: AsyncSession, job_id: str, *, after: str | None, limit: int) -> Page[Event]:
    return await newest_first(
        session, JobEventRow, [JobEventRow.job_id == job_id], event_model, after=after, limit=limit
    )
