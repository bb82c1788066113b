"""/v1/files: upload, list, get, content, delete.

An upload up to the sync threshold is validated in the request: a bad file answers 400 and
nothing is stored. A larger one is stored as ``uploaded`` and validated in the background
(``validation.service``), then becomes ``processed`` or ``error``.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import IO, Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool

from tuneforge.storage import file_key
from tuneforge.types import FileObject, Page
from tuneforge_api import quotas
from tuneforge_api.db.tables import FileRow
from tuneforge_api.deps import PrincipalDep, ServicesDep, SessionDep, release
from tuneforge_api.errors import ApiError, BodyTooLarge, not_found
from tuneforge_api.idempotency import IdempotentRequest, commit_or_replay, idempotent_request
from tuneforge_api.multipart import FormError, ReceivedFile, UploadForm
from tuneforge_api.services import Services
from tuneforge_api.store import files
from tuneforge_api.store.ids import new_id, now
from tuneforge_api.validation import validate_jsonl
from tuneforge_api.validation.service import (
    BackgroundValidation,
    ValidationSettings,
    file_outcome,
    token_sample,
)


@asynccontextmanager
async def background_validation(app: FastAPI) -> AsyncIterator[None]:
    """Runs after the app's own startup (migrations): validates what a previous run left
    ``uploaded``, and owns the background validations until shutdown."""
    app.state.background_validation = None  # a fresh one per run: its semaphore binds to this loop
    background = _background(app)
    await background.sweep()
    yield
    await background.close()
    app.state.background_validation = None


def _background(app: FastAPI) -> BackgroundValidation:
    """The app's background validations (made on first use too, for an app run without lifespan)."""
    if getattr(app.state, "background_validation", None) is None:
        settings = getattr(app.state, "validation_settings", None) or ValidationSettings()
        app.state.validation_settings = settings
        app.state.background_validation = BackgroundValidation(app.state.services, settings)
    return app.state.background_validation


router = APIRouter(prefix="/v1/files", tags=["files"], lifespan=background_validation)
PURPOSES = {"fine-tune"}
LimitQ = Annotated[int, Query(ge=1, le=10_000)]


def clean_filename(name: str | None) -> str:
    """Keep a display name only: no path, no control characters, bounded length."""
    base = (name or "upload.jsonl").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if unicodedata.category(c)[0] != "C")
    base = base[:255]
    return base if base.strip(". ") else "upload.jsonl"  # "..", "." or blanks name no file


# The form is read by hand (streamed, size-checked), so FastAPI cannot infer it: document it.
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": sorted(PURPOSES)},
                    },
                }
            }
        },
    }
}


async def _receive_form(request: Request, services: Services) -> UploadForm:
    content_type = request.headers.get("content-type", "")
    if parse_options_header(content_type)[0] != b"multipart/form-data":
        raise ApiError(400, "missing_file", "The form has no 'file' part.", param="file")
    try:
        form = UploadForm(
            content_type, services.storage.open_spool, hash_file="idempotency-key" in request.headers
        )
    except FormError as exc:
        raise ApiError(
            400, "invalid_multipart", "Expected a multipart form with 'file' and 'purpose'."
        ) from exc
    try:
        await form.read(request.stream())
    except BaseException as exc:
        form.close()  # not awaited: this may be a cancellation
        # The storage failing (a full disk) is ours, a 5xx that is logged, not the client's 400.
        storage_failed = isinstance(exc, OSError) and not isinstance(exc, ConnectionError)
        if isinstance(exc, BodyTooLarge) or storage_failed or not isinstance(exc, Exception):
            raise
        raise ApiError(
            400, "invalid_multipart", "Expected a multipart form with 'file' and 'purpose'."
        ) from exc
    return form


@router.post("", response_model=FileObject, openapi_extra=UPLOAD_BODY)
async def upload_file(
    request: Request, principal: PrincipalDep, services: ServicesDep
) -> FileObject | JSONResponse:
    form = await _receive_form(request, services)
    try:
        upload, purpose = form.file, form.fields.get("purpose")
        if upload is None:
            raise ApiError(400, "missing_file", "The form has no 'file' part.", param="file")
        if purpose not in PURPOSES:
            raise ApiError(
                400, "invalid_purpose", f"purpose must be one of {sorted(PURPOSES)}.", param="purpose"
            )
        limit = services.settings.max_upload_bytes
        size = upload.size
        if size > limit:  # the middleware bounds the body; this bounds the file exactly
            raise ApiError(
                413, "file_too_large", f"The file exceeds the limit of {limit} bytes.", param="file"
            )
        # A replay answers what the first request got, before any check that could now differ.
        idem = _idempotent_upload(request, principal, upload, str(purpose), size)
        if idem:
            async with services.sessions() as session:
                if replayed := await idem.replay(session):
                    return replayed
        async with services.sessions() as session:
            await quotas.check_storage(session, services.settings, principal.project_id, size)
        background = _background(request.app)
        settings = background.settings
        in_background = size > settings.sync_max_bytes
        if in_background:
            outcome: dict[str, Any] = {"status": "uploaded", "n_examples": 0}
        else:
            outcome = await run_in_threadpool(_validate_upload, services, settings, upload.spool, size)
            upload.spool.seek(0)
        file_id = new_id("file")
        key = file_key(principal.project_id, file_id)
        await run_in_threadpool(services.storage.put_spool, key, upload.spool)
        row = FileRow(
            id=file_id,
            project_id=principal.project_id,
            filename=clean_filename(upload.filename),
            purpose=str(purpose),
            bytes=size,
            created_at=now(),
            **outcome,
        )
        try:
            async with services.sessions() as session:
                created = await files.insert(session, row)
                if idem:
                    await idem.save(session, created)  # same transaction as the row
                replayed = await commit_or_replay(session, idem)
        except BaseException:
            # The row never committed, so the object is unreachable: remove it.
            await run_in_threadpool(services.storage.delete, key)
            raise
        if replayed:  # a concurrent request with the same key stored the file first
            await run_in_threadpool(services.storage.delete, key)
            return replayed
        if in_background:
            background.start(principal.project_id, file_id)
        return created
    finally:
        await run_in_threadpool(form.close)


def _idempotent_upload(
    request: Request, principal: PrincipalDep, upload: ReceivedFile, purpose: str, size: int
) -> IdempotentRequest | None:
    """With an Idempotency-Key, the upload's fingerprint: its form fields and content hash
    (computed while the file streamed in)."""
    if "idempotency-key" not in request.headers or upload.sha256 is None:
        return None
    canonical = json.dumps(
        {
            "purpose": purpose,
            "filename": clean_filename(upload.filename),
            "bytes": size,
            "sha256": upload.sha256,
        },
        sort_keys=True,
    )
    return idempotent_request(request, principal, canonical)


def _validate_upload(services: Services, settings: ValidationSettings, fh: IO[bytes], size: int) -> dict:
    """Validate a small upload in the request; a bad file is refused before anything is stored."""
    sample = token_sample(services, settings, size)
    report = validate_jsonl(fh, sample=sample, limits=settings.limits(), size_hint=size)
    if not report.ok:
        raise ApiError(
            400, "invalid_file", f"The file is not a valid dataset: {report.summary()}", param="file"
        )
    return file_outcome(report)


@router.get("", response_model=Page[FileObject])
async def list_files(
    principal: PrincipalDep,
    session: SessionDep,
    after: str | None = None,
    limit: LimitQ = 10_000,
    purpose: str | None = None,
) -> Page[FileObject]:
    return await files.list_page(session, principal.project_id, purpose=purpose, after=after, limit=limit)


async def _row(session: SessionDep, principal: PrincipalDep, file_id: str) -> FileRow:
    row = await files.get_row(session, principal.project_id, file_id)
    if row is None:
        raise not_found("file", file_id, "file_id")
    return row


@router.get("/{file_id}", response_model=FileObject)
async def get_file(file_id: str, principal: PrincipalDep, session: SessionDep) -> FileObject:
    return files.to_model(await _row(session, principal, file_id))


@router.get(
    "/{file_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "The file's bytes."}},
)
async def file_content(
    file_id: str, principal: PrincipalDep, session: SessionDep, services: ServicesDep
) -> StreamingResponse:
    row = await _row(session, principal, file_id)
    await release(session)
    fh = await run_in_threadpool(services.storage.open_read, file_key(principal.project_id, row.id))

    def chunks():
        with fh:
            while chunk := fh.read(1 << 20):
                yield chunk

    return StreamingResponse(
        chunks(), media_type="application/octet-stream", headers={"content-length": str(row.bytes)}
    )


@router.delete("/{file_id}")
async def delete_file(
    file_id: str, principal: PrincipalDep, session: SessionDep, services: ServicesDep
) -> dict:
    try:
        found = await files.delete_unless_in_use(session, principal.project_id, file_id)
    except files.FileInUse as exc:
        raise ApiError(
            409,
            "file_in_use",
            f"File {file_id!r} is used by unfinished jobs ({exc}); cancel them or wait until they end.",
            param="file_id",
            headers={"x-should-retry": "false"},  # it will not change within a retry's backoff
        ) from None
    if not found:
        raise not_found("file", file_id, "file_id")
    await session.commit()
    await run_in_threadpool(services.storage.delete, file_key(principal.project_id, file_id))
    return {"id": file_id, "object": "file", "deleted": True}
