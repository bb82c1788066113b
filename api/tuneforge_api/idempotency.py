"""Route helpers for the ``Idempotency-Key`` header (see ``store.idempotency``)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from tuneforge_api.errors import ApiError
from tuneforge_api.store import idempotency
from tuneforge_api.store.projects import Principal


@dataclass
class IdempotentRequest:
    key: str
    request_hash: str
    project_id: str

    async def save(self, session: AsyncSession, response: BaseModel, status_code: int = 200) -> None:
        await idempotency.save(
            session,
            self.project_id,
            self.key,
            self.request_hash,
            status_code,
            response.model_dump(mode="json"),
        )

    async def replay(self, session: AsyncSession) -> JSONResponse | None:
        """The stored response for this key, or None; a key reused for another request is a 422."""
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
        return JSONResponse(prior.response, prior.status_code, headers={"idempotent-replayed": "true"})


def idempotent_request(request: Request, principal: Principal, body: BaseModel) -> IdempotentRequest | None:
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
    canonical = body.model_dump_json(exclude_unset=True)
    return IdempotentRequest(key, idempotency.fingerprint(route, canonical), principal.project_id)
