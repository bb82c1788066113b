"""What the sync and async clients share: request descriptions, the retry policy, SSE
parsing and adapter verification. Nothing here does I/O on the network."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import tarfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from tuneforge import errors
from tuneforge.types import (
    ApiKey,
    Checkpoint,
    Event,
    FileObject,
    Hyperparameters,
    Job,
    JobCreate,
    JobValidation,
    Method,
    MethodType,
    Model,
    Page,
    Project,
    Webhook,
    WebhookDelivery,
)

RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
MAX_DELAY_S = 60.0


@dataclass(frozen=True)
class Call:
    """One API request and how to read its answer."""

    method: str
    path: str
    parse: Callable[[Any], Any] = lambda raw: raw
    params: dict[str, Any] = field(default_factory=dict)
    json: Any = None

    def query(self) -> dict[str, Any]:
        return {k: v for k, v in self.params.items() if v is not None}


def headers(api_key: str, method: str, idempotency_key: str | None = None) -> dict[str, str]:
    out = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if method == "POST":
        out["Idempotency-Key"] = idempotency_key or uuid.uuid4().hex
    return out


def is_retriable(response: httpx.Response) -> bool:
    return response.status_code in RETRY_STATUSES and response.headers.get("x-should-retry") != "false"


def retry_delay(attempt: int, response: httpx.Response | None) -> float:
    """Jittered exponential backoff; the server's Retry-After wins when it gives one."""
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
    return min(max(delay, 0.0), MAX_DELAY_S)


def page_of(model: type) -> Callable[[Any], Page[Any]]:
    return lambda raw: Page[model].model_validate(raw)  # type: ignore[valid-type]


def job_body(
    model: str,
    training_file: str,
    method: str | dict[str, Any] | Method,
    hyperparameters: dict[str, Any] | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """``create_job``'s shorthand: ``method="supervised"`` plus ``hyperparameters`` becomes
    OpenAI's method object; only what the caller set is sent."""
    if isinstance(method, str):
        kind = MethodType(method)
        params = {"hyperparameters": Hyperparameters(**(hyperparameters or {}))}
        method = Method.model_validate({"type": kind, kind.value: params})
    elif hyperparameters is not None:
        raise ValueError("pass hyperparameters inside the method object, or method as a string")
    body = JobCreate.model_validate(
        {"model": model, "training_file": training_file, "method": method, **extra}
    )
    return body.model_dump(mode="json", exclude_unset=True)


class Calls:
    """Every endpoint, as a ``Call``."""

    @staticmethod
    def get_file(file_id: str) -> Call:
        return Call("GET", f"/v1/files/{file_id}", FileObject.model_validate)

    @staticmethod
    def list_files(*, limit: int, after: str | None, purpose: str | None) -> Call:
        return Call(
            "GET", "/v1/files", page_of(FileObject), {"limit": limit, "after": after, "purpose": purpose}
        )

    @staticmethod
    def delete_file(file_id: str) -> Call:
        return Call("DELETE", f"/v1/files/{file_id}", lambda raw: bool(raw.get("deleted")))

    @staticmethod
    def create_job(body: JobCreate | dict[str, Any]) -> Call:
        payload = body.model_dump(mode="json", exclude_unset=True) if isinstance(body, JobCreate) else body
        return Call("POST", "/v1/fine_tuning/jobs", Job.model_validate, json=payload)

    @staticmethod
    def validate_job(body: JobCreate | dict[str, Any]) -> Call:
        payload = body.model_dump(mode="json", exclude_unset=True) if isinstance(body, JobCreate) else body
        return Call("POST", "/v1/fine_tuning/jobs/validate", JobValidation.model_validate, json=payload)

    @staticmethod
    def get_job(job_id: str) -> Call:
        return Call("GET", f"/v1/fine_tuning/jobs/{job_id}", Job.model_validate)

    @staticmethod
    def list_jobs(*, limit: int, after: str | None) -> Call:
        return Call("GET", "/v1/fine_tuning/jobs", page_of(Job), {"limit": limit, "after": after})

    @staticmethod
    def cancel_job(job_id: str) -> Call:
        return Call("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel", Job.model_validate)

    @staticmethod
    def list_events(job_id: str, *, limit: int, after: str | None) -> Call:
        return Call(
            "GET", f"/v1/fine_tuning/jobs/{job_id}/events", page_of(Event), {"limit": limit, "after": after}
        )

    @staticmethod
    def list_checkpoints(job_id: str, *, limit: int, after: str | None) -> Call:
        params = {"limit": limit, "after": after}
        return Call("GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints", page_of(Checkpoint), params)

    @staticmethod
    def list_models() -> Call:
        return Call("GET", "/v1/models", lambda raw: [Model.model_validate(m) for m in raw["data"]])

    @staticmethod
    def create_project(name: str) -> Call:
        return Call("POST", "/v1/admin/projects", Project.model_validate, json={"name": name})

    @staticmethod
    def list_projects() -> Call:
        return Call("GET", "/v1/admin/projects", lambda raw: [Project.model_validate(p) for p in raw["data"]])

    @staticmethod
    def create_key(project_id: str, *, name: str, role: str) -> Call:
        body = {"name": name, "role": role}
        return Call("POST", f"/v1/admin/projects/{project_id}/api_keys", ApiKey.model_validate, json=body)

    @staticmethod
    def revoke_key(project_id: str, key_id: str) -> Call:
        path = f"/v1/admin/projects/{project_id}/api_keys/{key_id}"
        return Call("DELETE", path, lambda raw: bool(raw.get("deleted")))


class WebhookCalls:
    """The /v1/webhooks endpoints, as ``Call``s (shared by both clients)."""

    @staticmethod
    def create(url: str, events: list[str] | None) -> Call:
        body: dict[str, Any] = {"url": url}
        if events is not None:  # left out: every job event
            body["events"] = list(events)
        return Call("POST", "/v1/webhooks", Webhook.model_validate, json=body)

    @staticmethod
    def list() -> Call:
        return Call("GET", "/v1/webhooks", lambda raw: [Webhook.model_validate(w) for w in raw["data"]])

    @staticmethod
    def delete(webhook_id: str) -> Call:
        return Call("DELETE", f"/v1/webhooks/{webhook_id}", lambda raw: bool(raw.get("deleted")))

    @staticmethod
    def deliveries(webhook_id: str) -> Call:
        parse = lambda raw: [WebhookDelivery.model_validate(d) for d in raw["data"]]  # noqa: E731
        return Call("GET", f"/v1/webhooks/{webhook_id}/deliveries", parse)


def sse_messages(lines: Iterable[str]) -> Iterator[tuple[str, str, str]]:
    """(event, id, data) for each message of a text/event-stream; comments are heartbeats."""
    parser = SseParser()
    for line in lines:
        if (message := parser.feed(line)) is not None:
            yield message


class SseParser:
    """Line-at-a-time SSE parsing, usable from sync and async loops alike."""

    def __init__(self) -> None:
        self.kind, self.event_id, self.data = "message", "", []

    def feed(self, line: str) -> tuple[str, str, str] | None:
        if not line:
            message = (self.kind, self.event_id, "\n".join(self.data)) if self.data else None
            self.kind, self.data = "message", []
            return message
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self.kind = value
        elif name == "id":
            self.event_id = value
        elif name == "data":
            self.data.append(value)
        return None


def staging_dir(dest: Path) -> Path:
    """A fresh folder next to ``dest`` where a download lands before it is verified."""
    staging = dest.parent / f".{dest.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    return staging


def unpack_verified(archive_path: Path, dest: Path) -> Path:
    """Unpack an adapter archive into ``dest`` only if every file matches the sha256 in its
    manifest; ``dest`` never holds an unverified file."""
    staging = staging_dir(dest)
    try:
        with tarfile.open(archive_path, mode="r:*") as tar:
            tar.extractall(staging, filter="data")
        return place_verified(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def place_verified(staging: Path, dest: Path) -> Path:
    """Move a downloaded bundle from ``staging`` into ``dest`` once every file in its manifest
    matches its sha256 (AdapterIntegrityError otherwise)."""
    manifest_path = staging / "manifest.json"
    if not manifest_path.is_file():
        raise errors.AdapterIntegrityError("the adapter bundle has no manifest.json")
    manifest = json.loads(manifest_path.read_text())
    for name, digest in (manifest.get("files") or {}).items():
        path = staging / name
        if not path.is_file() or _sha256(path) != digest:
            raise errors.AdapterIntegrityError(f"{name} does not match its sha256 in manifest.json")
    dest.mkdir(parents=True, exist_ok=True)
    for item in staging.iterdir():
        target = dest / item.name
        if target.is_dir():
            shutil.rmtree(target)
        item.replace(target)
    return dest


PRESIGN_UNAVAILABLE = {"presigned_download_unavailable", "not_found"}  # not_found: an older server


class AdapterFileUrl(BaseModel):
    name: str
    url: str
    bytes: int
    sha256: str


class AdapterUrls(BaseModel):
    """``GET .../adapter/urls``: short-lived URLs of the bundle's files in the object store."""

    job_id: str
    expires_at: int
    files: list[AdapterFileUrl]


def adapter_urls_call(job_id: str) -> Call:
    return Call("GET", f"/v1/fine_tuning/jobs/{job_id}/adapter/urls", AdapterUrls.model_validate)


def bundle_path(staging: Path, name: str) -> Path:
    """Where a bundle file lands; a name that could leave the folder is refused."""
    parts = name.split("/")
    if not name or name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts):
        raise errors.AdapterIntegrityError(f"unsafe file name {name!r} in the adapter bundle")
    path = staging.joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def check_digest(file: AdapterFileUrl, digest: Any) -> None:
    """A file fetched by presigned URL must hash to what the server announced (from the manifest)."""
    if digest.hexdigest() != file.sha256:
        raise errors.AdapterIntegrityError(f"{file.name} does not match its sha256 in manifest.json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
