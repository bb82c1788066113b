"""Newest-first cursor pagination over a table's ``seq`` column, as OpenAI's lists do."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, select
from sqlalchemy.ext.asyncio import AsyncSession

from tuneforge.types import Page
from tuneforge_api.errors import ApiError

M = TypeVar("M")


async def newest_first(
    session: AsyncSession,
    table: Any,
    where: Sequence[ColumnElement[bool]],
    convert: Callable[[Any], M],
    *,
    after: str | None,
    limit: int,
) -> Page[M]:
    query = select(table).where(*where)
    if after is not None:
        # The cursor is looked up under the same filter, so another project's id is unknown here.
        cursor_seq = await session.scalar(select(table.seq).where(*where, table.id == after))
        if cursor_seq is None:
            raise ApiError(400, "invalid_cursor", f"unknown cursor {after!r}", param="after")
        query = query.where(table.seq < cursor_seq)
    rows = list(await session.scalars(query.order_by(table.seq.desc()).limit(limit + 1)))
    data = [convert(r) for r in rows[:limit]]
    return Page[M](
        data=data,
        has_more=len(rows) > limit,
        first_id=data[0].id if data else None,  # type: ignore[attr-defined]
        last_id=data[-1].id if data else None,  # type: ignore[attr-defined]
    )
