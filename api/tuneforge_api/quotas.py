"""Per-project quotas (OWASP API4): unfinished jobs and stored bytes.

Each check is one aggregate query in the caller's transaction, just before the write it
guards. Two requests that race past a check together can overshoot a limit by one
request's worth; the limits bound abuse, they are not billing.

Over a quota the answer is a 429 in the error envelope with ``Retry-After``. It also carries
``x-should-retry: false``: the quota frees up only when jobs end or files are deleted, which a
client's automatic retry cannot wait for sensibly.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from tuneforge_api.db.tables import FileRow, JobRow
from tuneforge_api.errors import ApiError
from tuneforge_api.settings import Settings
from tuneforge_api.store import jobs

RETRY_AFTER_S = 60


def quota_exceeded(code: str, message: str) -> ApiError:
    return ApiError(
        429,
        code,
        message,
        headers={"Retry-After": str(RETRY_AFTER_S), "x-should-retry": "false"},
    )


async def active_jobs(session: AsyncSession, project_id: str) -> int:
    query = select(func.count()).where(JobRow.project_id == project_id, JobRow.status.in_(jobs.ACTIVE))
    return int(await session.scalar(query) or 0)


async def stored_bytes(session: AsyncSession, project_id: str) -> int:
    query = select(func.coalesce(func.sum(FileRow.bytes), 0)).where(FileRow.project_id == project_id)
    return int(await session.scalar(query) or 0)


async def check_active_jobs(session: AsyncSession, settings: Settings, project_id: str) -> None:
    """Room for one more unfinished job in the project, or a 429."""
    limit = settings.max_active_jobs
    if limit and await active_jobs(session, project_id) >= limit:
        raise quota_exceeded(
            "active_jobs_limit",
            f"The project has {limit} unfinished jobs, its limit; wait for one to end or cancel one.",
        )


async def check_storage(session: AsyncSession, settings: Settings, project_id: str, adding: int) -> None:
    """Room for ``adding`` more bytes of files in the project, or a 429."""
    limit = settings.max_storage_bytes
    if limit and await stored_bytes(session, project_id) + adding > limit:
        raise quota_exceeded(
            "storage_limit",
            f"The project's files would exceed its storage limit of {limit} bytes; delete some files.",
        )
