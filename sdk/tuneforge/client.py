"""A small synchronous client: ``Client(...).files / .jobs / .adapters / .models / .admin``."""

from __future__ import annotations

import io
import os
import random
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, BinaryIO

import httpx

from tuneforge import errors
from tuneforge.types import (
    ApiKey,
    Event,
    FileObject,
    Hyperparameters,
    Job,
    JobCreate,
    Method,
    MethodType,
    Model,
    Page,
    Project,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
Progress = Callable[[int, int], None]


class Client:
    """Talks to a Tuneforge server.

    ``base_url`` and ``api_key`` default to ``TUNEFORGE_BASE_URL`` and ``TUNEFORGE_API_KEY``.
    Requests that fail with 408, 429 or >= 500, or without a response, are retried
    ``max_retries`` times with jittered backoff; POSTs carry an ``Idempotency-Key`` that
    stays the same across those retries.
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
        self.base_url = (base_url or os.environ.get("TUNEFORGE_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("TUNEFORGE_API_KEY", "")
        self.max_retries = max_retries
        self._http = http_client or httpx.Client(timeout=timeout)
        self.files = Files(self)
        self.jobs = Jobs(self)
        self.adapters = Adapters(self)
        self.models = Models(self)
        self.admin = Admin(self)

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
        if isinstance(method, str):
            kind = MethodType(method)
            method = Method.model_validate(
                {"type": kind, kind.value: {"hyperparameters": Hyperparameters(**(hyperparameters or {}))}}
            )
        elif hyperparameters is not None:
            raise ValueError("pass hyperparameters inside the method object, or method as a string")
        body = JobCreate.model_validate(
            {"model": model, "training_file": training_file, "method": method, **extra}
        )
        return self.jobs.create(body)

    # -- transport ---------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

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
        headers = self._headers()
        if method == "POST":
            headers["Idempotency-Key"] = uuid.uuid4().hex
        url = self.base_url + path
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            if rewind is not None:
                rewind()
            try:
                response = self._http.request(
                    method, url, json=json, params=params, files=files, data=data, headers=headers
                )
            except httpx.TimeoutException as exc:
                if last:
                    raise errors.APITimeoutError() from exc
                self._sleep(attempt, None)
                continue
            except httpx.TransportError as exc:
                if last:
                    raise errors.APIConnectionError(f"cannot reach {self.base_url}: {exc}") from exc
                self._sleep(attempt, None)
                continue
            if response.status_code < 400:
                return response
            should_retry = response.headers.get("x-should-retry")
            retriable = response.status_code in RETRY_STATUSES and should_retry != "false"
            if retriable and not last:
                self._sleep(attempt, response)
                continue
            raise errors.error_from_response(response)
        raise AssertionError("unreachable")

    @staticmethod
    def _sleep(attempt: int, response: httpx.Response | None) -> None:
        delay = min(8.0, 0.5 * 2**attempt) * (0.75 + random.random() / 2)
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after:
            try:
                delay = float(retry_after)
            except ValueError:
                try:
                    delay = max(0.0, parsedate_to_datetime(retry_after).timestamp() - time.time())
                except (TypeError, ValueError):
                    pass
        time.sleep(min(delay, 60.0))

    def get_json(self, path: str, **params: Any) -> Any:
        clean = {k: v for k, v in params.items() if v is not None}
        return self.request("GET", path, params=clean).json()

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
        total = p.stat().st_size
        with open(p, "rb") as fh:
            reader = _ProgressReader(fh, total, on_progress)
            response = self._c.request(
                "POST",
                "/v1/files",
                files={"file": (p.name, reader, "application/jsonl")},
                data={"purpose": purpose},
                rewind=reader.rewind,
            )
        return FileObject.model_validate(response.json())

    def get(self, file_id: str) -> FileObject:
        return FileObject.model_validate(self._c.get_json(f"/v1/files/{file_id}"))

    def list(self, *, purpose: str | None = None, limit: int = 100) -> list[FileObject]:
        return _all_pages(self._c, "/v1/files", FileObject, limit=limit, purpose=purpose)

    def content(self, file_id: str) -> bytes:
        return self._c.request("GET", f"/v1/files/{file_id}/content").content

    def delete(self, file_id: str) -> bool:
        return bool(self._c.request("DELETE", f"/v1/files/{file_id}").json().get("deleted"))


class Jobs:
    def __init__(self, client: Client) -> None:
        self._c = client

    def create(self, body: JobCreate | dict[str, Any]) -> Job:
        if isinstance(body, JobCreate):
            payload = body.model_dump(mode="json", exclude_unset=True)
        else:
            payload = body
        return Job.model_validate(self._c.post_json("/v1/fine_tuning/jobs", payload))

    def get(self, job_id: str) -> Job:
        return Job.model_validate(self._c.get_json(f"/v1/fine_tuning/jobs/{job_id}"))

    def list(self, *, limit: int = 20, after: str | None = None) -> Page[Job]:
        raw = self._c.get_json("/v1/fine_tuning/jobs", limit=limit, after=after)
        return Page[Job].model_validate(raw)

    def list_all(self) -> list[Job]:
        return _all_pages(self._c, "/v1/fine_tuning/jobs", Job, limit=100)

    def cancel(self, job_id: str) -> Job:
        return Job.model_validate(self._c.post_json(f"/v1/fine_tuning/jobs/{job_id}/cancel"))

    def list_events(self, job_id: str, *, limit: int = 20, after: str | None = None) -> Page[Event]:
        """One page of events, newest first (OpenAI's order)."""
        raw = self._c.get_json(f"/v1/fine_tuning/jobs/{job_id}/events", limit=limit, after=after)
        return Page[Event].model_validate(raw)

    def events(self, job_id: str) -> Iterator[Event]:
        """Every event of the job, oldest first (the server pages newest first)."""
        events = _all_pages(self._c, f"/v1/fine_tuning/jobs/{job_id}/events", Event, limit=100)
        return iter(reversed(events))

    def stream(self, job_id: str, *, last_event_id: str | None = None) -> Iterator[Event]:
        """Live events, oldest first, until the job is finished. A dropped connection is
        resumed from the last event received (``Last-Event-ID``), up to ``max_retries`` times
        in a row."""
        failures = 0
        url = f"{self._c.base_url}/v1/fine_tuning/jobs/{job_id}/events"
        while True:
            headers = {**self._c._headers(), "Accept": "text/event-stream"}
            if last_event_id:
                headers["Last-Event-ID"] = last_event_id
            try:
                with self._c._http.stream(
                    "GET",
                    url,
                    params={"stream": "true"},
                    headers=headers,
                    timeout=httpx.Timeout(60.0, read=120.0),
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise errors.error_from_response(response)
                    for kind, event_id, data in _sse_messages(response.iter_lines()):
                        failures = 0
                        if kind == "done":
                            return
                        last_event_id = event_id
                        yield Event.model_validate_json(data)
            except httpx.TransportError as exc:
                failures += 1
                if failures > self._c.max_retries:
                    raise errors.APIConnectionError(f"event stream of {job_id} lost: {exc}") from exc
                self._c._sleep(failures - 1, None)

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
        """Download a succeeded job's adapter bundle and unpack it into ``dest``."""
        dest_path = Path(dest)
        url = f"{self._c.base_url}/v1/fine_tuning/jobs/{job_id}/adapter"
        with tempfile.TemporaryFile() as tmp:
            try:
                with self._c._http.stream("GET", url, headers=self._c._headers()) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise errors.error_from_response(response)
                    total = int(response.headers.get("content-length") or 0)
                    for chunk in response.iter_bytes():
                        tmp.write(chunk)
                        if on_progress:
                            on_progress(tmp.tell(), total)
            except httpx.TransportError as exc:
                raise errors.APIConnectionError(f"download of {job_id} failed: {exc}") from exc
            tmp.seek(0)
            dest_path.mkdir(parents=True, exist_ok=True)
            with tarfile.open(fileobj=tmp, mode="r:*") as tar:
                tar.extractall(dest_path, filter="data")
        return dest_path


class Models:
    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self) -> list[Model]:
        return [Model.model_validate(m) for m in self._c.get_json("/v1/models")["data"]]


class Admin:
    """Projects and API keys; needs an admin key."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def create_project(self, name: str) -> Project:
        return Project.model_validate(self._c.post_json("/v1/admin/projects", {"name": name}))

    def list_projects(self) -> list[Project]:
        return [Project.model_validate(p) for p in self._c.get_json("/v1/admin/projects")["data"]]

    def create_key(self, project_id: str, *, name: str = "default", role: str = "member") -> ApiKey:
        body = {"name": name, "role": role}
        return ApiKey.model_validate(self._c.post_json(f"/v1/admin/projects/{project_id}/api_keys", body))


def _sse_messages(lines: Iterator[str]) -> Iterator[tuple[str, str, str]]:
    """(event, id, data) for each message of a text/event-stream; comments are heartbeats."""
    kind, event_id, data = "message", "", []
    for line in lines:
        if not line:
            if data:
                yield kind, event_id, "\n".join(data)
            kind, data = "message", []
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "event":
            kind = value
        elif field == "id":
            event_id = value
        elif field == "data":
            data.append(value)


def _all_pages(client: Client, path: str, model: type, *, limit: int, **params: Any) -> list[Any]:
    items: list[Any] = []
    after: str | None = None
    while True:
        raw = client.get_json(path, limit=limit, after=after, **params)
        page = Page[model].model_validate(raw)  # type: ignore[valid-type]
        items.extend(page.data)
        if not page.has_more or not page.data:
            return items
        after = page.data[-1].id
