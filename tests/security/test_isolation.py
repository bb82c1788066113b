"""OWASP API1 and API5 on every route the app has at run time.

Project B's member key against project A's objects: a 404 that B cannot tell from the answer
for an id that does not exist, and no side effect (every DB row and stored object compared
before and after). Admin-only routes answer 403 to a member key. A route this file has no case
for fails ``test_every_route_has_an_isolation_case``: declare one below when adding a route.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from tests.api.conftest import Harness, auth
from tests.security.routes import RouteInfo, all_routes
from tests.security.world import PROMPTS, World, build_world, member_key_of_new_project, redact, snapshot
from tuneforge_api.checkpoints import checkpoint_id

# How to name A's objects, by path parameter; each id is also tried in its "missing" form.
BINDINGS: dict[str, Callable[[World], list[str]]] = {
    "file_id": lambda w: [w.file_id],
    "job_id": lambda w: [w.active_job, w.done_job],
    "fine_tuning_job_id": lambda w: [w.active_job, w.done_job],
    "model_id": lambda w: [w.ft_model],
    "webhook_id": lambda w: [w.webhook_id],
    "project_id": lambda w: [w.project_a],
    "key_id": lambda w: [w.key_b_id],  # admin routes only: a member may not touch even its own key
    "session_id": lambda w: [w.feedback_session],
    "item_id": lambda w: ["fbi-" + "ab" * 12],  # B is stopped at the session, before the item
}
# Valid bodies, so that B's request reaches the ownership check rather than stopping at validation.
BODIES: dict[tuple[str, str], dict] = {
    ("POST", "/v1/admin/projects/{project_id}/api_keys"): {"name": "stolen", "role": "admin"},
    ("POST", "/v1/admin/projects"): {"name": "b-made-this"},
    ("POST", "/internal/v1/jobs/{job_id}/events"): {"message": "forged", "type": "metrics"},
    ("POST", "/v1/feedback/sessions/{session_id}/items/{item_id}/labels"): {"ranking": [], "skipped": True},
    ("POST", "/v1/feedback/sessions/{session_id}/export"): {"min_labels": 1},
}
# Creates that take ids of other objects in the body: A's ids must be "not found" for B.
# Their arguments: A's world, and B's own chat and prompts files.
CREATES_WITH_REFERENCES: dict[tuple[str, str], Callable[[World, dict[str, str]], list[dict]]] = {
    ("POST", "/v1/fine_tuning/jobs"): lambda w, b: _job_bodies(w, b["chat"]),
    ("POST", "/v1/fine_tuning/jobs/validate"): lambda w, b: _job_bodies(w, b["chat"]),
    ("POST", "/v1/feedback/sessions"): lambda w, b: [
        {"model": "tuneforge/tiny-llama", "prompts_file": w.prompts_file, "k": 2},
        {"model": w.ft_model, "prompts_file": b["prompts"], "k": 2},
    ],
}
# Creates whose body names no other object: what B creates lands in B, never in A.
CREATES_WITHOUT_REFERENCES = {
    ("POST", "/v1/files"),
    ("POST", "/v1/webhooks"),
    ("POST", "/v1/feedback/labeler_keys"),
}
# Routes outside the project API: reachable without a key, and revealing no project's data.
PUBLIC = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
    ("GET", "/ui"),
    ("GET", "/ui/"),
    ("GET", "/ui/login"),
    ("POST", "/ui/login"),
    ("GET", "/ui/logout"),
    ("POST", "/ui/logout"),
    ("GET", "/ui/jobs"),
    ("GET", "/ui/static"),
}
# Console pages of one object, signed in by cookie: as the API, a 404 B cannot tell apart.
CONSOLE_OBJECT_PAGES = {("GET", "/ui/jobs/{job_id}"), ("GET", "/ui/feedback/{session_id}")}
# The trainer's route takes a job token (tests/security/test_job_tokens.py); a project key is refused.
JOB_TOKEN_ROUTES = {("POST", "/internal/v1/jobs/{job_id}/events")}


def _job_bodies(w: World, b_file: str) -> list[dict]:
    """Bodies whose one foreign reference is A's; the rest is B's own and valid."""
    mine = {"model": "tuneforge/tiny-llama", "training_file": b_file}
    return [
        {**mine, "training_file": w.file_id},
        {**mine, "validation_file": w.file_id},
        {**mine, "model": w.ft_model},
        {**mine, "from_checkpoint": checkpoint_id(w.done_job, 1)},
    ]


def _missing(ident: str) -> str:
    """An id of the same shape that names nothing."""
    return re.sub(r"[0-9a-f]{6}$", "000000", ident) if not ident.endswith("000000") else ident + "1"


def _declared(route: RouteInfo) -> bool:
    key = route.key
    if key in PUBLIC or key in CONSOLE_OBJECT_PAGES or key in JOB_TOKEN_ROUTES:
        return True
    if not route.project_scoped:
        return False
    if route.admin_only:
        return True
    if route.params:
        return all(p in BINDINGS for p in route.params) and (not route.has_body or key in BODIES)
    return route.method == "GET" or key in CREATES_WITH_REFERENCES or key in CREATES_WITHOUT_REFERENCES


def test_every_route_has_an_isolation_case(api: Harness) -> None:
    missing = [f"{r.method} {r.path}" for r in all_routes(api.app) if not _declared(r)]
    assert not missing, f"declare an isolation case in {__file__} for: {missing}"


@pytest.fixture
def world(api: Harness) -> World:
    key_b, key_b_id = member_key_of_new_project(api)
    return build_world(api, key_b, key_b_id)


def _call(api: Harness, route: RouteInfo, url: str, key: str, body: dict | None = None):
    if body is None:
        body = BODIES.get(route.key)
    kwargs = {"json": body} if body is not None else {}
    return api.http.request(route.method, url, headers=auth(key), **kwargs)


def _bindings(route: RouteInfo, world: World) -> list[tuple[dict[str, str], dict[str, str]]]:
    """(A's ids, missing ids) for each combination of the route's parameters."""
    combos: list[dict[str, str]] = [{}]
    for param in route.params:
        combos = [{**c, param: v} for c in combos for v in BINDINGS[param](world)]
    return [(c, {k: _missing(v) for k, v in c.items()}) for c in combos]


def _same_answer(r_a, r_missing, a_ids: dict[str, str], missing_ids: dict[str, str]) -> bool:
    text_a, text_m = r_a.text, r_missing.text
    for name in a_ids:
        text_a, text_m = redact(text_a, a_ids[name]), redact(text_m, missing_ids[name])
    return r_a.status_code == r_missing.status_code and text_a == text_m


def test_project_b_cannot_reach_project_a(api: Harness, world: World) -> None:
    failures, tried = [], set()
    for route in all_routes(api.app):
        if not route.project_scoped or route.admin_only or not route.params:
            continue
        tried.add(route.key)
        for a_ids, missing_ids in _bindings(route, world):
            before = snapshot(api)
            r_b = _call(api, route, route.url(a_ids), world.key_b)
            if snapshot(api) != before:
                failures.append(f"{route.method} {route.url(a_ids)}: B's request changed A's state")
            r_missing = _call(api, route, route.url(missing_ids), world.key_b)
            if r_b.status_code != 404 or r_b.json()["error"]["type"] != "not_found_error":
                failures.append(
                    f"{route.method} {route.url(a_ids)}: B got {r_b.status_code} {r_b.text[:200]}"
                )
            elif not _same_answer(r_b, r_missing, a_ids, missing_ids):
                failures.append(f"{route.method} {route.path}: B can tell A's object from a missing one")
            if route.method == "GET":  # control: the id is real, so A can tell it from a missing one
                r_a = api.http.get(route.url(a_ids), headers=auth(world.key_a))
                r_a_missing = api.http.get(route.url(missing_ids), headers=auth(world.key_a))
                if _same_answer(r_a, r_a_missing, a_ids, missing_ids):
                    failures.append(f"control: A cannot tell {route.url(a_ids)} from a missing id")
    assert not failures, "\n".join(failures)
    assert len(tried) >= 15, tried  # every object route of the API, as of this writing


def test_lists_show_only_the_callers_objects(api: Harness, world: World) -> None:
    lists = [r for r in all_routes(api.app) if r.project_scoped and not r.params and r.method == "GET"]
    assert lists
    for route in lists:
        r = api.http.get(route.path, headers=auth(world.key_b))
        leaked = [i for i in world.a_ids() if i in r.text]
        if route.admin_only:
            assert r.status_code == 403, route.path
        else:
            assert r.status_code == 200 and not leaked, f"{route.path} shows B {leaked}"


def test_creates_cannot_reference_another_projects_objects(api: Harness, world: World) -> None:
    b_files = {
        "chat": api.upload(key=world.key_b)["id"],
        "prompts": api.upload(key=world.key_b, data=PROMPTS)["id"],
    }
    for key, bodies in CREATES_WITH_REFERENCES.items():
        method, path = key
        for body in bodies(world, b_files):
            before = snapshot(api)
            r_b = api.http.request(method, path, json=body, headers=auth(world.key_b))
            assert snapshot(api) == before, f"{path} {body}: B's request changed state"
            missing = {k: _missing(v) if v in world.a_ids() else v for k, v in body.items()}
            if "from_checkpoint" in body:
                missing["from_checkpoint"] = checkpoint_id(_missing(world.done_job), 1)
            r_m = api.http.request(method, path, json=missing, headers=auth(world.key_b))
            assert 400 <= r_b.status_code < 500, (path, body, r_b.text)
            assert r_b.json()["error"]["code"] == r_m.json()["error"]["code"], (
                path,
                body,
                r_b.text,
                r_m.text,
            )
            assert r_b.status_code == r_m.status_code


def test_creates_land_in_the_callers_project(api: Harness, world: World) -> None:
    assert {("POST", p) for p in ("/v1/files", "/v1/webhooks", "/v1/feedback/labeler_keys")} == set(
        CREATES_WITHOUT_REFERENCES
    ), "a new create route: add it here"
    a_views = {p: api.http.get(p, headers=auth(world.key_a)).json() for p in ("/v1/files", "/v1/webhooks")}
    r = api.http.post(
        "/v1/files",
        files={"file": ("b.jsonl", b'{"prompt": "a", "completion": "b"}\n')},
        data={"purpose": "fine-tune"},
        headers=auth(world.key_b),
    )
    assert r.status_code == 200, r.text
    api.app.state.services.settings.webhooks_allow_private = True  # no DNS here; nothing is delivered
    r = api.http.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/b"}, headers=auth(world.key_b))
    assert r.status_code == 200, r.text
    assert {p: api.http.get(p, headers=auth(world.key_a)).json() for p in a_views} == a_views
    # B's labeler key works for B's sessions only: A's session is "not found" to it.
    r = api.http.post("/v1/feedback/labeler_keys", json={"name": "l"}, headers=auth(world.key_b))
    assert r.status_code == 201, r.text
    labeler = r.json()["key"]
    for path in (
        f"/v1/feedback/sessions/{world.feedback_session}",
        f"/v1/feedback/sessions/{world.feedback_session}/next_item",
    ):
        r = api.http.get(path, headers=auth(labeler))
        assert r.status_code == 404, (path, r.text)


def test_admin_routes_refuse_member_keys(api: Harness, world: World) -> None:
    admin_routes = [r for r in all_routes(api.app) if r.admin_only]
    assert admin_routes
    for route in admin_routes:
        values = {p: BINDINGS[p](world)[0] for p in route.params}
        for key in (world.key_b,):
            before = snapshot(api)
            r = _call(api, route, route.url(values), key)
            assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", (
                route.path,
                r.text,
            )
            assert snapshot(api) == before


def test_project_keys_cannot_post_trainer_events(api: Harness, world: World) -> None:
    for method, path in JOB_TOKEN_ROUTES:
        for key in (world.key_b, world.key_a):  # not even A's own admin key
            before = snapshot(api)
            r = api.http.request(
                method, path.format(job_id=world.active_job), json={"message": "x"}, headers=auth(key)
            )
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_job_token"
            assert snapshot(api) == before


def test_public_routes_reveal_no_project_data(api: Harness, world: World) -> None:
    for method, path in PUBLIC:
        if method != "GET" or "{" in path:
            continue
        r = api.http.get(path, follow_redirects=False)
        assert r.status_code < 500
        assert not [i for i in world.a_ids() if i in r.text], path


def _console_cookie(api: Harness, key: str) -> dict[str, str]:
    """Sign in to the web console the way a browser does; returns its cookies."""
    http = api.http
    form = http.get("/ui/login")
    csrf = re.search(r'name="csrf"[^>]*value="([^"]+)"', form.text) or re.search(
        r'value="([^"]+)"[^>]*name="csrf"', form.text
    )
    assert csrf, "the login form has no csrf field"
    r = http.post(
        "/ui/login",
        data={"key": key, "csrf": csrf.group(1)},
        headers={"origin": "http://testserver"},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text[:300]
    cookies = dict(http.cookies)
    http.cookies.clear()  # the shared client must not carry B's session into other requests
    return cookies


def test_console_pages_do_not_reveal_other_projects(api: Harness, world: World) -> None:
    pages = [r for r in all_routes(api.app) if r.key in CONSOLE_OBJECT_PAGES]
    if not pages:
        pytest.skip("this build has no web console")
    cookies = _console_cookie(api, world.key_b)
    for route in pages:
        if not all(p in BINDINGS for p in route.params):
            continue  # feedback sessions: covered by the API route of the same object
        for a_ids, missing_ids in _bindings(route, world):
            r_b = api.http.get(route.url(a_ids), cookies=cookies)
            r_m = api.http.get(route.url(missing_ids), cookies=cookies)
            assert r_b.status_code == 404, (route.path, r_b.status_code)
            assert _same_answer(r_b, r_m, a_ids, missing_ids), route.path
