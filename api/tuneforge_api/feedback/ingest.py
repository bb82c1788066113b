"""From a finished sample job to a ready session (or a failed / cancelled one).

The sample job publishes ``samples.jsonl`` and then ``manifest.json`` under
``samples_prefix``; samples without a manifest do not exist. ``settle`` brings a
``generating`` session in line with its job, and is safe to run any number of times, late, or
concurrently (the scheduler runs it when the job ends, every read of the session runs it while
it is generating): the session moves with a compare-and-set on its status, and the items are
written in the same transaction as that move, so they exist exactly when the session is ready.
"""

from __future__ import annotations

import json
import logging

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.concurrency import run_in_threadpool

from tuneforge.storage import MANIFEST, Storage, job_prefix
from tuneforge.types import JobStatus, SampleRecord
from tuneforge_api.db.tables import FeedbackSessionRow
from tuneforge_api.services import Services
from tuneforge_api.store import feedback, jobs

log = logging.getLogger("tuneforge.feedback")
SAMPLES_FILE = "samples.jsonl"


def samples_prefix(project_id: str, job_id: str) -> str:
    return job_prefix(project_id, job_id) + "samples/"


class SamplesInvalid(Exception):
    """A line of the published samples is not a sample record."""

    def __init__(self, line: int) -> None:
        super().__init__(f"Line {line} of the published samples is not a valid sample record.")


def read_samples(storage: Storage, project_id: str, job_id: str) -> list[SampleRecord] | None:
    """The job's samples, or None when they are not (completely) published; SamplesInvalid
    when they are but a line does not parse."""
    prefix = samples_prefix(project_id, job_id)
    try:
        json.loads(storage.get_bytes(prefix + MANIFEST))
        lines = storage.get_bytes(prefix + SAMPLES_FILE).splitlines()
    except (FileNotFoundError, ValueError):
        return None
    records = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                records.append(SampleRecord.model_validate_json(line))
            except ValidationError as exc:
                raise SamplesInvalid(number) from exc
    return records


async def settle(session: AsyncSession, storage: Storage, row: FeedbackSessionRow) -> bool:
    """Move a generating session on if its job has ended; True if it moved. Commits."""
    if row.status != "generating":
        return False
    job = await jobs.get_row(session, row.project_id, row.job_id)
    status = JobStatus(job.status) if job else JobStatus.failed
    if not status.is_finished():
        return False
    # End the read transaction first: on SQLite a reader that then writes can lose its snapshot.
    await session.commit()
    if status == JobStatus.succeeded:
        moved = await _ingest(session, storage, row)
    elif status == JobStatus.failed:
        default = {"code": "generation_failed", "message": "The sample job failed."}
        moved = await feedback.transition(
            session, row.id, "failed", error=(job.error if job else None) or default
        )
    else:
        moved = await feedback.transition(session, row.id, "cancelled")
    await session.commit()
    await session.refresh(row)  # also when another request or the scheduler settled it first
    return moved


async def _ingest(session: AsyncSession, storage: Storage, row: FeedbackSessionRow) -> bool:
    """The job succeeded: the session becomes ready with its items, or fails on its samples."""
    try:
        records = await run_in_threadpool(read_samples, storage, row.project_id, row.job_id)
    except SamplesInvalid as exc:  # fails the session once, rather than every read of it
        log.warning("feedback session %s: %s", row.id, exc)
        error = {"code": "samples_invalid", "message": str(exc)}
        return await feedback.transition(session, row.id, "failed", error=error)
    if records is None:
        error = {"code": "samples_missing", "message": "The sample job published no samples."}
        return await feedback.transition(session, row.id, "failed", error=error)
    moved = await feedback.transition(session, row.id, "ready")
    if moved:
        await feedback.insert_items(session, row.id, records)
    return moved


async def settle_for_job(services: Services, job_id: str) -> None:
    """The scheduler's hook when a sample job ends."""
    async with services.sessions() as session:
        row = await feedback.get_row_by_job(session, job_id)
        if row is not None:
            await settle(session, services.storage, row)
