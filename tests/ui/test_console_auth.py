"""The console's sign-in, session cookie, CSRF and headers, in-process on SQLite and PostgreSQL."""

from __future__ import annotations

import re
import stat
import uuid
from fnmatch import fnmatch
from http.cookies import SimpleCookie
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from tests.api.conftest import Harness, auth, chat_lines
from tests.api.test_feedback import finish_generation, new_session
from tests.conftest import ADMIN_KEY
from tests.ui.conftest import TOKEN_IN_FORM, login, new_key, page_csrf, second_browser
from tuneforge_api.db.tables import ApiKeyRow
from tuneforge_api.services import Services
from tuneforge_api.settings import Settings
from tuneforge_api.ui import session as ui_session
from tuneforge_api.ui.headers import CSP

UI_DIR = Path(ui_session.__file__).parent
REQUIRED_CSP = [
    "script-src 'self'",
    "style-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "frame-ancestors 'none'",
]


def set_cookies(response) -> dict[str, SimpleCookie]:
    out = {}
    for header in response.headers.get_list("set-cookie"):
        cookie = SimpleCookie()
        cookie.load(header)
        out.update({name: cookie for name in cookie})
    return out


def assert_secure_headers(response) -> None:
    csp = response.headers["content-security-policy"]
    assert all(part in csp for part in REQUIRED_CSP), csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"


def test_pages_need_a_session_and_every_ui_response_has_the_headers(api: Harness) -> None:
    for path in ("/ui/jobs", "/ui/jobs/ftjob-x", "/ui/feedback/fbs-x", "/ui/"):
        r = api.http.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/ui/login?next=/ui/"), path
        assert_secure_headers(r)
    for path in ("/ui/login", "/ui/static/rank.js", "/ui/static/console.css", "/ui/static/missing.js"):
        assert_secure_headers(api.http.get(path))
    assert api.http.get("/ui/static/missing.js").status_code == 404
    # The API's own responses are untouched.
    assert "content-security-policy" not in api.http.get("/healthz").headers


def test_login_sets_an_opaque_hardened_cookie_that_the_api_accepts(api: Harness) -> None:
    r = login(api.http, ADMIN_KEY, "/ui/jobs")
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs"
    morsel = set_cookies(r)[ui_session.COOKIE][ui_session.COOKIE]
    assert morsel["httponly"] and morsel["samesite"].lower() == "strict" and morsel["path"] == "/"
    assert not morsel["secure"]  # plain http here; see the https test
    assert ADMIN_KEY not in morsel.value and ADMIN_KEY not in r.text
    # The JSON API takes the cookie in place of a Bearer key, for reads without a token.
    assert api.http.get("/v1/fine_tuning/jobs").status_code == 200
    page = api.http.get("/ui/jobs")
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"


def test_https_login_marks_the_cookie_secure(api: Harness) -> None:
    form = api.http.get("https://testserver/ui/login")
    assert set_cookies(form)["tf_login"]["tf_login"]["secure"]
    token = TOKEN_IN_FORM.search(form.text).group(1)
    data = {"key": ADMIN_KEY, "csrf": token, "next": ""}
    r = api.http.post("https://testserver/ui/login", data=data, follow_redirects=False)
    assert r.status_code == 303
    assert set_cookies(r)[ui_session.COOKIE][ui_session.COOKIE]["secure"]


def test_login_refuses_a_bad_key_and_a_forged_form(api: Harness) -> None:
    r = login(api.http, "tf-not-a-key", "/ui/jobs")
    assert r.status_code == 401 and "That key is not valid." in r.text
    assert ui_session.COOKIE not in set_cookies(r) and "tf-not-a-key" not in r.text

    token = TOKEN_IN_FORM.search(api.http.get("/ui/login").text).group(1)
    forged = {"key": ADMIN_KEY, "csrf": "guessed", "next": ""}
    assert api.http.post("/ui/login", data=forged, follow_redirects=False).status_code == 403
    other_site = {"origin": "https://evil.example"}
    form = {"key": ADMIN_KEY, "csrf": token, "next": ""}
    r = api.http.post("/ui/login", data=form, headers=other_site, follow_redirects=False)
    assert r.status_code == 403
    # A cross-site form post carries no login cookie (SameSite=Strict): refused too.
    with second_browser(api.http) as fresh:
        assert fresh.post("/ui/login", data=form, follow_redirects=False).status_code == 403
        assert ui_session.COOKIE not in fresh.cookies


@pytest.mark.parametrize(
    "target", ["//evil.example/x", "https://evil.example/", "/\\evil.example", "/v1/files"]
)
def test_next_stays_inside_the_console(api: Harness, target: str) -> None:
    r = login(api.http, ADMIN_KEY, target)
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs"


def test_cookie_requests_with_unsafe_methods_need_the_csrf_token(api: Harness) -> None:
    login(api.http, ADMIN_KEY)
    token = page_csrf(api.http)
    upload = {"files": {"file": ("t.jsonl", chat_lines())}, "data": {"purpose": "fine-tune"}}
    for headers in ({}, {"X-CSRF-Token": "wrong"}, {"X-CSRF-Token": token[:-1]}):
        r = api.http.post("/v1/files", headers=headers, **upload)
        assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed"
    r = api.http.post("/v1/files", headers={"X-CSRF-Token": token}, **upload)
    assert r.status_code == 200, r.text
    # A Bearer request is unaffected by the cookie next to it, and needs no token.
    r = api.http.post("/v1/files", headers=auth(ADMIN_KEY), **upload)
    assert r.status_code == 200
    # Another session's token does not fit this session.
    with second_browser(api.http) as other:
        login(other, ADMIN_KEY)
        r = other.post("/v1/files", headers={"X-CSRF-Token": token}, **upload)
        assert r.status_code == 403


def use_cookie(http: TestClient, value: str) -> None:
    http.cookies.clear()
    http.cookies.set(ui_session.COOKIE, value)


def test_forged_expired_and_revoked_sessions_are_refused(api: Harness) -> None:
    login(api.http, ADMIN_KEY)
    value = api.http.cookies[ui_session.COOKIE]
    version, body, mac = value.split(".")
    tampered = ".".join([version, body.replace(body[5], "A" if body[5] != "A" else "B"), mac])
    for bad in (tampered, "v1.e30.AAAA", "garbage", value + "x"):
        use_cookie(api.http, bad)
        r = api.http.get("/v1/fine_tuning/jobs")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_session", bad
        assert api.http.get("/ui/jobs", follow_redirects=False).status_code == 303

    secret = api.app.state.ui_secret
    key_id = ui_session.parse(secret, value).key_id
    use_cookie(api.http, ui_session.mint(secret, key_id, -1))
    assert api.http.get("/v1/fine_tuning/jobs").status_code == 401

    # Revoking the key ends its sessions (after the few seconds of the auth cache).
    use_cookie(api.http, value)
    member = new_key(api, api.client().admin.list_projects()[0].id, "member")

    async def revoke() -> None:
        async with api.app.state.services.sessions() as db:
            await db.execute(update(ApiKeyRow).where(ApiKeyRow.role == "member").values(revoked=True))
            await db.commit()

    with second_browser(api.http) as fresh:
        login(fresh, member)
        assert fresh.get("/v1/fine_tuning/jobs").status_code == 200
        api.http.portal.call(revoke)
        api.app.state.services.auth_cache.clear()
        assert fresh.get("/v1/fine_tuning/jobs").status_code == 401
    assert api.http.get("/v1/fine_tuning/jobs").status_code == 200  # the admin's session lives on


def test_logout_needs_its_token_and_clears_the_cookie(api: Harness) -> None:
    login(api.http, ADMIN_KEY)
    token = page_csrf(api.http)
    r = api.http.post("/ui/logout", data={"csrf": "wrong"}, follow_redirects=False)
    assert r.status_code == 403 and api.http.get("/v1/fine_tuning/jobs").status_code == 200
    r = api.http.post("/ui/logout", data={"csrf": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    assert api.http.get("/v1/fine_tuning/jobs").status_code == 401
    assert api.http.get("/ui/jobs", follow_redirects=False).status_code == 303


def test_job_page_is_scoped_to_the_project(api: Harness, other_key: str) -> None:
    f = api.upload()
    job = api.client().create_job(model="tuneforge/tiny-llama", training_file=f["id"])
    login(api.http, ADMIN_KEY)
    r = api.http.get(f"/ui/jobs/{job.id}")
    assert r.status_code == 200 and f'data-job-id="{job.id}"' in r.text
    assert api.http.get("/ui/jobs/ftjob-nope").status_code == 404

    with second_browser(api.http) as other:
        login(other, other_key)
        r = other.get(f"/ui/jobs/{job.id}")
        assert r.status_code == 404 and job.id in r.text  # the id the user typed, escaped; nothing more
        assert other.get(f"/v1/fine_tuning/jobs/{job.id}").status_code == 404


def test_labeler_key_gets_the_ranking_pages_only(api: Harness, project_id: str) -> None:
    labeler = new_key(api, project_id, "labeler")
    r = login(api.http, labeler)
    assert r.status_code == 303 and r.headers["location"] == "/ui/"
    assert "ranking link" in api.http.get("/ui/").text
    for path in ("/ui/jobs", "/ui/jobs/ftjob-x"):
        assert api.http.get(path).status_code == 403, path
    for path in ("/v1/fine_tuning/jobs", "/v1/files", "/v1/models"):
        r = api.http.get(path)
        assert r.status_code == 403 and r.json()["error"]["code"] == "labeler_forbidden", path
    assert api.http.get("/ui/feedback/fbs-nope").status_code == 404


def test_an_id_in_the_url_is_escaped(api: Harness) -> None:
    login(api.http, ADMIN_KEY)
    r = api.http.get("/ui/jobs/%3Cscript%3Ealert(1)%3C%5Cscript%3E")
    assert r.status_code == 404 and "<script>alert" not in r.text and "&lt;script&gt;" in r.text


def test_no_inline_script_style_or_handler_in_any_page() -> None:
    for path in (UI_DIR / "templates").glob("*.html"):
        text = path.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), path
        assert not re.search(r"<style|\sstyle=|\son[a-z]+=", text, re.I), path
    for path in (UI_DIR / "static").glob("*.js"):
        text = path.read_text()
        assert "innerHTML" not in text and "eval(" not in text and "insertAdjacentHTML" not in text, path
    assert "unsafe-inline" not in CSP


def test_package_data_ships_every_template_and_static_file() -> None:
    import tomllib

    pyproject = Path(__file__).parents[2] / "api" / "pyproject.toml"
    patterns = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-data"]["tuneforge_api"]
    package = UI_DIR.parent
    files = [p for folder in ("templates", "static") for p in (UI_DIR / folder).iterdir()]
    assert files
    for path in files:
        relative = path.relative_to(package).as_posix()
        assert any(fnmatch(relative, pattern) for pattern in patterns), relative


def _services(tmp_path: Path, **settings) -> Services:
    return Services.build(Settings(home=tmp_path, redis_url="redis://127.0.0.1:1/0", **settings))


def test_session_secret_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNEFORGE_UI_SECRET", raising=False)
    # Without a configured secret: a file in home, 0600, the same across restarts.
    first = ui_session.resolve_secret(_services(tmp_path / "a"))
    assert first == ui_session.resolve_secret(_services(tmp_path / "a"))
    assert stat.S_IMODE((tmp_path / "a" / "ui_secret").stat().st_mode) == 0o600
    assert first != ui_session.resolve_secret(_services(tmp_path / "b"))
    # Two replicas sharing the admin key (or TUNEFORGE_UI_SECRET) accept each other's sessions.
    key = "tf-" + uuid.uuid4().hex
    a = ui_session.resolve_secret(_services(tmp_path / "c", api_key=key))
    assert a == ui_session.resolve_secret(_services(tmp_path / "d", api_key=key))
    assert key.encode() not in a
    monkeypatch.setenv("TUNEFORGE_UI_SECRET", "s" * 40)
    b = ui_session.resolve_secret(_services(tmp_path / "c", api_key=key))
    assert b != a and b == ui_session.resolve_secret(_services(tmp_path / "e"))
    cookie = ui_session.mint(a, "key-1", 60)
    assert ui_session.parse(a, cookie).key_id == "key-1" and ui_session.parse(b, cookie) is None


def test_ranking_page_is_scoped_to_the_project(api: Harness, project_id: str, other_key: str) -> None:
    prompts = b'{"messages": [{"role": "user", "content": "hi"}]}\n'
    file_id = api.upload(data=prompts, name="prompts.jsonl")["id"]
    body = {"model": "tuneforge/tiny-llama", "prompts_file": file_id, "k": 2}
    r = api.http.post("/v1/feedback/sessions", json=body, headers=auth(ADMIN_KEY))
    assert r.status_code == 201, r.text
    session_id = r.json()["id"]
    with second_browser(api.http) as mine:
        login(mine, new_key(api, project_id, "labeler"), f"/ui/feedback/{session_id}")
        page = mine.get(f"/ui/feedback/{session_id}")
        assert page.status_code == 200 and f'data-session-id="{session_id}"' in page.text
        assert "/ui/static/rank.js" in page.text
        # Generating: the page's script is told to wait (409), with the session's progress.
        assert mine.get(f"/v1/feedback/sessions/{session_id}/next_item").status_code == 409
        assert mine.get(f"/v1/feedback/sessions/{session_id}").status_code == 200
    other_labeler = api.http.post(
        "/v1/feedback/labeler_keys", json={"name": "eve"}, headers=auth(other_key)
    ).json()["key"]
    for key in (other_key, other_labeler):
        with second_browser(api.http) as theirs:
            login(theirs, key)
            assert theirs.get(f"/ui/feedback/{session_id}").status_code == 404
            assert theirs.get(f"/v1/feedback/sessions/{session_id}/next_item").status_code == 404


def test_next_item_by_cookie_needs_the_csrf_token(api: Harness, project_id: str) -> None:
    # next_item is a GET that opens items: by cookie it needs the token, or a page of a sibling
    # site could hold a labeler's items.
    ready = finish_generation(api, new_session(api, k=2, labels_per_item=1))
    url = f"/v1/feedback/sessions/{ready['id']}/next_item"
    with second_browser(api.http) as mine:
        login(mine, new_key(api, project_id, "labeler"), f"/ui/feedback/{ready['id']}")
        token = page_csrf(mine, f"/ui/feedback/{ready['id']}")
        for headers in ({}, {"X-CSRF-Token": "wrong"}, {"X-CSRF-Token": token[:-1]}):
            r = mine.get(url, headers=headers)
            assert r.status_code == 403 and r.json()["error"]["code"] == "csrf_failed"
        # The refused requests opened nothing: item 0 is still free for someone else.
        bearer = mine.get(url, headers=auth(new_key(api, project_id, "labeler")))
        assert bearer.status_code == 200 and bearer.json()["item"]["index"] == 0
        r = mine.get(url, headers={"X-CSRF-Token": token})
        assert r.status_code == 200 and r.json()["item"]["index"] == 1
