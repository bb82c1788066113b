"""/v1/files: upload, list, get, content, delete.

An upload up to the sync threshold is validated in the request: a bad file answers 400 and
nothing is stored. A larger one is stored as ``uploaded`` and validated in the background
(``validation.service``), then becomes ``processed`` or ``error``.
"""

from __future__ import annotations

import unicodedata
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import IO, Annotated, Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from tuneforge.storage import file_key
from tuneforge.types import FileObject, Page
from tuneforge_api.db.tables import FileRow
from tuneforge_api.deps import PrincipalDep, ServicesDep, SessionDep, release
from tuneforge_api.errors import ApiError, BodyTooLarge, not_found
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
    return base[:255] or "upload.jsonl"


@router.post("", response_model=FileObject)
async def upload_file(request: Request, principal: PrincipalDep, services: ServicesDep) -> FileObject:
    try:
        form = await request.form(max_files=1, max_fields=8)
    except BodyTooLarge:
        raise
    except Exception as exc:
        raise ApiError(
            400, "invalid_multipart", "Expected a multipart form with 'file' and 'purpose'."
        ) from exc
    try:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise ApiError(400, "missing_file", "The form has no 'file' part.", param="file")
        if purpose not in PURPOSES:
            raise ApiError(
                400, "invalid_purpose", f"purpose must be one of {sorted(PURPOSES)}.", param="purpose"
            )
        upload.file.seek(0, 2)
        limit = services.settings.max_upload_bytes
        if upload.file.tell() > limit:  # the middleware bounds the body; this bounds the file exactly
            raise ApiError(
                413, "file_too_large", f"The file exceeds the limit of {limit} bytes.", param="file"
            )
        size = upload.file.tell()
        upload.file.seek(0)
        background = _background(request.app)
        settings = background.settings
        in_background = size > settings.sync_max_bytes
        if in_background:
            outcome: dict[str, Any] = {"status": "uploaded", "n_examples": 0}
        else:
            outcome = await run_in_threadpool(_validate_upload, services, settings, upload.file, size)
            upload.file.seek(0)
        file_id = new_id("file")
        key = file_key(principal.project_id, file_id)
        await run_in_threadpool(services.storage.put_fileobj, key, upload.file)
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
                await session.commit()
        except BaseException:
            # The row never committed, so the object is unreachable: remove it.
            await run_in_threadpool(services.storage.delete, key)
            raise
        if in_background:
            background.start(principal.project_id, file_id)
        return created
    finally:
        await form.close()


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


@router.get("/{file_id}/content")
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
    await _row(session, principal, file_id)
    await files.remove(session, principal.project_id, file_id)
    await session.commit()
    await run_in_threadpool(services.storage.delete, file_key(principal.project_id, file_id))
    return {"id": file_id, "object": "file", "deleted": True}
