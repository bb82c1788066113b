"""/v1/fine_tuning/jobs: create, list, get, cancel, events, adapter."""

from __future__ import annotations

import tarfile
import tempfile
import time
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.exc import IntegrityError
from starlette.concurrency import run_in_threadpool

from tuneforge.storage import MANIFEST, adapter_prefix
from tuneforge.types import Checkpoint, Event, Job, JobCreate, JobStatus, Page
from tuneforge_api import adapter_urls
from tuneforge_api.checkpoints import list_checkpoints
from tuneforge_api.db.tables import JobRow
from tuneforge_api.deps import PrincipalDep, ServicesDep, SessionDep, release
from tuneforge_api.errors import ApiError, not_found
from tuneforge_api.event_stream import stream_events
from tuneforge_api.idempotency import idempotent_request
from tuneforge_api.job_create import create_job
from tuneforge_api.store import jobs

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
LimitQ = Annotated[int, Query(ge=1, le=100)]
NOT_STARTED = (JobStatus.validating_files, JobStatus.queued)


async def _row(session: SessionDep, principal: PrincipalDep, job_id: str) -> JobRow:
    row = await jobs.get_row(session, principal.project_id, job_id)
    if row is None:
        raise not_found("job", job_id, "fine_tuning_job_id")
    return row


@router.post("", response_model=Job)
async def create(
    body: JobCreate,
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    services: ServicesDep,
    background: BackgroundTasks,
) -> Job | JSONResponse:
    idem = idempotent_request(request, principal, body)
    if idem and (replayed := await idem.replay(session)):
        return replayed
    job = await create_job(session, services, principal, body)
    if idem:
        await idem.save(session, job)  # same transaction as the job: both or neither
    try:
        await session.commit()
    except IntegrityError:
        # The same key raced in from a concurrent retry and won; answer with its result.
        await session.rollback()
        if idem and (replayed := await idem.replay(session)):
            return replayed
        raise
    # After the response: the job is committed, and a lost enqueue is repaired by reconcile.
    background.add_task(services.queue.enqueue, "submit_job", job.id)
    return job


@router.get("", response_model=Page[Job])
async def list_jobs(
    principal: PrincipalDep, session: SessionDep, after: str | None = None, limit: LimitQ = 20
) -> Page[Job]:
    return await jobs.list_page(session, principal.project_id, after=after, limit=limit)


@router.get("/{job_id}", response_model=Job)
async def get_job(job_id: str, principal: PrincipalDep, session: SessionDep) -> Job:
    return jobs.to_model(await _row(session, principal, job_id))


@router.post("/{job_id}/cancel", response_model=Job)
async def cancel(job_id: str, principal: PrincipalDep, session: SessionDep, services: ServicesDep) -> Job:
    row = await _row(session, principal, job_id)
    status = JobStatus(row.status)
    if status == JobStatus.cancelled:
        return jobs.to_model(row)
    if status.is_finished():
        raise ApiError(400, "job_not_cancellable", f"Job {job_id} already {status.value}.")
    # Not started yet: nothing runs, so cancel at once. Running: the scheduler stops the trainer.
    if await jobs.transition(session, job_id, NOT_STARTED, JobStatus.cancelled):
        await jobs.add_event(session, job_id, "Job cancelled before it started")
    elif not row.cancel_requested:
        await jobs.update_fields(session, job_id, cancel_requested=True)
        await jobs.add_event(session, job_id, "Cancellation requested; stopping the trainer")
    await session.commit()
    await services.queue.enqueue("cancel_job", job_id)
    await session.refresh(row)
    return jobs.to_model(row)


@router.get(
    "/{job_id}/events",
    response_model=Page[Event],
    responses={200: {"content": {"text/event-stream": {}}, "description": "A page, or an SSE stream."}},
)
async def list_events(
    job_id: str,
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    services: ServicesDep,
    after: str | None = None,
    limit: LimitQ = 20,
    stream: bool = False,
) -> Page[Event] | StreamingResponse:
    """A page of events, newest first; with ``stream=true`` a live SSE stream, oldest first."""
    await _row(session, principal, job_id)
    if stream:
        await release(session)
        last = request.headers.get("last-event-id") or after
        return StreamingResponse(
            stream_events(services, job_id, last),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )
    return await jobs.events_page(session, job_id, after=after, limit=limit)


@router.get("/{job_id}/checkpoints", response_model=Page[Checkpoint])
async def checkpoints(
    job_id: str,
    principal: PrincipalDep,
    session: SessionDep,
    services: ServicesDep,
    after: str | None = None,
    limit: LimitQ = 10,
) -> Page[Checkpoint]:
    row = await _row(session, principal, job_id)
    found = await run_in_threadpool(list_checkpoints, services.storage, row)
    if after is not None:
        ids = [c.id for c in found]
        if after not in ids:
            raise ApiError(400, "invalid_cursor", f"unknown cursor {after!r}", param="after")
        found = found[ids.index(after) + 1 :]
    data = found[:limit]
    return Page[Checkpoint](
        data=data,
        has_more=len(found) > limit,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/{job_id}/adapter/urls", response_model=adapter_urls.AdapterUrls)
async def presigned_adapter(
    job_id: str, principal: PrincipalDep, session: SessionDep, services: ServicesDep
) -> adapter_urls.AdapterUrls:
    """Short-lived URLs of the adapter's files in the object store (s3:// with TUNEFORGE_PRESIGN)."""
    row = await _row(session, principal, job_id)
    prefix = adapter_prefix(principal.project_id, job_id)
    settings, storage = services.settings, services.storage
    if row.status != JobStatus.succeeded.value or not await run_in_threadpool(
        storage.exists, prefix + MANIFEST
    ):
        raise ApiError(404, "adapter_not_found", f"Job {job_id} has no adapter; it is {row.status}.")
    if not adapter_urls.can_presign(storage, settings.presign):
        raise adapter_urls.unavailable()
    await release(session)
    return await run_in_threadpool(
        adapter_urls.presigned_urls, storage, prefix, job_id, settings.presign_ttl_s
    )


@router.get(
    "/{job_id}/adapter",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": {}}, "description": "The adapter folder as a tar."}},
)
async def download_adapter(
    job_id: str, principal: PrincipalDep, session: SessionDep, services: ServicesDep
) -> StreamingResponse:
    row = await _row(session, principal, job_id)
    prefix = adapter_prefix(principal.project_id, job_id)
    storage = services.storage
    # An adapter without its manifest does not exist (DESIGN.md, storage layout).
    if row.status != JobStatus.succeeded.value or not await run_in_threadpool(
        storage.exists, prefix + MANIFEST
    ):
        raise ApiError(404, "adapter_not_found", f"Job {job_id} has no adapter; it is {row.status}.")

    def build_archive():
        tmp = tempfile.SpooledTemporaryFile(max_size=8 << 20)
        with tarfile.open(fileobj=tmp, mode="w") as tar:
            for key in storage.list(prefix):
                info = tarfile.TarInfo(key[len(prefix) :])
                info.size = storage.size(key)
                info.mtime = int(time.time())
                with storage.open_read(key) as fh:
                    tar.addfile(info, fh)
        size = tmp.tell()
        tmp.seek(0)
        return tmp, size

    await release(session)
    archive, size = await run_in_threadpool(build_archive)

    def chunks():
        with archive:
            while chunk := archive.read(1 << 20):
                yield chunk

    return StreamingResponse(
        chunks(),
        media_type="application/x-tar",
        headers={
            "content-length": str(size),
            "content-disposition": f'attachment; filename="{job_id}-adapter.tar"',
        },
    )
