"""Route helpers for the ``Idempotency-Key`` header (see ``store.idempotency``).

A response that carries a secret (an API key, a webhook's signing secret) is stored without it:
the idempotency table must not become a second copy of every secret. Its replay either
restores the secret from where it legitimately lives (a webhook's row, which signing needs) or,
where only a hash exists (API keys), answers 409 ``idempotent_replay_secret_unavailable``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from tuneforge_api.errors import ApiError
from tuneforge_api.store import idempotency
from tuneforge_api.store.projects import Principal

WITHHELD = "_withheld"  # in a stored response: the name of the secret field left out
Restore = Callable[[AsyncSession, dict[str, Any]], Awaitable[str | None]]


def secret_unavailable(what: str) -> ApiError:
    return ApiError(
        409,
        "idempotent_replay_secret_unavailable",
        f"This Idempotency-Key already created {what}; its secret was shown once and is not stored, "
        "so it cannot be replayed. Use it if you have it, or revoke it and create another.",
        param="Idempotency-Key",
        headers={"x-should-retry": "false"},
    )


@dataclass
class IdempotentRequest:
    key: str
    request_hash: str
    project_id: str

    async def save(
        self,
        session: AsyncSession,
        response: BaseModel,
        status_code: int = 200,
        *,
        withhold: str | None = None,
    ) -> None:
        """Store the response in the caller's transaction; ``withhold`` names a secret field
        that is left out (see the module docstring)."""
        stored = response.model_dump(mode="json", exclude={withhold} if withhold else None)
        if withhold:
            stored[WITHHELD] = withhold
        await idempotency.save(session, self.project_id, self.key, self.request_hash, status_code, stored)

    async def replay(self, session: AsyncSession, restore: Restore | None = None) -> JSONResponse | None:
        """The stored response for this key, or None; a key reused for another request is a 422.

        A response stored without its secret gets it back from ``restore`` (None: it is gone),
        else the replay is a 409 ``idempotent_replay_secret_unavailable``.
        """
        prior = await idempotency.lookup(session, self.project_id, self.key)
        if prior is None:
            return None
        if prior.request_hash != self.request_hash:
            raise ApiError(
                422,
                "idempotency_key_reused",
                "This Idempotency-Key was used with a different request.",
                param="Idempotency-Key",
                headers={"x-should-retry": "false"},
            )
        body = dict(prior.response)
        if (field := body.pop(WITHHELD, None)) is not None:
            what = f"{body.get('object', 'an object')} {body.get('id', '')}".strip()
            secret = await restore(session, body) if restore else None
            if secret is None:
                raise secret_unavailable(what)
            body[field] = secret
        return JSONResponse(body, prior.status_code, headers={"idempotent-replayed": "true"})


def idempotent_request(
    request: Request, principal: Principal, body: BaseModel | str
) -> IdempotentRequest | None:
    """The request's idempotency context, or None without the header. ``body`` is the parsed
    body, or a canonical string standing for it (an upload: its form fields and content hash)."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not key.strip() or len(key) > idempotency.MAX_KEY_LEN:
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"Idempotency-Key must be 1 to {idempotency.MAX_KEY_LEN} characters.",
            param="Idempotency-Key",
        )
    route = f"{request.method} {request.url.path}"
    canonical = body if isinstance(body, str) else body.model_dump_json(exclude_unset=True)
    return IdempotentRequest(key, idempotency.fingerprint(route, canonical), principal.project_id)


async def commit_or_replay(
    session: AsyncSession, idem: IdempotentRequest | None, restore: Restore | None = None
) -> JSONResponse | None:
    """Commit the create and its stored response together; None when that worked. If the same key
    raced in from a concurrent retry and won, answer with its result instead."""
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        if idem and (replayed := await idem.replay(session, restore)):
            return replayed
        raise
    return None
