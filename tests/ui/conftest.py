"""The console in-process (the ``api`` harness: the real app over TestClient, SQLite and
PostgreSQL) and, for the browser tests, the real service with a real headless Chromium."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient

from tests.api.conftest import Harness, api, other_key  # noqa: F401  (fixtures, shared)
from tuneforge_api.store import projects

TOKEN_IN_FORM = re.compile(r'name="csrf" value="([^"]+)"')
TOKEN_IN_META = re.compile(r'<meta name="csrf-token" content="([^"]*)">')


def login(http: TestClient, key: str, next_path: str = "") -> object:
    """Sign in through the form, as a browser does: GET the form (its CSRF cookie), then POST."""
    form = http.get("/ui/login", params={"next": next_path} if next_path else None)
    token = TOKEN_IN_FORM.search(form.text).group(1)
    return http.post("/ui/login", data={"key": key, "csrf": token, "next": next_path}, follow_redirects=False)


@contextmanager
def second_browser(http: TestClient) -> Iterator[TestClient]:
    """The same client with an empty cookie jar for a while: another browser. (A second
    TestClient would run the app on another event loop, which asyncpg's pool cannot share.)"""
    saved = list(http.cookies.jar)
    http.cookies.clear()
    try:
        yield http
    finally:
        http.cookies.clear()
        for cookie in saved:
            http.cookies.jar.set_cookie(cookie)


def page_csrf(http: TestClient, path: str = "/ui/jobs") -> str:
    return TOKEN_IN_META.search(http.get(path).text).group(1)


def new_key(api: Harness, project_id: str, role: str) -> str:  # noqa: F811
    """A key of any role, written by the real store (labeler keys included)."""

    async def create() -> str:
        async with api.app.state.services.sessions() as session:
            key = await projects.create_key(session, project_id, name=f"ui-{role}", role=role)
            await session.commit()
            return key.key or ""

    return api.http.portal.call(create)


@pytest.fixture
def project_id(api: Harness) -> str:  # noqa: F811
    return api.client().admin.list_projects()[0].id
