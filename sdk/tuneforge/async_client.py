"""``AsyncClient``: the surface of ``Client`` for asyncio code, over the same request
descriptions and retry policy (``_shared``)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from tuneforge import errors
from tuneforge._shared import (
    PRESIGN_UNAVAILABLE,
    AdapterUrls,
    Call,
    Calls,
    SseParser,
    Webhook,
    WebhookCalls,
    WebhookDelivery,
    adapter_urls_call,
    bundle_path,
    check_digest,
    headers,
    is_retriable,
    job_body,
    place_verified,
    retry_delay,
    staging_dir,
    unpack_verified,
)
from tuneforge.client import FeedbackCalls, Progress, _config, _ProgressReader, session_body
from tuneforge.types import (
    ApiKey,
    Checkpoint,
    Event,
    FeedbackLabel,
    FeedbackSession,
    FileObject,
    Job,
    JobCreate,
    JobValidation,
    LabelCreate,
    LabelerKey,
    Method,
    Model,
    NextItem,
    Page,
    Project,
)


class AsyncClient:
    """See ``Client``; every method is a coroutine (or an async iterator for streams)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 2,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.base_url, self.api_key = _config(base_url, api_key)
        self.max_retries = max_retries
        self._http = http_client or httpx.AsyncClient(timeout=timeout)
        self.files = AsyncFiles(self)
        self.jobs = AsyncJobs(self)
        self.adapters = AsyncAdapters(self)
        self.models = AsyncModels(self)
        self.admin = AsyncAdmin(self)
        self.feedback = AsyncFeedback(self)
        self.webhooks = AsyncWebhooks(self)

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def create_job(
        self,
        *,
        model: str,
        training_file: str,
        method: str | dict[str, Any] | Method = "supervised",
        hyperparameters: dict[str, Any] | None = None,
        **extra: Any,
    ) -> Job:
        return await self.jobs.create(job_body(model, training_file, method, hyperparameters, extra))

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        files: Any = None,
        data: Any = None,
        rewind: Callable[[], None] | None = None,
    ) -> httpx.Response:
        sent = headers(self.api_key, method)
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            if rewind is not None:
                rewind()
            try:
                response = await self._http.request(
                    method,
                    self.base_url + path,
                    json=json,
                    params=params,
                    files=files,
                    data=data,
                    headers=sent,
                )
            except httpx.TimeoutException as exc:
                if last:
                    raise errors.APITimeoutError() from exc
                await asyncio.sleep(retry_delay(attempt, None))
                continue
            except httpx.TransportError as exc:
                if last:
                    raise errors.APIConnectionError(f"cannot reach {self.base_url}: {exc}") from exc
                await asyncio.sleep(retry_delay(attempt, None))
                continue
            if response.status_code < 400:
                return response
            if is_retriable(response) and not last:
                await asyncio.sleep(retry_delay(attempt, response))
                continue
            raise errors.error_from_response(response)
        raise AssertionError("unreachable")

    async def call(self, call: Call) -> Any:
        response = await self.request(call.method, call.path, json=call.json, params=call.query())
        return call.parse(response.json())

    async def pages(self, make: Callable[[str | None], Call]) -> AsyncIterator[Any]:
        after: str | None = None
        while True:
            page: Page[Any] = await self.call(make(after))
            for item in page.data:
                yield item
            if not page.has_more or not page.data:
                return
            after = page.data[-1].id


class AsyncFiles:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def upload(
        self, path: str | os.PathLike[str], *, purpose: str = "fine-tune", on_progress: Progress | None = None
    ) -> FileObject:
        p = Path(path)
        with open(p, "rb") as fh:
            reader = _ProgressReader(fh, p.stat().st_size, on_progress)
            response = await self._c.request(
                "POST",
                "/v1/files",
                files={"file": (p.name, reader, "application/jsonl")},
                data={"purpose": purpose},
                rewind=reader.rewind,
            )
        return FileObject.model_validate(response.json())

    async def get(self, file_id: str) -> FileObject:
        return await self._c.call(Calls.get_file(file_id))

    async def list(self, *, purpose: str | None = None, limit: int = 100) -> list[FileObject]:
        return [
            f async for f in self._c.pages(lambda a: Calls.list_files(limit=limit, after=a, purpose=purpose))
        ]

    async def content(self, file_id: str) -> bytes:
        return (await self._c.request("GET", f"/v1/files/{file_id}/content")).content

    async def delete(self, file_id: str) -> bool:
        return await self._c.call(Calls.delete_file(file_id))

    async def wait_for_processing(
        self, file_id: str, *, timeout: float = 1800.0, poll_interval: float = 1.0
    ) -> FileObject:
        """Wait until a (large) upload is validated: "processed" or "error"."""
        deadline = time.monotonic() + timeout
        while True:
            f = await self.get(file_id)
            if f.status != "uploaded":
                return f
            if time.monotonic() >= deadline:
                raise errors.JobTimeoutError(f"file {file_id} still being validated after {timeout}s")
            await asyncio.sleep(poll_interval)


class AsyncJobs:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(self, body: JobCreate | dict[str, Any]) -> Job:
        return await self._c.call(Calls.create_job(body))

    async def get(self, job_id: str) -> Job:
        return await self._c.call(Calls.get_job(job_id))

    async def validate(self, body: JobCreate | dict[str, Any]) -> JobValidation:
        """A dry run of ``create``; creates nothing."""
        return await self._c.call(Calls.validate_job(body))

    async def list(self, *, limit: int = 20, after: str | None = None) -> Page[Job]:
        return await self._c.call(Calls.list_jobs(limit=limit, after=after))

    async def list_all(self) -> list[Job]:
        return [j async for j in self._c.pages(lambda after: Calls.list_jobs(limit=100, after=after))]

    async def cancel(self, job_id: str) -> Job:
        return await self._c.call(Calls.cancel_job(job_id))

    async def list_events(self, job_id: str, *, limit: int = 20, after: str | None = None) -> Page[Event]:
        return await self._c.call(Calls.list_events(job_id, limit=limit, after=after))

    async def events(self, job_id: str) -> list[Event]:
        """Every event of the job, oldest first."""
        newest_first = [
            e async for e in self._c.pages(lambda a: Calls.list_events(job_id, limit=100, after=a))
        ]
        return newest_first[::-1]

    async def checkpoints(self, job_id: str) -> list[Checkpoint]:
        return [c async for c in self._c.pages(lambda a: Calls.list_checkpoints(job_id, limit=100, after=a))]

    async def stream(self, job_id: str, *, last_event_id: str | None = None) -> AsyncIterator[Event]:
        """Live events until the job is finished, resuming after a dropped connection."""
        failures = 0
        url = f"{self._c.base_url}/v1/fine_tuning/jobs/{job_id}/events"
        while True:
            sent = {**headers(self._c.api_key, "GET"), "Accept": "text/event-stream"}
            if last_event_id:
                sent["Last-Event-ID"] = last_event_id
            try:
                async with self._c._http.stream(
                    "GET",
                    url,
                    params={"stream": "true"},
                    headers=sent,
                    timeout=httpx.Timeout(60.0, read=120.0),
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise errors.error_from_response(response)
                    parser = SseParser()
                    async for line in response.aiter_lines():
                        if (message := parser.feed(line)) is None:
                            continue
                        failures = 0
                        kind, event_id, data = message
                        if kind == "done":
                            return
                        last_event_id = event_id
                        yield Event.model_validate_json(data)
            except httpx.TransportError as exc:
                failures += 1
                if failures > self._c.max_retries:
                    raise errors.APIConnectionError(f"event stream of {job_id} lost: {exc}") from exc
                await asyncio.sleep(retry_delay(failures - 1, None))

    async def wait(
        self,
        job_id: str,
        *,
        timeout: float = 3600.0,
        poll_interval: float = 1.0,
        on_update: Callable[[Job], None] | None = None,
    ) -> Job:
        deadline = time.monotonic() + timeout
        while True:
            job = await self.get(job_id)
            if on_update:
                on_update(job)
            if job.status.is_finished():
                return job
            if time.monotonic() >= deadline:
                raise errors.JobTimeoutError(f"job {job_id} still {job.status.value} after {timeout}s")
            await asyncio.sleep(poll_interval)


class AsyncAdapters:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def download(
        self, job_id: str, dest: str | os.PathLike[str], *, on_progress: Progress | None = None
    ) -> Path:
        urls = await self._presigned(job_id)
        if urls is not None:
            try:
                return await self._download_presigned(urls, Path(dest), on_progress)
            except httpx.TransportError:
                pass  # the object store is not reachable from this network: go through the API
        url = f"{self._c.base_url}/v1/fine_tuning/jobs/{job_id}/adapter"
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / f"{uuid.uuid4().hex}.tar"
            try:
                async with self._c._http.stream(
                    "GET", url, headers=headers(self._c.api_key, "GET")
                ) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise errors.error_from_response(response)
                    total = int(response.headers.get("content-length") or 0)
                    with open(archive, "wb") as out:
                        async for chunk in response.aiter_bytes():
                            out.write(chunk)
                            if on_progress:
                                on_progress(out.tell(), total)
            except httpx.TransportError as exc:
                raise errors.APIConnectionError(f"download of {job_id} failed: {exc}") from exc
            return await asyncio.to_thread(unpack_verified, archive, Path(dest))

    async def _presigned(self, job_id: str) -> AdapterUrls | None:
        try:
            return await self._c.call(adapter_urls_call(job_id))
        except errors.NotFoundError as exc:
            if exc.code in PRESIGN_UNAVAILABLE:
                return None
            raise

    async def _download_presigned(self, urls: AdapterUrls, dest: Path, on_progress: Progress | None) -> Path:
        staging = staging_dir(dest)
        try:
            total, done = sum(f.bytes for f in urls.files), 0
            for file in urls.files:
                digest = hashlib.sha256()
                # No API key here: the URL carries its own short-lived signature.
                async with self._c._http.stream("GET", file.url) as response:
                    if response.status_code >= 400:
                        await response.aread()
                        raise errors.error_from_response(response)
                    with open(bundle_path(staging, file.name), "wb") as out:
                        async for chunk in response.aiter_bytes():
                            out.write(chunk)
                            digest.update(chunk)
                            done += len(chunk)
                            if on_progress:
                                on_progress(done, total)
                check_digest(file, digest)
            return await asyncio.to_thread(place_verified, staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


class AsyncModels:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def list(self) -> list[Model]:
        return await self._c.call(Calls.list_models())


class AsyncAdmin:
    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create_project(self, name: str) -> Project:
        return await self._c.call(Calls.create_project(name))

    async def list_projects(self) -> list[Project]:
        return await self._c.call(Calls.list_projects())

    async def create_key(self, project_id: str, *, name: str = "default", role: str = "member") -> ApiKey:
        return await self._c.call(Calls.create_key(project_id, name=name, role=role))

    async def revoke_key(self, project_id: str, key_id: str) -> bool:
        return await self._c.call(Calls.revoke_key(project_id, key_id))


class AsyncWebhooks:
    """See ``Webhooks``."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create(self, url: str, *, events: list[str] | None = None) -> Webhook:
        return await self._c.call(WebhookCalls.create(url, events))

    async def list(self) -> list[Webhook]:
        return await self._c.call(WebhookCalls.list())

    async def delete(self, webhook_id: str) -> bool:
        return await self._c.call(WebhookCalls.delete(webhook_id))

    async def deliveries(self, webhook_id: str) -> list[WebhookDelivery]:
        return await self._c.call(WebhookCalls.deliveries(webhook_id))


class AsyncFeedback:
    """Human-feedback sessions: sample K answers per prompt, rank them, export the rankings."""

    def __init__(self, client: AsyncClient) -> None:
        self._c = client

    async def create_session(
        self, *, model: str, prompts_file: str, k: int, labels_per_item: int = 1, **extra: Any
    ) -> FeedbackSession:
        body = session_body(model, prompts_file, k, labels_per_item, extra)
        return await self._c.call(FeedbackCalls.create_session(body))

    async def get_session(self, session_id: str) -> FeedbackSession:
        return await self._c.call(FeedbackCalls.get_session(session_id))

    async def list_sessions(self, *, limit: int = 20, after: str | None = None) -> Page[FeedbackSession]:
        return await self._c.call(FeedbackCalls.list_sessions(limit=limit, after=after))

    async def cancel_session(self, session_id: str) -> FeedbackSession:
        return await self._c.call(FeedbackCalls.cancel_session(session_id))

    async def wait_until_ready(
        self, session_id: str, *, timeout: float = 600, poll_interval: float = 1.0
    ) -> FeedbackSession:
        deadline = time.monotonic() + timeout
        while (session := await self.get_session(session_id)).status == "generating":
            if time.monotonic() >= deadline:
                raise errors.JobTimeoutError(f"session {session_id} still generating after {timeout}s")
            await asyncio.sleep(poll_interval)
        return session

    async def create_labeler_key(self, name: str) -> LabelerKey:
        return await self._c.call(FeedbackCalls.create_labeler_key(name))

    async def next_item(self, session_id: str) -> NextItem:
        return await self._c.call(FeedbackCalls.next_item(session_id))

    async def label(
        self,
        session_id: str,
        item_id: str,
        *,
        ranking: list[list[str]] | None = None,
        skipped: bool = False,
        unsafe: list[str] | None = None,
        note: str = "",
    ) -> FeedbackLabel:
        body = LabelCreate(ranking=ranking or [], skipped=skipped, unsafe=unsafe or [], note=note)
        return await self._c.call(FeedbackCalls.label(session_id, item_id, body))

    async def export(self, session_id: str, *, min_labels: int = 1) -> FileObject:
        return await self._c.call(FeedbackCalls.export(session_id, min_labels))
