"""Keys, projects and the admin endpoints."""

from __future__ import annotations

import asyncio
import stat

import pytest
from sqlalchemy import select

from tests.api.conftest import Harness, auth
from tests.conftest import ADMIN_KEY
from tuneforge import AuthenticationError, PermissionDeniedError
from tuneforge_api.bootstrap import ensure_default_project
from tuneforge_api.db.tables import ApiKeyRow
from tuneforge_api.services import Services
from tuneforge_api.settings import Settings


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer "}],
)
def test_missing_or_wrong_key_is_401(api: Harness, headers: dict) -> None:
    for path in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/models"):
        r = api.http.get(path, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_sdk_raises_authentication_error(api: Harness) -> None:
    with pytest.raises(AuthenticationError) as exc:
        api.client("tf-wrong").files.list()
    assert exc.value.status_code == 401 and exc.value.code == "invalid_api_key"


def test_admin_creates_project_and_member_key(api: Harness) -> None:
    admin = api.client()
    project = admin.admin.create_project("team-b")
    assert project.name == "team-b" and project.id in [p.id for p in admin.admin.list_projects()]
    key = admin.admin.create_key(project.id, name="ci")
    assert key.key and key.role == "member" and key.project_id == project.id
    member = api.client(key.key)
    assert member.files.list() == []
    with pytest.raises(PermissionDeniedError):
        member.admin.create_project("sneaky")
    with pytest.raises(PermissionDeniedError):
        member.admin.create_key(project.id, role="admin")
    r = api.http.post("/v1/admin/projects", json={"name": "team-b"}, headers=auth(ADMIN_KEY))
    assert r.status_code == 400 and r.json()["error"]["code"] == "project_exists"
    r = api.http.post("/v1/admin/projects/proj-nope/api_keys", json={}, headers=auth(ADMIN_KEY))
    assert r.status_code == 404
    r = api.http.post("/v1/admin/projects", json={"name": "../x"}, headers=auth(ADMIN_KEY))
    assert r.status_code == 400


def test_keys_are_stored_hashed(api: Harness) -> None:
    key = api.client().admin.create_key(api.client().admin.list_projects()[0].id).key or ""

    async def stored() -> list[str]:
        async with api.app.state.services.sessions() as session:
            return list(await session.scalars(select(ApiKeyRow.key_hash)))

    hashes = api.http.portal.call(stored)
    assert hashes and all(len(h) == 64 for h in hashes)
    assert key not in hashes and ADMIN_KEY not in hashes


def test_first_start_generates_key_into_0600_credentials(tmp_path, redis_url) -> None:
    settings = Settings(home=tmp_path / "home", redis_url=redis_url)
    services = Services.build(settings)

    async def go() -> tuple[str | None, str | None]:
        from tuneforge_api.db.engine import migrate

        await migrate(services.engine)
        first = await ensure_default_project(services)
        second = await ensure_default_project(services)
        await services.close()
        return first, second

    first, second = asyncio.run(go())
    assert first and first.startswith("tf-") and second is None
    cred = settings.home / "credentials"
    assert stat.S_IMODE(cred.stat().st_mode) == 0o600
    assert cred.read_text().strip() == f"TUNEFORGE_API_KEY={first}"


def test_health(api: Harness) -> None:
    assert api.http.get("/healthz").json() == {"status": "ok"}
    ready = api.http.get("/readyz").json()
    assert ready["checks"] == {"database": True, "queue": True}
