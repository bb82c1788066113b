"""/v1/feedback: sessions that sample K answers per prompt, labelers who rank them, and the
export of the rankings as a reward-model training file.

Labeler keys reach only the routes marked ``LABELER_ALLOWED`` (see ``deps.get_principal``).
"""

from __future__ import annotations

import hmac
import io
import secrets
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.concurrency import run_in_threadpool

from tuneforge.storage import file_key
from tuneforge.types import (
    FeedbackAnswer,
    FeedbackExport,
    FeedbackItem,
    FeedbackLabel,
    FeedbackMessage,
    FeedbackSession,
    FeedbackSessionCreate,
    FileObject,
    JobStatus,
    LabelCreate,
    LabelerKey,
    LabelerKeyCreate,
    Method,
    MethodType,
    NextItem,
    Page,
)
from tuneforge_api import quotas
from tuneforge_api.db.tables import FeedbackSessionRow, FileRow
from tuneforge_api.deps import LABELER_ALLOWED, PrincipalDep, ServicesDep, SessionDep, release
from tuneforge_api.errors import ApiError, not_found
from tuneforge_api.feedback.export import Answer, LabelView, export_record, to_jsonl
from tuneforge_api.feedback.ingest import settle
from tuneforge_api.feedback.labels import LabelError, check_label, shuffled_for
from tuneforge_api.idempotency import commit_or_replay, idempotent_request
from tuneforge_api.job_create import create_sample_job
from tuneforge_api.services import Services
from tuneforge_api.store import feedback, files, jobs, projects
from tuneforge_api.store.ids import new_id, now
from tuneforge_api.store.projects import Principal
from tuneforge_api.ui import session as ui_session
from tuneforge_api.validation import validate_jsonl
from tuneforge_api.validation.service import ValidationSettings, file_outcome, token_sample

router = APIRouter(prefix="/v1/feedback", tags=["feedback"])
LimitQ = Annotated[int, Query(ge=1, le=100)]
NOT_STARTED = (JobStatus.validating_files, JobStatus.queued)


async def _session_row(
    session: AsyncSession, services: Services, principal: Principal, session_id: str
) -> FeedbackSessionRow:
    row = await feedback.get_row(session, principal.project_id, session_id)
    if row is None:
        raise not_found("feedback_session", session_id, "session_id")
    await settle(session, services.storage, row)  # a generating session catches up with its job
    return row


def _require_ready(row: FeedbackSessionRow) -> None:
    if row.status == "generating":
        raise ApiError(409, "session_not_ready", "The answers are still being generated; try again soon.")
    if row.status != "ready":
        raise ApiError(409, "session_closed", f"The session is {row.status}; it takes no more labels.")


@router.post("/sessions", response_model=FeedbackSession, status_code=201)
async def create_session(
    body: FeedbackSessionCreate,
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    services: ServicesDep,
    background: BackgroundTasks,
) -> FeedbackSession | JSONResponse:
    idem = idempotent_request(request, principal, body)
    if idem and (replayed := await idem.replay(session)):
        return replayed
    sampling = body.sampling.model_copy(
        update={"seed": body.sampling.seed if body.sampling.seed is not None else secrets.randbelow(2**31)}
    )
    method = Method.model_validate(
        {
            "type": MethodType.sample,
            "sample": {
                "k": body.k,
                "temperature": sampling.temperature,
                "top_p": sampling.top_p,
                "max_new_tokens": sampling.max_new_tokens,
            },
        }
    )
    job = await create_sample_job(
        session,
        services,
        principal,
        model=body.model,
        prompts_file=body.prompts_file,
        method=method,
        seed=sampling.seed or 0,
        resources=body.resources,
    )
    ts = now()
    row = await feedback.insert_session(
        session,
        {
            "id": new_id("fbs"),
            "project_id": principal.project_id,
            "status": "generating",
            "model": body.model,
            "prompts_file": body.prompts_file,
            "k": body.k,
            "labels_per_item": body.labels_per_item,
            "sampling": sampling.model_dump(mode="json"),
            "job_id": job.id,
            "created_at": ts,
            "updated_at": ts,
        },
    )
    created = await feedback.to_model(session, row)
    if idem:
        await idem.save(session, created, 201)
    if replayed := await commit_or_replay(session, idem):
        return replayed
    background.add_task(services.queue.enqueue, "submit_job", job.id)
    return created


@router.get("/sessions", response_model=Page[FeedbackSession])
async def list_sessions(
    principal: PrincipalDep,
    session: SessionDep,
    services: ServicesDep,
    after: str | None = None,
    limit: LimitQ = 20,
) -> Page[FeedbackSession]:
    page = await feedback.rows_page(session, principal.project_id, after=after, limit=limit)
    data = []
    for row in page.data:
        await settle(session, services.storage, row)
        data.append(await feedback.to_model(session, row))
    return Page[FeedbackSession](
        data=data, has_more=page.has_more, first_id=page.first_id, last_id=page.last_id
    )


@router.get("/sessions/{session_id}", response_model=FeedbackSession, openapi_extra=LABELER_ALLOWED)
async def get_session(
    session_id: str, principal: PrincipalDep, session: SessionDep, services: ServicesDep
) -> FeedbackSession:
    row = await _session_row(session, services, principal, session_id)
    return await feedback.to_model(session, row)


@router.post("/sessions/{session_id}/cancel", response_model=FeedbackSession)
async def cancel_session(
    session_id: str, principal: PrincipalDep, session: SessionDep, services: ServicesDep
) -> FeedbackSession:
    """Generating: stop the sample job. Ready: close the session to new labels (export still works)."""
    row = await _session_row(session, services, principal, session_id)
    if row.status == "failed":
        raise ApiError(400, "session_not_cancellable", f"Session {session_id} already failed.")
    if row.status != "cancelled":
        await feedback.transition(session, row.id, "cancelled", from_=("generating", "ready"))
        job = await jobs.get_row(session, principal.project_id, row.job_id)
        stop_job = job is not None and not JobStatus(job.status).is_finished()
        if stop_job and await jobs.transition(session, row.job_id, NOT_STARTED, JobStatus.cancelled):
            await jobs.add_event(
                session, row.job_id, "Job cancelled before it started (feedback session cancelled)"
            )
            stop_job = False
        elif stop_job and job is not None and not job.cancel_requested:
            await jobs.update_fields(session, row.job_id, cancel_requested=True)
            await jobs.add_event(session, row.job_id, "Cancellation requested (feedback session cancelled)")
        await session.commit()
        if stop_job:
            await services.queue.enqueue("cancel_job", row.job_id)
        await session.refresh(row)
    return await feedback.to_model(session, row)


@router.post("/labeler_keys", response_model=LabelerKey, status_code=201)
async def create_labeler_key(
    body: LabelerKeyCreate, request: Request, principal: PrincipalDep, session: SessionDep
) -> LabelerKey | JSONResponse:
    idem = idempotent_request(request, principal, body)
    if idem and (replayed := await idem.replay(session)):
        return replayed
    key = await projects.create_key(session, principal.project_id, name=body.name, role=projects.LABELER)
    created = LabelerKey(id=key.id, name=key.name, key=key.key, created_at=key.created_at)
    if idem:
        await idem.save(session, created, 201, withhold="key")  # only the key's hash is kept
    if replayed := await commit_or_replay(session, idem):
        return replayed
    return created


def _csrf_even_for_get(request: Request) -> None:
    """next_item is a GET that opens and renews leases, so a console session (cookie) must echo
    its CSRF token before it does, as on unsafe methods; a page of a sibling site could hold
    items otherwise. Checked after the lookups, so another project's session is still a 404."""
    if "authorization" in request.headers:
        return
    cookie = ui_session.current_session(request)
    if cookie is None:
        return  # no valid console session: get_principal answers 401
    sent = request.headers.get(ui_session.CSRF_HEADER, "")
    wanted = ui_session.csrf_token(ui_session.secret_for(request), cookie)
    if not hmac.compare_digest(sent.encode(), wanted.encode()):
        raise ApiError(403, "csrf_failed", "Missing or wrong X-CSRF-Token for a console session.")


@router.get("/sessions/{session_id}/next_item", response_model=NextItem, openapi_extra=LABELER_ALLOWED)
async def next_item(
    request: Request,
    session_id: str,
    principal: PrincipalDep,
    session: SessionDep,
    services: ServicesDep,
    resume: bool = False,
) -> NextItem:
    """``resume=true`` (the ranking page on load): with no opened item, the item labelled last
    comes back with its label, so a reload can revise it; the plain call moves on."""
    row = await _session_row(session, services, principal, session_id)
    _require_ready(row)
    _csrf_even_for_get(request)
    labeler = principal.key_id
    item = await feedback.next_item(session, row, labeler, resume=resume)
    view = None
    if item is not None:
        answers = await feedback.answers_of(session, item.id)
        label = await feedback.get_label(session, item.id, labeler)
        prompt = item.prompt
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        view = FeedbackItem(
            id=item.id,
            index=item.index,
            messages=[FeedbackMessage(role=m["role"], content=m["content"]) for m in messages],
            answers=[FeedbackAnswer(id=a.id, text=a.text) for a in shuffled_for(answers, item.id, labeler)],
            label=feedback.label_model(label) if label is not None and label.state != feedback.OPEN else None,
        )
    progress = await feedback.labeler_progress(session, row, labeler)
    await session.commit()
    return NextItem(item=view, progress=progress)


@router.post(
    "/sessions/{session_id}/items/{item_id}/labels",
    response_model=FeedbackLabel,
    openapi_extra=LABELER_ALLOWED,
)
async def post_label(
    session_id: str,
    item_id: str,
    body: LabelCreate,
    principal: PrincipalDep,
    session: SessionDep,
    services: ServicesDep,
) -> FeedbackLabel:
    row = await _session_row(session, services, principal, session_id)
    _require_ready(row)
    item = await feedback.get_item(session, row.id, item_id)
    if item is None:
        raise not_found("feedback_item", item_id, "item_id")
    answer_ids = [a.id for a in await feedback.answers_of(session, item.id)]
    try:
        ranking, unsafe = check_label(body.ranking, body.unsafe, body.skipped, answer_ids)
    except LabelError as exc:
        raise ApiError(400, "invalid_label", exc.message, param=exc.param) from exc
    labeler = principal.key_id
    await feedback.lock_session(session, row)  # as next_item: one labeler at a time takes a slot
    mine = await feedback.get_label(session, item.id, labeler)
    # Only a ranking already given holds a slot for sure: an open lease may have lapsed while
    # others filled the item, and a skip freed it. Skipping an item one holds takes nothing.
    takes_slot = mine is None or (mine.state != feedback.LABELLED and not body.skipped)
    if takes_slot and await feedback.item_is_full(session, row, item.id, labeler):
        raise ApiError(409, "item_fully_labelled", "This item already has all the labels it needs.")
    label = await feedback.save_label(
        session, row, item.id, labeler, ranking=ranking, skipped=body.skipped, unsafe=unsafe, note=body.note
    )
    saved = feedback.label_model(label)
    await session.commit()
    return saved


@router.post("/sessions/{session_id}/export", response_model=FileObject, status_code=201)
async def export_session(
    session_id: str,
    body: FeedbackExport,
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    services: ServicesDep,
) -> FileObject | JSONResponse:
    """The rankings as a new file of the project (rules: ``feedback/export.py``)."""
    idem = idempotent_request(request, principal, body)
    if idem and (replayed := await idem.replay(session)):
        return replayed
    row = await _session_row(session, services, principal, session_id)
    records = []
    for item, answers, labels in await feedback.labelled_items(session, row.id):
        views = [LabelView(lb.ranking or [], lb.state == feedback.SKIPPED, lb.unsafe or []) for lb in labels]
        if sum(not v.skipped for v in views) < body.min_labels:
            continue
        record = export_record(item.prompt, [Answer(a.id, a.index, a.text) for a in answers], views)
        if record is not None:
            records.append(record)
    if not records:
        raise ApiError(
            409,
            "nothing_to_export",
            f"No item has {body.min_labels} ranking label(s) with two usable answers yet.",
        )
    await release(session)  # validation and storage are slow; SQLite has one connection
    data = to_jsonl(records)
    outcome = await run_in_threadpool(_validate_export, services, request, data)
    file_id = new_id("file")
    key = file_key(principal.project_id, file_id)
    await run_in_threadpool(services.storage.put_bytes, key, data)
    file_row = FileRow(
        id=file_id,
        project_id=principal.project_id,
        filename=f"{row.id}-rankings.jsonl",
        purpose="fine-tune",
        bytes=len(data),
        created_at=now(),
        **outcome,
    )
    try:
        async with services.sessions() as write:
            await quotas.check_storage(write, services.settings, principal.project_id, len(data))
            created = await files.insert(write, file_row)
            if idem:
                await idem.save(write, created, 201)
            if replayed := await commit_or_replay(write, idem):
                await run_in_threadpool(services.storage.delete, key)
                return replayed
    except BaseException:
        await run_in_threadpool(services.storage.delete, key)  # never committed: unreachable
        raise
    return created


def _validate_export(services: Services, request: Request, data: bytes) -> dict:
    settings = getattr(request.app.state, "validation_settings", None) or ValidationSettings()
    sample = token_sample(services, settings, len(data))
    report = validate_jsonl(io.BytesIO(data), sample=sample, limits=settings.limits(), size_hint=len(data))
    if not report.ok:  # the export rules exist to prevent this: a bug, not the user's fault
        raise ApiError(500, "export_invalid", f"The export failed validation: {report.summary()}")
    return file_outcome(report)
