"""The console's session cookie and its CSRF token.

The cookie never holds the API key. It holds ``v1.<payload>.<mac>``: the key's id, an expiry
and a random nonce, signed with HMAC-SHA256 under a server secret. Each use re-reads the key
row, so a revoked key ends its sessions (within the 5 s auth cache), and a stolen cookie dies
at its expiry even if the key lives on. The CSRF token is a second MAC over the session's
nonce: a page gets it in a meta tag and scripts echo it in ``X-CSRF-Token``; a cross-site page
can neither read it nor compute it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import select

from tuneforge_api.db.tables import ApiKeyRow
from tuneforge_api.errors import ApiError
from tuneforge_api.services import Services
from tuneforge_api.store.projects import Principal

COOKIE = "tf_session"
CSRF_HEADER = "x-csrf-token"
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
log = logging.getLogger("tuneforge.ui")


class UiSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_UI_", extra="ignore")

    secret: SecretStr | None = None  # shared by every API replica; see docs/console.md
    session_hours: float = 12.0


@dataclass(frozen=True)
class Session:
    key_id: str
    expires: int
    nonce: str


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _secret_file(home: Path) -> bytes:
    """A random secret kept in the state folder (0600), created once; the single-node default."""
    path = home / "ui_secret"
    home.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    value = secrets.token_hex(32).encode()
    with os.fdopen(fd, "wb") as fh:
        fh.write(value)
    return value


def resolve_secret(services: Services) -> bytes:
    """TUNEFORGE_UI_SECRET; else derived from the admin key (the same on every replica);
    else a file in the home folder. Domain-separated, so a session MAC reveals nothing of the key."""
    ui = UiSettings()
    if ui.secret is not None and ui.secret.get_secret_value():
        root = ui.secret.get_secret_value().encode()
    elif services.settings.api_key is not None and services.settings.api_key.get_secret_value():
        root = services.settings.api_key.get_secret_value().encode()
    else:
        if services.settings.environment == "production":
            log.warning("TUNEFORGE_UI_SECRET is unset: console sessions work on this replica only")
        root = _secret_file(services.settings.home)
    return hmac.new(root, b"tuneforge-ui-session-v1", hashlib.sha256).digest()


def secret_for(request: Request) -> bytes:
    state = request.app.state
    if getattr(state, "ui_secret", None) is None:
        state.ui_secret = resolve_secret(state.services)
    return state.ui_secret


def _mac(secret: bytes, label: bytes, payload: bytes) -> str:
    return _b64(hmac.new(secret, label + b"\0" + payload, hashlib.sha256).digest())


def mint(secret: bytes, key_id: str, lifetime_s: float) -> str:
    payload = json.dumps(
        {"k": key_id, "e": int(time.time() + lifetime_s), "n": secrets.token_urlsafe(16)},
        separators=(",", ":"),
    ).encode()
    return f"v1.{_b64(payload)}.{_mac(secret, b'session', payload)}"


def parse(secret: bytes, value: str) -> Session | None:
    """The session in a cookie value, or None if it is forged, malformed or expired."""
    try:
        version, body, mac = value.split(".")
        payload = _unb64(body)
    except ValueError:
        return None
    if version != "v1" or not hmac.compare_digest(mac, _mac(secret, b"session", payload)):
        return None
    data = json.loads(payload)
    session = Session(key_id=str(data["k"]), expires=int(data["e"]), nonce=str(data["n"]))
    return session if session.expires > time.time() else None


def csrf_token(secret: bytes, session: Session) -> str:
    return _mac(secret, b"csrf", session.nonce.encode())


def current_session(request: Request) -> Session | None:
    value = request.cookies.get(COOKIE)
    return parse(secret_for(request), value) if value else None


async def principal_for(services: Services, session: Session) -> Principal | None:
    """The key behind a session, re-read (through the short auth cache) so revocation applies."""
    cache_key = "ui-session:" + session.key_id
    principal = services.auth_cache.get(cache_key)
    if principal is None:
        async with services.sessions() as db:
            row = await db.scalar(select(ApiKeyRow).where(ApiKeyRow.id == session.key_id))
        if row is None or row.revoked:
            return None
        principal = Principal(project_id=row.project_id, key_id=row.id, role=row.role)
        services.auth_cache.put(cache_key, principal)
    return principal


async def cookie_principal(request: Request, services: Services) -> Principal:
    """For ``deps.get_principal``: a request carrying the console cookie instead of a Bearer key.
    Unsafe methods must echo the session's CSRF token."""
    session = current_session(request)
    principal = await principal_for(services, session) if session else None
    if session is None or principal is None:
        raise ApiError(401, "invalid_session", "The console session is not valid; sign in again.")
    if request.method in UNSAFE_METHODS:
        sent = request.headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(sent.encode(), csrf_token(secret_for(request), session).encode()):
            raise ApiError(403, "csrf_failed", "Missing or wrong X-CSRF-Token for a console session.")
    return principal
