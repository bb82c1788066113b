"""/ui pages: sign in and out, the jobs list, a job's page and the ranking page."""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from tuneforge_api.deps import ServicesDep
from tuneforge_api.store import feedback, jobs, projects
from tuneforge_api.store.projects import Principal
from tuneforge_api.ui.pages import message, render
from tuneforge_api.ui.session import (
    COOKIE,
    Session,
    UiSettings,
    csrf_token,
    current_session,
    mint,
    principal_for,
    secret_for,
)

STATIC_DIR = Path(__file__).parent / "static"
LOGIN_COOKIE = "tf_login"  # the login form's own CSRF value (double submit), before any session
router = APIRouter(prefix="/ui", include_in_schema=False)


def _safe_next(target: str | None) -> str | None:
    """Only a path inside the console: never another origin (``//evil``, ``/\\evil``)."""
    if target and target.startswith("/ui/") and "//" not in target and "\\" not in target:
        return target
    return None


def _same_origin(request: Request) -> bool:
    """A defence in depth beside the token: a named foreign Origin is refused. Browsers send
    ``Origin: null`` under ``Referrer-Policy: no-referrer``, so null leaves it to the token."""
    origin = request.headers.get("origin")
    return origin in (None, "null") or origin == f"{request.url.scheme}://{request.url.netloc}"


def _login_redirect(request: Request) -> RedirectResponse:
    return RedirectResponse(f"/ui/login?next={quote(request.url.path)}", status_code=303)


async def _signed_in(request: Request, services: ServicesDep) -> tuple[Principal, Session] | None:
    session = current_session(request)
    principal = await principal_for(services, session) if session else None
    return (principal, session) if principal and session else None


@router.get("")
@router.get("/")
async def index(request: Request, services: ServicesDep) -> Response:
    found = await _signed_in(request, services)
    if found is None:
        return _login_redirect(request)
    principal, session = found
    if principal.is_labeler:
        csrf = csrf_token(secret_for(request), session)
        return message(
            "Ranking", "Open the ranking link you were given.", status=200, csrf=csrf, signed_in=True
        )
    return RedirectResponse("/ui/jobs", status_code=303)


def _login_page(request: Request, next: str | None, error: str = "", status: int = 200) -> Response:
    token = secrets.token_urlsafe(24)
    response = render(
        "login.html",
        title="Sign in",
        status=status,
        login_csrf=token,
        next=_safe_next(next) or "",
        error=error,
        hidden="" if error else "hidden",
    )
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        max_age=3600,
        path="/ui/login",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.get("/login")
async def login_form(request: Request, next: str | None = None) -> Response:
    return _login_page(request, next)


@router.post("/login")
async def login(
    request: Request,
    services: ServicesDep,
    key: Annotated[str, Form(max_length=512)] = "",
    csrf: Annotated[str, Form(max_length=128)] = "",
    next: Annotated[str, Form(max_length=2048)] = "",
) -> Response:
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if not _same_origin(request) or not expected or not hmac.compare_digest(csrf.encode(), expected.encode()):
        return message("Sign in", "The sign-in form expired; reload it and try again.", status=403)
    async with services.sessions() as db:
        principal = await projects.authenticate(db, key.strip()) if key.strip() else None
    if principal is None:
        # Same form again, with a fresh CSRF value; the key is never echoed back.
        return _login_page(request, next, "That key is not valid.", status=401)
    settings = UiSettings()
    target = _safe_next(next) or ("/ui/" if principal.is_labeler else "/ui/jobs")
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE,
        mint(secret_for(request), principal.key_id, settings.session_hours * 3600),
        max_age=int(settings.session_hours * 3600),
        path="/",  # the pages' scripts call /v1 with it
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    response.delete_cookie(LOGIN_COOKIE, path="/ui/login", httponly=True, samesite="strict")
    return response


@router.get("/logout")
async def logout_form(request: Request, services: ServicesDep) -> Response:
    found = await _signed_in(request, services)
    if found is None:
        return RedirectResponse("/ui/login", status_code=303)
    csrf = csrf_token(secret_for(request), found[1])
    return render("logout.html", title="Sign out", csrf=csrf, signed_in=True, form_csrf=csrf)


@router.post("/logout")
async def logout(request: Request, csrf: Annotated[str, Form(max_length=128)] = "") -> Response:
    session = current_session(request)
    if session is not None:
        expected = csrf_token(secret_for(request), session)
        if not _same_origin(request) or not hmac.compare_digest(csrf.encode(), expected.encode()):
            return message("Sign out", "The sign-out form expired; reload it and try again.", status=403)
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
    return response


async def _project_page(request: Request, services: ServicesDep) -> tuple[Principal, str] | Response:
    """A signed-in project key (not a labeler key) and its CSRF token, or the response to send."""
    found = await _signed_in(request, services)
    if found is None:
        return _login_redirect(request)
    principal, session = found
    csrf = csrf_token(secret_for(request), session)
    if principal.is_labeler:
        text = "A labeler key can open ranking pages only."
        return message("Not allowed", text, status=403, csrf=csrf, signed_in=True)
    return principal, csrf


@router.get("/jobs")
async def jobs_page(request: Request, services: ServicesDep) -> Response:
    found = await _project_page(request, services)
    if isinstance(found, Response):
        return found
    return render("jobs.html", title="Jobs", csrf=found[1], signed_in=True, scripts=("common.js", "jobs.js"))


@router.get("/jobs/{job_id}")
async def job_page(job_id: str, request: Request, services: ServicesDep) -> Response:
    found = await _project_page(request, services)
    if isinstance(found, Response):
        return found
    principal, csrf = found
    async with services.sessions() as db:
        row = await jobs.get_row(db, principal.project_id, job_id)
    if row is None:
        return message("Not found", f"No job {job_id}.", status=404, csrf=csrf, signed_in=True)
    return render(
        "job.html",
        title=f"Job {job_id}",
        csrf=csrf,
        signed_in=True,
        scripts=("common.js", "chart.js", "job.js"),
        job_id=job_id,
    )


@router.get("/feedback/{session_id}")
async def ranking_page(session_id: str, request: Request, services: ServicesDep) -> Response:
    found = await _signed_in(request, services)
    if found is None:
        return _login_redirect(request)
    principal, session = found
    csrf = csrf_token(secret_for(request), session)
    async with services.sessions() as db:
        exists = await feedback.get_row(db, principal.project_id, session_id) is not None
    if not exists:  # another project's session too, as the API answers
        return message(
            "Not found", f"No feedback session {session_id}.", status=404, csrf=csrf, signed_in=True
        )
    return render(
        "feedback.html",
        title="Rank answers",
        csrf=csrf,
        signed_in=True,
        scripts=("common.js", "rank.js"),
        session_id=session_id,
    )
