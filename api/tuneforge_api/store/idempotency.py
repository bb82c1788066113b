"""Idempotency keys: a POST retried with the same key gets the first response again.

The stored response is written in the same transaction as the object it describes, so a
client that lost the response to a committed create gets that create back, never a second.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from tuneforge_api.db.tables import IdempotencyRow
from tuneforge_api.store.ids import now

KEEP_S = 24 * 3600
MAX_KEY_LEN = 255


def fingerprint(route: str, canonical_body: str) -> str:
    return hashlib.sha256(f"{route}\n{canonical_body}".encode()).hexdigest()


async def lookup(session: AsyncSession, project_id: str, key: str) -> IdempotencyRow | None:
    row = await session.scalar(
        select(IdempotencyRow).where(IdempotencyRow.project_id == project_id, IdempotencyRow.key == key)
    )
    if row is not None and row.created_at < now() - KEEP_S:
        await session.execute(delete(IdempotencyRow).where(IdempotencyRow.seq == row.seq))
        return None
    return row


async def save(
    session: AsyncSession,
    project_id: str,
    key: str,
    request_hash: str,
    status_code: int,
    response: dict[str, Any],
) -> None:
    session.add(
        IdempotencyRow(
            project_id=project_id,
            key=key,
            request_hash=request_hash,
            status_code=status_code,
            response=response,
            created_at=now(),
        )
    )


async def purge_expired(session: AsyncSession) -> int:
    result = await session.execute(delete(IdempotencyRow).where(IdempotencyRow.created_at < now() - KEEP_S))
    return result.rowcount
