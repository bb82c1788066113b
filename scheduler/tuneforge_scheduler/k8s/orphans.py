"""Which of the executor's unreleased runs no job owns any more, judged against the database.

A run is an orphan when its job row is gone, finished, or on another attempt (it moved on, or
the run is from a restored backup's future). It is never judged when it cannot be proven ours:
a run whose job row is missing counts only if its project exists in this database (project ids
are random, so another installation's runs never match), and a run whose job row names another
project is left alone. The executor deletes orphans only after a grace period.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from tuneforge.types import JobStatus
from tuneforge_api.store import jobs, projects
from tuneforge_scheduler.executors.base import RunRef


async def orphan_reasons(session: AsyncSession, candidates: list[RunRef]) -> dict[str, str]:
    """Run name -> why it is an orphan, for the candidates that are ours and orphaned."""
    reasons: dict[str, str] = {}
    for run in candidates:
        row = await jobs.get_row_any_project(session, run.job_id)
        if row is None:
            if await projects.get_project(session, run.project_id) is not None:
                reasons[run.name] = f"job {run.job_id} has no record in the database"
            continue
        if row.project_id != run.project_id:
            continue  # not a run this installation made
        if JobStatus(row.status).is_finished():
            reasons[run.name] = f"job {run.job_id} is already {row.status}"
        elif row.attempt != run.attempt:
            reasons[run.name] = f"job {run.job_id} is on attempt {row.attempt}"
        elif row.status != JobStatus.running.value:
            reasons[run.name] = f"job {run.job_id} is {row.status}"
    return reasons
