"""Adapter download by presigned URL on s3:// storage (moto's real S3-compatible server): the
SDK fetches the files straight from the object store and still checks every sha256; on
file:// storage, or with presigning off, the bundle streams through the API as before."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import Harness, auth, harness, serve
from tests.conftest import ADMIN_KEY
from tuneforge import AdapterIntegrityError, AsyncClient, Client
from tuneforge.storage import MANIFEST, adapter_prefix
from tuneforge.types import JobStatus
from tuneforge_api.store import jobs

TINY = "tuneforge/tiny-llama"
FILES = {"adapter_model.safetensors": b"\x00weights" * 1000, "adapter_config.json": b'{"r": 8}'}


def s3_harness(tmp_path: Path, redis_url: str, bucket: str, *, presign: bool) -> Iterator[Harness]:
    yield from harness(tmp_path, redis_url, storage_uri=f"s3://{bucket}/tf", presign=presign)


@pytest.fixture
def s3_api(tmp_path: Path, redis_url: str, s3_bucket: str) -> Iterator[Harness]:
    yield from s3_harness(tmp_path, redis_url, s3_bucket, presign=True)


@pytest.fixture
def s3_api_no_presign(tmp_path: Path, redis_url: str, s3_bucket: str) -> Iterator[Harness]:
    yield from s3_harness(tmp_path, redis_url, s3_bucket, presign=False)


@pytest.fixture
def s3_url(s3_api: Harness) -> Iterator[str]:
    yield from serve(s3_api)


def succeeded_job(api: Harness, key: str = ADMIN_KEY) -> dict:
    """A job moved to succeeded, with an adapter bundle published as the trainer does: the
    files, then manifest.json (sha256 of each) last."""
    f = api.upload(key=key)
    r = api.http.post(
        "/v1/fine_tuning/jobs", json={"model": TINY, "training_file": f["id"]}, headers=auth(key)
    )
    job = r.json()
    storage = api.app.state.services.storage
    prefix = adapter_prefix(job["organization_id"], job["id"])
    for name, data in FILES.items():
        storage.put_bytes(prefix + name, data)
    manifest = {"files": {n: hashlib.sha256(d).hexdigest() for n, d in FILES.items()}, "base_model": TINY}
    storage.put_bytes(prefix + MANIFEST, json.dumps(manifest).encode())

    async def finish() -> None:
        async with api.app.state.services.sessions() as session:
            path = (JobStatus.validating_files, JobStatus.queued, JobStatus.running, JobStatus.succeeded)
            for before, after in zip(path, path[1:], strict=False):
                assert await jobs.transition(session, job["id"], (before,), after)
            await session.commit()

    api.http.portal.call(finish)
    return job


def recording_client(base_url: str) -> tuple[Client, list[str]]:
    seen: list[str] = []
    http = httpx.Client(event_hooks={"request": [lambda req: seen.append(str(req.url))]})
    return Client(base_url=base_url, api_key=ADMIN_KEY, http_client=http, max_retries=0), seen


def test_urls_point_at_the_object_store(s3_api: Harness, s3_endpoint: str) -> None:
    job = succeeded_job(s3_api)
    r = s3_api.http.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter/urls", headers=auth(ADMIN_KEY))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["job_id"] == job["id"] and 0 < body["expires_at"] - time.time() <= 300
    names = [f["name"] for f in body["files"]]
    assert sorted(names) == sorted([*FILES, MANIFEST])
    for f in body["files"]:
        assert f["url"].startswith(s3_endpoint) and "X-Amz-Signature" in f["url"]
        assert ADMIN_KEY not in f["url"]
        data = httpx.get(f["url"]).content  # no API key: the URL alone grants this one object
        assert hashlib.sha256(data).hexdigest() == f["sha256"] and len(data) == f["bytes"]


def test_sdk_downloads_from_the_store_and_verifies(
    s3_api: Harness, s3_url: str, s3_endpoint: str, tmp_path: Path
) -> None:
    job = succeeded_job(s3_api)
    client, seen = recording_client(s3_url)
    progress: list[tuple[int, int]] = []
    out = client.adapters.download(
        job["id"], tmp_path / "out", on_progress=lambda d, t: progress.append((d, t))
    )
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != MANIFEST} == FILES
    assert json.loads((out / MANIFEST).read_text())["base_model"] == TINY
    assert not any(u.endswith("/adapter") for u in seen)  # the archive route was not used
    assert sum(u.startswith(s3_endpoint) for u in seen) == len(FILES) + 1
    assert progress[-1][0] == progress[-1][1] > 0


def test_async_sdk_downloads_from_the_store(s3_api: Harness, s3_url: str, tmp_path: Path) -> None:
    job = succeeded_job(s3_api)

    async def go() -> Path:
        async with AsyncClient(base_url=s3_url, api_key=ADMIN_KEY, max_retries=0) as client:
            return await client.adapters.download(job["id"], tmp_path / "out")

    out = asyncio.run(go())
    assert (out / "adapter_model.safetensors").read_bytes() == FILES["adapter_model.safetensors"]


@pytest.mark.parametrize("use_async", [False, True])
def test_tampered_object_is_detected(s3_api: Harness, s3_url: str, tmp_path: Path, use_async: bool) -> None:
    job = succeeded_job(s3_api)
    prefix = adapter_prefix(job["organization_id"], job["id"])
    s3_api.app.state.services.storage.put_bytes(prefix + "adapter_model.safetensors", b"tampered")
    folder = tmp_path / "downloads"
    folder.mkdir()
    dest = folder / "out"
    with pytest.raises(AdapterIntegrityError, match="adapter_model.safetensors"):
        if use_async:

            async def go() -> None:
                async with AsyncClient(base_url=s3_url, api_key=ADMIN_KEY, max_retries=0) as client:
                    await client.adapters.download(job["id"], dest)

            asyncio.run(go())
        else:
            Client(base_url=s3_url, api_key=ADMIN_KEY, max_retries=0).adapters.download(job["id"], dest)
    assert list(folder.iterdir()) == []  # neither the bundle nor a staging folder


def test_another_project_and_unfinished_job_are_404(s3_api: Harness) -> None:
    job = succeeded_job(s3_api)
    admin = s3_api.client()
    project = admin.admin.create_project("other").id
    other_key = admin.admin.create_key(project, name="b").key or ""
    r = s3_api.http.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter/urls", headers=auth(other_key))
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    f = s3_api.upload()
    pending = s3_api.http.post(
        "/v1/fine_tuning/jobs", json={"model": TINY, "training_file": f["id"]}, headers=auth(ADMIN_KEY)
    ).json()
    r = s3_api.http.get(f"/v1/fine_tuning/jobs/{pending['id']}/adapter/urls", headers=auth(ADMIN_KEY))
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"
    r = s3_api.http.get("/v1/fine_tuning/jobs/ftjob-nope/adapter/urls", headers=auth(ADMIN_KEY))
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"


def test_presign_off_streams_through_the_api(s3_api_no_presign: Harness, tmp_path: Path) -> None:
    api = s3_api_no_presign
    job = succeeded_job(api)
    r = api.http.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter/urls", headers=auth(ADMIN_KEY))
    assert r.status_code == 404 and r.json()["error"]["code"] == "presigned_download_unavailable"
    out = api.client().adapters.download(job["id"], tmp_path / "out")
    assert (out / "adapter_config.json").read_bytes() == FILES["adapter_config.json"]


def test_file_storage_keeps_streaming(api: Harness, tmp_path: Path) -> None:
    api.settings.presign = True  # asked for, but file:// cannot presign
    job = succeeded_job(api)
    r = api.http.get(f"/v1/fine_tuning/jobs/{job['id']}/adapter/urls", headers=auth(ADMIN_KEY))
    assert r.status_code == 404 and r.json()["error"]["code"] == "presigned_download_unavailable"
    out = api.client().adapters.download(job["id"], tmp_path / "out")
    assert {p.name for p in out.iterdir()} == {*FILES, MANIFEST}
