"""The synchronous client: ``Client(...).files / .jobs / .adapters / .models / .admin / .feedback
/ .webhooks``.
``AsyncClient`` (async_client.py) has the same surface."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

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
    page_of,
    place_verified,
    retry_delay,
    staging_dir,
    unpack_verified,
)
from tuneforge.types import (
    ApiKey,
    Checkpoint,
    Event,
    FeedbackLabel,
    FeedbackSession,
    FeedbackSessionCreate,
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

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
Progress = Callable[[int, int], None]


def _config(base_url: str | None, api_key: str | None) -> tuple[str, str]:
    url = (base_url or os.environ.get("TUNEFORGE_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
    return url, api_key if api_key is not None else os.environ.get("TUNEFORGE_API_KEY", "")


class Client:
    """Talks to a Tuneforge server.

    ``base_url`` and ``api_key`` default to ``TUNEFORGE_BASE_URL`` and ``TUNEFORGE_API_KEY``.
    Requests that fail with 408, 429 or >= 500, or without a response, are retried
    ``max_retries`` times with jittered backoff (honouring ``Retry-After``); a POST keeps one
    ``Idempotency-Key`` across those retries, so a retried create never makes two jobs.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 2,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.base_url, self.api_key = _config(base_url, api_key)
        self.max_retries = max_retries
        self._http = http_client or httpx.Client(timeout=timeout)
        self.files = Files(self)
        self.jobs = Jobs(self)
        self.adapters = Adapters(self)
        self.models = Models(self)
        self.admin = Admin(self)
        self.feedback = Feedback(self)
        self.webhooks = Webhooks(self)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create_job(
        self,
        *,
        model: str,
        training_file: str,
        method: str | dict[str, Any] | Method = "supervised",
        hyperparameters: dict[str, Any] | None = None,
        **extra: Any,
    ) -> Job:
        """Shorthand: ``method="supervised"`` plus ``hyperparameters`` builds OpenAI's method object."""
        return self.jobs.create(job_body(model, training_file, method, hyperparameters, extra))

    # -- transport ---------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return headers(self.api_key, "GET")

    def request(
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
        sent = headers(self.api_key, method)  # one Idempotency-Key for every retry of this request
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            if rewind is not None:
                rewind()
            try:
                response = self._http.request(
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
                time.sleep(retry_delay(attempt, None))
                continue
            except httpx.TransportError as exc:
                if last:
                    raise errors.APIConnectionError(f"cannot reach {self.base_url}: {exc}") from exc
                time.sleep(retry_delay(attempt, None))
                continue
            if response.status_code < 400:
                return response
            if is_retriable(response) and not last:
                time.sleep(retry_delay(attempt, response))
                continue
            raise errors.error_from_response(response)
        raise AssertionError("unreachable")

    def call(self, call: Call) -> Any:
        response = self.request(call.method, call.path, json=call.json, params=call.query())
        return call.parse(response.json())

    def pages(self, make: Callable[[str | None], Call]) -> Iterator[Any]:
        """Every item of a newest-first list, walking ``after`` cursors page by page."""
        after: str | None = None
        while True:
            page: Page[Any] = self.call(make(after))
            yield from page.data
            if not page.has_more or not page.data:
                return
            after = page.data[-1].id

    # Raw JSON calls, with the same retries, for endpoints the resources do not wrap.
    def get_json(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params={k: v for k, v in params.items() if v is not None}).json()

    def post_json(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body).json()


class _ProgressReader(io.RawIOBase):
    """Wraps a file so that each read reports progress; httpx streams it in chunks."""

    def __init__(self, fh: BinaryIO, total: int, on_progress: Progress | None) -> None:
        self._fh, self._total, self._cb, self._done = fh, total, on_progress, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self._fh.read(size)
        self._done += len(chunk)
        if self._cb:
            self._cb(self._done, self._total)
        return chunk

    def rewind(self) -> None:
        self._fh.seek(0)
        self._done = 0


class Files:
    def __init__(self, client: Client) -> None:
        self._c = client

    def upload(
        self, path: str | os.PathLike[str], *, purpose: str = "fine-tune", on_progress: Progress | None = None
    ) -> FileObject:
        p = Path(path)
        with open(p, "rb") as fh:
            reader = _ProgressReader(fh, p.stat().st_size, on_progress)
            response = self._c.request(
                "POST",
                "/v1/files",
                files={"file": (p.name, reader, "application/jsonl")},
                data={"purpose": purpose},
                rewind=reader.rewind,
            )
        return FileObject.model_validate(response.json())

    def get(self, file_id: str) -> FileObject:
        return self._c.call(Calls.get_file(file_id))

    def list(self, *, purpose: str | None = None, limit: int = 100) -> list[FileObject]:
        return list(self._c.pages(lambda after: Calls.list_files(limit=limit, after=after, purpose=purpose)))

    def content(self, file_id: str) -> bytes:
        return self._c.request("GET", f"/v1/files/{file_id}/content").content

    def delete(self, file_id: str) -> bool:
        return self._c.call(Calls.delete_file(file_id))

    def wait_for_processing(
        self, file_id: str, *, timeout: float = 1800.0, poll_interval: float = 1.0
    ) -> FileObject:
        """Poll until the file is validated ("processed" or "error") and return it; a large upload
        is validated in the background. Raises JobTimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            f = self.get(file_id)
            if f.status != "uploaded":
                return f
            if time.monotonic() >= deadline:
                raise errors.JobTimeoutError(f"file {file_id} still being validated after {timeout}s")
            time.sleep(poll_interval)


class Jobs:
    def __init__(self, client: Client) -> None:
        self._c = client

    def create(self, body: JobCreate | dict[str, Any]) -> Job:
        return self._c.call(Calls.create_job(body))

    def get(self, job_id: str) -> Job:
        return self._c.call(Calls.get_job(job_id))

    def validate(self, body: JobCreate | dict[str, Any]) -> JobValidation:
        """A dry run of ``create``: the files' reports, token statistics, resolved hyperparameters
        and an estimated time. Creates nothing; raises what ``create`` would raise."""
        return self._c.call(Calls.validate_job(body))

    def list(self, *, limit: int = 20, after: str | None = None) -> Page[Job]:
        return self._c.call(Calls.list_jobs(limit=limit, after=after))

    def list_all(self) -> list[Job]:
        return list(self._c.pages(lambda after: Calls.list_jobs(limit=100, after=after)))

    def cancel(self, job_id: str) -> Job:
        return self._c.call(Calls.cancel_job(job_id))

    def list_events(self, job_id: str, *, limit: int = 20, after: str | None = None) -> Page[Event]:
        """One page of events, newest first (OpenAI's order)."""
        return self._c.call(Calls.list_events(job_id, limit=limit, after=after))

    def events(self, job_id: str) -> Iterator[Event]:
        """Every event of the job, oldest first (the server pages newest first)."""
        events = list(self._c.pages(lambda after: Calls.list_events(job_id, limit=100, after=after)))
        return iter(reversed(events))

    def checkpoints(self, job_id: str) -> list[Checkpoint]:
        """Every complete checkpoint, newest first."""
        return list(self._c.pages(lambda after: Calls.list_checkpoints(job_id, limit=100, after=after)))

    def stream(self, job_id: str, *, last_event_id: str | None = None) -> Iterator[Event]:
        """Live events, oldest first, until the job is finished. A dropped connection is
        resumed from the last event received (``Last-Event-ID``), up to ``max_retries`` times
        in a row."""
        failures = 0
        url = f"{self._c.base_url}/v1/fine_tuning/jobs/{job_id}/events"
        while True:
            sent = {**self._c._headers(), "Accept": "text/event-stream"}
            if last_event_id:
                sent["Last-Event-ID"] = last_event_id
            try:
                with self._c._http.stream(
                    "GET",
                    url,
                    params={"stream": "true"},
                    headers=sent,
                    timeout=httpx.Timeout(60.0, read=120.0),
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise errors.error_from_response(response)
                    parser = SseParser()
                    for line in response.iter_lines():
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
                time.sleep(retry_delay(failures - 1, None))

    def wait(
        self,
        job_id: str,
        *,
        timeout: float = 3600.0,
        poll_interval: float = 1.0,
        on_update: Callable[[Job], None] | None = None,
    ) -> Job:
        """Poll until the job is finished and return it; raise JobTimeoutError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if on_update:
                on_update(job)
            if job.status.is_finished():
                return job
            if time.monotonic() >= deadline:
                raise errors.JobTimeoutError(f"job {job_id} still {job.status.value} after {timeout}s")
            time.sleep(poll_interval)


class Adapters:
    def __init__(self, client: Client) -> None:
        self._c = client

    def download(
        self, job_id: str, dest: str | os.PathLike[str], *, on_progress: Progress | None = None
    ) -> Path:
        """Download a succeeded job's adapter bundle into ``dest``, after checking every file
        against the sha256 in its manifest (AdapterIntegrityError otherwise).

        When the server offers presigned URLs (s3:// storage), the files come straight from the
        object store; if that store cannot be reached from here, the bundle streams through the API.
        """
        urls = self._presigned(job_id)
        if urls is not None:
            try:
                return self._download_presigned(urls, Path(dest), on_progress)
            except httpx.TransportError:
                pass  # the object store is not reachable from this network: go through the API
        url = f"{self._c.base_url}/v1/fine_tuning/jobs/{job_id}/adapter"
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / f"{uuid.uuid4().hex}.tar"
            try:
                with (
                    self._c._http.stream("GET", url, headers=self._c._headers()) as response,
                    open(archive, "wb") as out,
                ):
                    if response.status_code >= 400:
                        response.read()
                        raise errors.error_from_response(response)
                    total = int(response.headers.get("content-length") or 0)
                    for chunk in response.iter_bytes():
                        out.write(chunk)
                        if on_progress:
                            on_progress(out.tell(), total)
            except httpx.TransportError as exc:
                raise errors.APIConnectionError(f"download of {job_id} failed: {exc}") from exc
            return unpack_verified(archive, Path(dest))

    def _presigned(self, job_id: str) -> AdapterUrls | None:
        try:
            return self._c.call(adapter_urls_call(job_id))
        except errors.NotFoundError as exc:
            if exc.code in PRESIGN_UNAVAILABLE:
                return None
            raise

    def _download_presigned(self, urls: AdapterUrls, dest: Path, on_progress: Progress | None) -> Path:
        staging = staging_dir(dest)
        try:
            total, done = sum(f.bytes for f in urls.files), 0
            for file in urls.files:
                digest = hashlib.sha256()
                # No API key here: the URL carries its own short-lived signature.
                with (
                    self._c._http.stream("GET", file.url) as response,
                    open(bundle_path(staging, file.name), "wb") as out,
                ):
                    if response.status_code >= 400:
                        response.read()
                        raise errors.error_from_response(response)
                    for chunk in response.iter_bytes():
                        out.write(chunk)
                        digest.update(chunk)
                        done += len(chunk)
                        if on_progress:
                            on_progress(done, total)
                check_digest(file, digest)
            return place_verified(staging, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


class Models:
    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self) -> list[Model]:
        return self._c.call(Calls.list_models())


class Admin:
    """Projects and API keys; needs an admin key."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def create_project(self, name: str) -> Project:
        return self._c.call(Calls.create_project(name))

    def list_projects(self) -> list[Project]:
        return self._c.call(Calls.list_projects())

    def create_key(self, project_id: str, *, name: str = "default", role: str = "member") -> ApiKey:
        return self._c.call(Calls.create_key(project_id, name=name, role=role))

    def revoke_key(self, project_id: str, key_id: str) -> bool:
        """Revoke a key (one whose secret was lost, say); NotFoundError if the project has no such key."""
        return self._c.call(Calls.revoke_key(project_id, key_id))


class Webhooks:
    """The project's webhook endpoints; each job event is POSTed, signed, to their URLs."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def create(self, url: str, *, events: list[str] | None = None) -> Webhook:
        """``events`` defaults to every job event. The answer's ``secret`` signs the deliveries;
        it is shown this once, so keep it."""
        return self._c.call(WebhookCalls.create(url, events))

    def list(self) -> list[Webhook]:
        return self._c.call(WebhookCalls.list())

    def delete(self, webhook_id: str) -> bool:
        return self._c.call(WebhookCalls.delete(webhook_id))

    def deliveries(self, webhook_id: str) -> list[WebhookDelivery]:
        """The webhook's recent deliveries, newest first."""
        return self._c.call(WebhookCalls.deliveries(webhook_id))


class FeedbackCalls:
    """The /v1/feedback endpoints, as ``Call``s (shared with the async client)."""

    @staticmethod
    def create_session(body: FeedbackSessionCreate) -> Call:
        json = body.model_dump(mode="json", exclude_unset=True)
        return Call("POST", "/v1/feedback/sessions", FeedbackSession.model_validate, json=json)

    @staticmethod
    def get_session(session_id: str) -> Call:
        return Call("GET", f"/v1/feedback/sessions/{session_id}", FeedbackSession.model_validate)

    @staticmethod
    def list_sessions(*, limit: int, after: str | None) -> Call:
        params = {"limit": limit, "after": after}
        return Call("GET", "/v1/feedback/sessions", page_of(FeedbackSession), params)

    @staticmethod
    def cancel_session(session_id: str) -> Call:
        return Call("POST", f"/v1/feedback/sessions/{session_id}/cancel", FeedbackSession.model_validate)

    @staticmethod
    def create_labeler_key(name: str) -> Call:
        return Call("POST", "/v1/feedback/labeler_keys", LabelerKey.model_validate, json={"name": name})

    @staticmethod
    def next_item(session_id: str) -> Call:
        return Call("GET", f"/v1/feedback/sessions/{session_id}/next_item", NextItem.model_validate)

    @staticmethod
    def label(session_id: str, item_id: str, body: LabelCreate) -> Call:
        path = f"/v1/feedback/sessions/{session_id}/items/{item_id}/labels"
        return Call("POST", path, FeedbackLabel.model_validate, json=body.model_dump(mode="json"))

    @staticmethod
    def export(session_id: str, min_labels: int) -> Call:
        path = f"/v1/feedback/sessions/{session_id}/export"
        return Call("POST", path, FileObject.model_validate, json={"min_labels": min_labels})


def session_body(
    model: str, prompts_file: str, k: int, labels_per_item: int, extra: dict[str, Any]
) -> FeedbackSessionCreate:
    fields = {"model": model, "prompts_file": prompts_file, "k": k, "labels_per_item": labels_per_item}
    return FeedbackSessionCreate.model_validate({**fields, **extra})


class Feedback:
    """Human-feedback sessions: sample K answers per prompt, rank them, export the rankings."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def create_session(
        self, *, model: str, prompts_file: str, k: int, labels_per_item: int = 1, **extra: Any
    ) -> FeedbackSession:
        """``extra``: ``sampling`` ({temperature, top_p, max_new_tokens, seed}), ``resources``."""
        return self._c.call(
            FeedbackCalls.create_session(session_body(model, prompts_file, k, labels_per_item, extra))
        )

    def get_session(self, session_id: str) -> FeedbackSession:
        return self._c.call(FeedbackCalls.get_session(session_id))

    def list_sessions(self, *, limit: int = 20, after: str | None = None) -> Page[FeedbackSession]:
        return self._c.call(FeedbackCalls.list_sessions(limit=limit, after=after))

    def cancel_session(self, session_id: str) -> FeedbackSession:
        return self._c.call(FeedbackCalls.cancel_session(session_id))

    def wait_until_ready(
        self, session_id: str, *, timeout: float = 600, poll_interval: float = 1.0
    ) -> FeedbackSession:
        """Poll until the answers are generated (or the session failed or was cancelled)."""
        deadline = time.monotonic() + timeout
        while (session := self.get_session(session_id)).status == "generating":
            if time.monotonic() >= deadline:
                raise errors.JobTimeoutError(f"session {session_id} still generating after {timeout}s")
            time.sleep(poll_interval)
        return session

    def create_labeler_key(self, name: str) -> LabelerKey:
        return self._c.call(FeedbackCalls.create_labeler_key(name))

    def next_item(self, session_id: str) -> NextItem:
        return self._c.call(FeedbackCalls.next_item(session_id))

    def label(
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
        return self._c.call(FeedbackCalls.label(session_id, item_id, body))

    def export(self, session_id: str, *, min_labels: int = 1) -> FileObject:
        return self._c.call(FeedbackCalls.export(session_id, min_labels))
