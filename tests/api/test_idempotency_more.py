"""Idempotency-Key on the other creating POSTs: file upload, webhook create, admin project and
key create. Responses that carry a secret are stored without it (checked in the table)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from sqlalchemy import func, select

from tests.api.conftest import Harness, auth, chat_lines
from tests.conftest import ADMIN_KEY
from tuneforge_api.db.tables import ApiKeyRow, FileRow, IdempotencyRow


def upload(api: Harness, key: str, data: bytes, name: str = "train.jsonl", api_key: str = ADMIN_KEY):
    return api.http.post(
        "/v1/files",
        files={"file": (name, data)},
        data={"purpose": "fine-tune"},
        headers={**auth(api_key), "Idempotency-Key": key},
    )


def stored_responses(api: Harness) -> list[dict]:
    async def go() -> list[dict]:
        async with api.app.state.services.sessions() as session:
            return list(await session.scalars(select(IdempotencyRow.response)))

    return api.http.portal.call(go)


def count(api: Harness, table: type) -> int:
    async def go() -> int:
        async with api.app.state.services.sessions() as session:
            return await session.scalar(select(func.count()).select_from(table))

    return api.http.portal.call(go)


# -- uploads -----------------------------------------------------------------------------------


def test_upload_replayed_returns_the_same_file_stored_once(api: Harness) -> None:
    first = upload(api, "u1", chat_lines(3))
    again = upload(api, "u1", chat_lines(3))
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert len(api.stored_objects()) == 1 and count(api, FileRow) == 1


@pytest.mark.parametrize("change", ["content", "filename"])
def test_upload_same_key_other_body_is_422(api: Harness, change: str) -> None:
    assert upload(api, "u2", chat_lines(3)).status_code == 200
    if change == "content":
        r = upload(api, "u2", chat_lines(4))
    else:
        r = upload(api, "u2", chat_lines(3), name="other.jsonl")
    assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused"
    assert r.headers["x-should-retry"] == "false"
    assert len(api.stored_objects()) == 1 and count(api, FileRow) == 1


def test_upload_bad_input_does_not_burn_the_key(api: Harness) -> None:
    bad = upload(api, "u3", b'{"messages": []}\n')
    assert bad.status_code == 400 and api.stored_objects() == []
    assert upload(api, "u3", chat_lines(2)).status_code == 200
    r = upload(api, "x" * 256, chat_lines(2))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_idempotency_key"


def test_upload_key_of_another_project_replays_nothing(api: Harness, other_key: str) -> None:
    mine = upload(api, "shared", chat_lines(3)).json()
    theirs = upload(api, "shared", chat_lines(3), api_key=other_key)
    assert theirs.status_code == 200 and "idempotent-replayed" not in theirs.headers
    assert theirs.json()["id"] != mine["id"]
    r = api.http.get(f"/v1/files/{mine['id']}", headers=auth(other_key))
    assert r.status_code == 404


def test_concurrent_uploads_with_one_key_store_one_file(api: Harness) -> None:
    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=api.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            return await asyncio.gather(
                *(
                    http.post(
                        "/v1/files",
                        files={"file": ("t.jsonl", chat_lines(3))},
                        data={"purpose": "fine-tune"},
                        headers={**auth(ADMIN_KEY), "Idempotency-Key": "race"},
                    )
                    for _ in range(3)
                )
            )

    answers = api.http.portal.call(go)
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert len({r.json()["id"] for r in answers}) == 1
    assert len(api.stored_objects()) == 1 and count(api, FileRow) == 1


# -- webhooks: the secret is restored from the webhook's own row --------------------------------


@pytest.fixture
def open_api(api: Harness) -> Harness:
    api.settings.webhooks_allow_private = True
    return api


def hook(api: Harness, key: str, url: str = "http://127.0.0.1:9/hook", api_key: str = ADMIN_KEY):
    return api.http.post("/v1/webhooks", json={"url": url}, headers={**auth(api_key), "Idempotency-Key": key})


def test_webhook_replay_returns_the_secret_without_storing_it(open_api: Harness) -> None:
    first = hook(open_api, "w1")
    again = hook(open_api, "w1")
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and first.json()["secret"]
    assert again.headers["idempotent-replayed"] == "true"
    assert len(open_api.http.get("/v1/webhooks", headers=auth(ADMIN_KEY)).json()["data"]) == 1
    secret = first.json()["secret"]
    assert all(secret not in json.dumps(r) for r in stored_responses(open_api))


def test_webhook_same_key_other_body_is_422(open_api: Harness) -> None:
    assert hook(open_api, "w2").status_code == 200
    r = hook(open_api, "w2", url="http://127.0.0.1:9/other")
    assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused"


def test_webhook_replay_after_delete_is_409(open_api: Harness) -> None:
    created = hook(open_api, "w3").json()
    assert open_api.http.delete(f"/v1/webhooks/{created['id']}", headers=auth(ADMIN_KEY)).status_code == 200
    r = hook(open_api, "w3")
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotent_replay_secret_unavailable"
    assert r.headers["x-should-retry"] == "false"


def test_webhook_key_of_another_project_replays_nothing(open_api: Harness, other_key: str) -> None:
    mine = hook(open_api, "w4").json()
    theirs = hook(open_api, "w4", api_key=other_key)
    assert theirs.status_code == 200 and theirs.json()["id"] != mine["id"]
    assert theirs.json()["secret"] != mine["secret"]
    r = open_api.http.get(f"/v1/webhooks/{mine['id']}/deliveries", headers=auth(other_key))
    assert r.status_code == 404


# -- admin: projects replay; API keys cannot (only their hash exists) -----------------------------


def admin_post(api: Harness, path: str, body: dict, key: str, api_key: str = ADMIN_KEY):
    return api.http.post(path, json=body, headers={**auth(api_key), "Idempotency-Key": key})


def test_project_create_replayed(api: Harness) -> None:
    first = admin_post(api, "/v1/admin/projects", {"name": "p-one"}, "p1")
    again = admin_post(api, "/v1/admin/projects", {"name": "p-one"}, "p1")
    assert first.status_code == again.status_code == 200 and again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    other = admin_post(api, "/v1/admin/projects", {"name": "p-two"}, "p1")
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    # Without a key, the duplicate name is still the usual 400.
    dup = api.http.post("/v1/admin/projects", json={"name": "p-one"}, headers=auth(ADMIN_KEY))
    assert dup.status_code == 400 and dup.json()["error"]["code"] == "project_exists"


def test_key_create_replay_is_409_and_the_secret_is_not_stored(api: Harness) -> None:
    project = api.client().admin.create_project("keys").id
    path = f"/v1/admin/projects/{project}/api_keys"
    before = count(api, ApiKeyRow)
    first = admin_post(api, path, {"name": "ci"}, "k1")
    assert first.status_code == 200 and first.json()["key"]
    again = admin_post(api, path, {"name": "ci"}, "k1")
    assert again.status_code == 409
    error = again.json()["error"]
    assert error["code"] == "idempotent_replay_secret_unavailable" and first.json()["id"] in error["message"]
    assert again.headers["x-should-retry"] == "false"
    assert count(api, ApiKeyRow) == before + 1  # the replay made no second key
    assert all(first.json()["key"] not in json.dumps(r) for r in stored_responses(api))
    reused = admin_post(api, path, {"name": "other"}, "k1")
    assert reused.status_code == 422


def test_key_create_bad_input_and_other_project(api: Harness, other_key: str) -> None:
    project = api.client().admin.create_project("keys2").id
    path = f"/v1/admin/projects/{project}/api_keys"
    bad = admin_post(api, path, {"name": "x", "role": "root"}, "k2")
    assert bad.status_code == 400
    missing = admin_post(api, "/v1/admin/projects/proj-nope/api_keys", {"name": "x"}, "k2")
    assert missing.status_code == 404
    member = admin_post(api, path, {"name": "x"}, "k2", api_key=other_key)
    assert member.status_code == 403  # a member key of another project cannot manage keys
    assert admin_post(api, path, {"name": "x"}, "k2").status_code == 200


def test_revoke_the_key_whose_secret_was_lost(api: Harness, other_key: str) -> None:
    project = api.client().admin.create_project("revoke").id
    path = f"/v1/admin/projects/{project}/api_keys"
    created = admin_post(api, path, {"name": "lost"}, "k9").json()
    assert api.http.get("/v1/files", headers=auth(created["key"])).status_code == 200
    replay = admin_post(api, path, {"name": "lost"}, "k9")
    assert created["id"] in replay.json()["error"]["message"]
    gone = api.http.delete(f"{path}/{created['id']}", headers=auth(ADMIN_KEY))
    assert gone.json() == {"id": created["id"], "object": "api_key", "deleted": True}
    assert api.http.get("/v1/files", headers=auth(created["key"])).status_code == 401
    # Unknown key, a key under another project's path, and a member key: refused.
    assert api.http.delete(f"{path}/key-nope", headers=auth(ADMIN_KEY)).status_code == 404
    other = api.client().admin.create_project("revoke2").id
    r = api.http.delete(f"/v1/admin/projects/{other}/api_keys/{created['id']}", headers=auth(ADMIN_KEY))
    assert r.status_code == 404
    assert api.http.delete(f"{path}/{created['id']}", headers=auth(other_key)).status_code == 403
