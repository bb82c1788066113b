"""Does a feedback session exist in this project? The ranking page answers 404 otherwise,
the same as the API does for another project's session."""

from __future__ import annotations

from sqlalchemy import select

from tuneforge_api.db.tables import FeedbackSessionRow
from tuneforge_api.services import Services


async def session_exists(services: Services, project_id: str, session_id: str) -> bool:
    async with services.sessions() as db:
        found = await db.scalar(
            select(FeedbackSessionRow.seq).where(
                FeedbackSessionRow.id == session_id, FeedbackSessionRow.project_id == project_id
            )
        )
    return found is not None
