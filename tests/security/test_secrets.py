"""Secrets: API keys hashed at rest and never compared as plaintext; no API key, job token,
webhook secret or S3 credential in any log line, event or error message of a run that used
them all (the in-process half; test_secrets_e2e.py greps the real service's logs)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from tests.api.conftest import Harness, auth, chat_lines
from tests.conftest import ADMIN_KEY, drop_queue
from tests.security.world import TINY, member_key_of_new_project, snapshot
from tuneforge.types import JobStatus
from tuneforge_api.app import create_app
from tuneforge_api.bootstrap import ensure_default_project
from tuneforge_api.store import ids, jobs
from tuneforge_api.store.ids import hash_secret, new_secret


def test_api_keys_are_hashed_at_rest(api: Harness) -> None:
    member, _ = member_key_of_new_project(api)
    dump = repr(snapshot(api)["db"])
    for key in (ADMIN_KEY, member):
        assert key not in dump and hash_secret(key) in dump


@pytest.fixture
def sql_log(api: Harness) -> Iterator[list[str]]:
    """Every SQL statement with its parameters, as the database receives them."""
    seen: list[str] = []
    engine = api.app.state.services.engine.sync_engine

    def record(conn, cursor, statement, parameters, context, executemany) -> None:
        seen.append(f"{statement} {parameters!r}")

    event.listen(engine, "before_cursor_execute", record)
    yield seen
    event.remove(engine, "before_cursor_execute", record)


def test_keys_are_looked_up_by_hash_and_compared_in_constant_time(
    api: Harness, sql_log: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    member, _ = member_key_of_new_project(api)
    compared: list[tuple[str, str]] = []
    real = ids.hmac.compare_digest
    monkeypatch.setattr(ids.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    api.app.state.services.auth_cache.clear()
    sql_log.clear()
    assert api.http.get("/v1/files", headers=auth(member)).status_code == 200
    assert api.http.get("/v1/files", headers=auth(member + "x")).status_code == 401
    # The plaintext never reaches the database; its hash is the lookup key.
    assert not any(member in s for s in sql_log)
    assert any(hash_secret(member) in s for s in sql_log)
    # The stored hash is compared with hmac.compare_digest (no early exit on the first byte).
    assert (hash_secret(member), hash_secret(member)) in compared


def _job_token_for(api_app, job_id: str, portal) -> str:
    token = new_secret("tfjob")

    async def go() -> None:
        async with api_app.state.services.sessions() as session:
            assert await jobs.transition(
                session,
                job_id,
                (JobStatus.validating_files,),
                JobStatus.running,
                token_hash=hash_secret(token),
            )
            await session.commit()

    portal.call(go)
    return token


def test_no_secret_in_logs_events_or_errors(
    tmp_path, database_url: str, redis_url: str, s3_bucket: str, monkeypatch, caplog
) -> None:
    """A run on S3 storage with its own credentials, that uses every kind of secret, right and
    wrong; then every captured log record, event and response body is searched for each."""
    s3_key_id, s3_secret = f"AKIATF{uuid.uuid4().hex[:14].upper()}", f"tf-s3-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_key_id)  # moto accepts any credentials
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_secret)
    from tuneforge_api.settings import Settings

    settings = Settings(
        home=tmp_path / "home",
        database_url=database_url,
        redis_url=redis_url,
        queue_name=f"tf-test:{uuid.uuid4().hex}",
        api_key=ADMIN_KEY,
        storage_uri=f"s3://{s3_bucket}/secrets",
        webhooks_allow_private=True,
    )
    caplog.set_level(logging.DEBUG)
    app = create_app(settings)
    bodies: list[str] = []
    secrets: dict[str, str] = {"admin key": ADMIN_KEY, "S3 key id": s3_key_id, "S3 secret": s3_secret}
    with TestClient(app) as http:
        http.portal.call(ensure_default_project, app.state.services)

        def call(method: str, path: str, key: str, **kw):
            r = http.request(method, path, headers=auth(key), **kw)
            bodies.append(r.text)
            return r

        project = call("POST", "/v1/admin/projects", ADMIN_KEY, json={"name": "secrets"}).json()
        created = http.post(
            f"/v1/admin/projects/{project['id']}/api_keys", json={"name": "m"}, headers=auth(ADMIN_KEY)
        ).json()  # the one response that carries a key, once, by design: not searched
        member = secrets["member key"] = created["key"]
        # The webhook's secret, like a key, is returned once by its own create call: not searched.
        hook = http.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/h"}, headers=auth(member)).json()
        secrets["webhook secret"] = hook["secret"]
        f = http.post(
            "/v1/files",
            files={"file": ("a.jsonl", chat_lines())},
            data={"purpose": "fine-tune"},
            headers=auth(member),
        )
        assert f.status_code == 200, f.text
        job = call(
            "POST", "/v1/fine_tuning/jobs", member, json={"model": TINY, "training_file": f.json()["id"]}
        )
        token = secrets["job token"] = _job_token_for(app, job.json()["id"], http.portal)
        call("POST", f"/internal/v1/jobs/{job.json()['id']}/events", token, json={"message": "step 1"})
        # Wrong and misplaced secrets: their errors must not echo them.
        for wrong in (member + "x", token, s3_secret, hook["secret"]):
            call("GET", "/v1/files", wrong)
        call("POST", f"/internal/v1/jobs/{job.json()['id']}/events", member, json={"message": "x"})
        call("POST", "/internal/v1/jobs/ftjob-nope/events", token, json={"message": "x"})
        call("GET", f"/v1/files/{f.json()['id']}/content", member)
        # A token sent where an id belongs comes back to its own sender in the 400: not searched.
        http.post("/v1/fine_tuning/jobs", json={"model": TINY, "training_file": token}, headers=auth(member))
        call("GET", f"/v1/fine_tuning/jobs/{job.json()['id']}/events", member)
        call("GET", "/v1/webhooks", member)
        call("GET", "/readyz", "")
        events = http.get(f"/v1/fine_tuning/jobs/{job.json()['id']}/events", headers=auth(member)).text
    drop_queue(redis_url, settings.resolved_queue_name)
    logs = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert caplog.records, "nothing was logged: the search would prove nothing"
    for name, value in secrets.items():
        assert value not in logs, f"{name} in the logs"
        assert value not in events, f"{name} in the events"
        leaks = [b[:200] for b in bodies if value in b]
        assert not leaks, f"{name} in a response: {leaks}"
