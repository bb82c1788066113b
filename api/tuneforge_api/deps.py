"""FastAPI dependencies, as ``Annotated`` aliases for the route signatures."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from tuneforge_api.errors import ApiError
from tuneforge_api.services import Services
from tuneforge_api.store import projects
from tuneforge_api.store.ids import hash_secret
from tuneforge_api.store.projects import Principal
from tuneforge_api.ui import session as ui_session


async def get_services(request: Request) -> Services:
    # async on purpose: FastAPI runs plain-def dependencies in a threadpool, a thread hop
    # per request for a dict lookup.
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_session(services: ServicesDep) -> AsyncIterator[AsyncSession]:
    async with services.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


async def release(session: AsyncSession) -> None:
    """Give the connection back before slow I/O or a long response: the session dependency
    would otherwise hold it until the response ends, and SQLite has one connection."""
    await session.close()


def bearer_token(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing_api_key", "Send an API key as 'Authorization: Bearer <key>'.")
    return token.strip()


async def get_principal(request: Request, services: ServicesDep) -> Principal:
    if "authorization" not in request.headers and request.cookies.get(ui_session.COOKIE):
        # The web console's session cookie stands in for a Bearer key; unsafe methods must carry
        # its CSRF token (ui/session.py).
        principal = await ui_session.cookie_principal(request, services)
    else:
        principal = await _key_principal(request, services)
    if principal.is_labeler and not labeler_allowed(request):
        raise ApiError(403, "labeler_forbidden", "A labeler key can only rank answers in feedback sessions.")
    return principal


async def _key_principal(request: Request, services: Services) -> Principal:
    token = bearer_token(request)
    digest = hash_secret(token)
    principal = services.auth_cache.get(digest)
    if principal is None:
        async with services.sessions() as session:
            principal = await projects.authenticate(session, token)
        if principal is None:
            raise ApiError(401, "invalid_api_key", "The API key is not valid.")
        services.auth_cache.put(digest, principal)
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]

# Labeler keys (feedback sessions) are refused everywhere except on the few routes that carry
# this OpenAPI marker: the default is deny, so a new endpoint never opens to them by accident.
LABELER_ALLOWED = {"x-labeler-allowed": True}


def labeler_allowed(request: Request) -> bool:
    route = request.scope.get("route")
    return bool((getattr(route, "openapi_extra", None) or {}).get("x-labeler-allowed"))


async def get_admin(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise ApiError(403, "admin_required", "This endpoint needs an admin key.")
    return principal


AdminDep = Annotated[Principal, Depends(get_admin)]
