"""Presigned adapter downloads: on s3:// storage with ``TUNEFORGE_PRESIGN`` on, the client fetches
each file of the adapter bundle straight from the object store, with short-lived URLs, instead of
through the API. The answer carries every file's sha256 from the manifest, and the manifest itself
is one of the files, so the SDK verifies exactly as it does for the streamed archive.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from pydantic import BaseModel

from tuneforge.storage import MANIFEST, Storage, check_key
from tuneforge_api.errors import ApiError


class AdapterFileUrl(BaseModel):
    name: str  # path inside the bundle, as in manifest.json's "files"
    url: str
    bytes: int
    sha256: str


class AdapterUrls(BaseModel):
    object: str = "fine_tuning.job.adapter_urls"
    job_id: str
    expires_at: int
    files: list[AdapterFileUrl]


def can_presign(storage: Storage, enabled: bool) -> bool:
    return enabled and callable(getattr(storage, "presigned_get", None))


def unavailable() -> ApiError:
    return ApiError(
        404,
        "presigned_download_unavailable",
        "This server streams adapters: download GET /v1/fine_tuning/jobs/{id}/adapter instead.",
        headers={"x-should-retry": "false"},
    )


def presigned_urls(storage: Any, prefix: str, job_id: str, ttl_s: int) -> AdapterUrls:
    """One URL per file of the bundle (blocking I/O: call in a thread). ``storage`` must
    ``can_presign``; the manifest must exist."""
    manifest_bytes = storage.get_bytes(prefix + MANIFEST)
    listed: dict[str, str] = json.loads(manifest_bytes).get("files") or {}
    expires_at = int(time.time()) + ttl_s

    def entry(name: str, digest: str) -> AdapterFileUrl:
        key = check_key(prefix + name)  # a manifest naming ../ cannot point outside the bundle
        return AdapterFileUrl(
            name=name, url=storage.presigned_get(key, ttl_s), bytes=storage.size(key), sha256=digest
        )

    files = [entry(name, digest) for name, digest in sorted(listed.items())]
    files.append(entry(MANIFEST, hashlib.sha256(manifest_bytes).hexdigest()))
    return AdapterUrls(job_id=job_id, expires_at=expires_at, files=files)
