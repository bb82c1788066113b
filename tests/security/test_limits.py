"""OWASP API4: per-project quotas (unfinished jobs, stored bytes) and the request rate limit.
Over a limit: 429 in the error envelope, with Retry-After, and nothing created or stored."""

from __future__ import annotations

import asyncio
import uuid

import pytest

import tuneforge.client
from tests.api.conftest import Harness, auth, chat_lines
from tests.conftest import ADMIN_KEY
from tests.security.world import member_key_of_new_project, snapshot
from tuneforge import RateLimitError
from tuneforge_api.rate_limit import LocalBuckets, RateLimiter

TINY = "tuneforge/tiny-llama"


def _assert_429(r, code: str) -> None:
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["type"] == "rate_limit_error"
    assert int(r.headers["retry-after"]) >= 1


def test_active_jobs_quota(api: Harness) -> None:
    api.app.state.services.settings.max_active_jobs = 2
    f = api.upload()
    body = {"model": TINY, "training_file": f["id"]}
    first, _ = (api.http.post("/v1/fine_tuning/jobs", json=body, headers=auth(ADMIN_KEY)) for _ in range(2))
    before = snapshot(api)
    r = api.http.post("/v1/fine_tuning/jobs", json=body, headers=auth(ADMIN_KEY))
    _assert_429(r, "active_jobs_limit")
    assert r.headers["x-should-retry"] == "false"  # the SDK does not sleep on a quota
    assert snapshot(api) == before
    r = api.http.post("/v1/fine_tuning/jobs/validate", json=body, headers=auth(ADMIN_KEY))
    _assert_429(r, "active_jobs_limit")  # the dry run says what create would
    # Another project has its own quota.
    key_b, _ = member_key_of_new_project(api)
    f_b = api.upload(key=key_b)
    r = api.http.post("/v1/fine_tuning/jobs", json={**body, "training_file": f_b["id"]}, headers=auth(key_b))
    assert r.status_code == 200, r.text
    # A finished job frees its place.
    api.http.post(f"/v1/fine_tuning/jobs/{first.json()['id']}/cancel", headers=auth(ADMIN_KEY))
    assert api.http.post("/v1/fine_tuning/jobs", json=body, headers=auth(ADMIN_KEY)).status_code == 200


def test_storage_quota(api: Harness) -> None:
    data = chat_lines(4)
    api.app.state.services.settings.max_storage_bytes = 2 * len(data) + len(data) // 2
    first = api.upload(data=data)
    api.upload(data=data)
    before = snapshot(api)
    r = api.http.post(
        "/v1/files", files={"file": ("x.jsonl", data)}, data={"purpose": "fine-tune"}, headers=auth(ADMIN_KEY)
    )
    _assert_429(r, "storage_limit")
    assert snapshot(api) == before  # nothing stored, no row
    assert api.http.delete(f"/v1/files/{first['id']}", headers=auth(ADMIN_KEY)).status_code == 200
    api.upload(data=data)


def test_file_size_limit_is_413(api: Harness) -> None:
    big = chat_lines(1) * (api.settings.max_upload_bytes // len(chat_lines(1)) + 10)
    before = snapshot(api)
    r = api.http.post(
        "/v1/files", files={"file": ("x.jsonl", big)}, data={"purpose": "fine-tune"}, headers=auth(ADMIN_KEY)
    )
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    assert snapshot(api) == before


def _limit(api: Harness, rate: float, burst: int) -> RateLimiter:
    limiter = RateLimiter(api.settings.redis_url, rate, burst, f"tf-test-rl:{uuid.uuid4().hex}")
    api.app.state.rate_limiter = limiter
    return limiter


def test_rate_limit_per_project(api: Harness) -> None:
    key_b, _ = member_key_of_new_project(api)
    _limit(api, rate=0.01, burst=3)
    codes = [api.http.get("/v1/files", headers=auth(ADMIN_KEY)).status_code for _ in range(3)]
    assert codes == [200, 200, 200]
    r = api.http.get("/v1/files", headers=auth(ADMIN_KEY))
    _assert_429(r, "rate_limit_exceeded")
    assert int(r.headers["retry-after"]) >= 60  # one token per 100 s: the wait is long
    assert api.http.get("/v1/files", headers=auth(key_b)).status_code == 200  # B has its own bucket
    assert api.http.get("/healthz").status_code == 200  # probes carry no key and are not counted
    assert api.http.get("/v1/files", headers=auth("tf-not-a-key")).status_code == 401


def test_replicas_share_buckets_in_redis(redis_url: str) -> None:
    prefix = f"tf-test-rl:{uuid.uuid4().hex}"

    async def go() -> list[bool]:
        one, two = RateLimiter(redis_url, 0.01, 3, prefix), RateLimiter(redis_url, 0.01, 3, prefix)
        taken = [(await one.take("proj-a")).allowed for _ in range(2)]
        taken += [(await two.take("proj-a")).allowed for _ in range(2)]
        assert one.local._buckets == {} and two.local._buckets == {}  # Redis answered, no fallback
        await one.close()
        await two.close()
        return taken

    assert asyncio.run(go()) == [True, True, True, False]


def test_redis_down_falls_back_in_process(api: Harness) -> None:
    """A limiter whose Redis does not answer never fails a request, and still limits."""
    from tests.conftest import free_port

    api.app.state.rate_limiter = RateLimiter(f"redis://127.0.0.1:{free_port()}/0", 0.01, 2, "tf-down")
    codes = [api.http.get("/v1/models", headers=auth(ADMIN_KEY)).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


def test_local_bucket_refills() -> None:
    buckets = LocalBuckets()
    assert [buckets.take("p", rate=1.0, burst=2, now=0.0).allowed for _ in range(3)] == [True, True, False]
    denied = buckets.take("p", rate=1.0, burst=2, now=0.5)
    assert not denied.allowed and denied.retry_after_s == pytest.approx(0.5)
    assert buckets.take("p", rate=1.0, burst=2, now=1.6).allowed


def test_sdk_waits_for_retry_after(api: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    _limit(api, rate=0.05, burst=1)  # one token per 20 s
    slept: list[float] = []
    monkeypatch.setattr(tuneforge.client.time, "sleep", slept.append)
    client = api.client()
    client.max_retries = 2
    client.files.list()
    with pytest.raises(RateLimitError):
        client.files.list()
    # The server's Retry-After (about 20 s), not the SDK's own backoff (0.5 s, then 1 s).
    assert len(slept) == 2 and all(18 <= s <= 20 for s in slept), slept
