"""Public identifiers and secrets."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def new_secret(prefix: str) -> str:
    return f"{prefix}-{secrets.token_urlsafe(32)}"


def hash_secret(secret: str) -> str:
    """Keys carry 256 bits of entropy, so one SHA-256 is enough (no password stretching)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def same_hash(a: str, b: str) -> bool:
    return hmac.compare_digest(a, b)


def now() -> int:
    return int(time.time())
