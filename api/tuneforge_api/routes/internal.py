"""/internal/v1: what a trainer may call, with a token scoped to its one job."""

from __future__ import annotations

from fastapi import APIRouter, Request

from tuneforge.types import EventCreate, JobStatus
from tuneforge_api.deps import SessionDep, bearer_token
from tuneforge_api.errors import ApiError
from tuneforge_api.store import jobs
from tuneforge_api.store.ids import hash_secret, now, same_hash

router = APIRouter(prefix="/internal/v1", tags=["internal"], include_in_schema=True)


@router.post("/jobs/{job_id}/events", status_code=204)
async def post_event(job_id: str, body: EventCreate, request: Request, session: SessionDep) -> None:
    token = bearer_token(request)
    row = await jobs.get_row_any_project(session, job_id)
    # Same answer for "no such job", "wrong token" and "job over": nothing to learn by probing.
    if row is None or row.token_hash is None or not same_hash(row.token_hash, hash_secret(token)):
        raise ApiError(401, "invalid_job_token", "The job token is not valid for this job.")
    if JobStatus(row.status).is_finished():
        raise ApiError(401, "invalid_job_token", "The job token is not valid for this job.")
    await jobs.add_event(session, job_id, body.message, level=body.level, type=body.type, data=body.data)
    data = body.data or {}
    if body.type == "metrics":
        progress: dict[str, int] = {}
        if isinstance(data.get("eta_seconds"), int | float):
            progress["estimated_finish"] = now() + int(data["eta_seconds"])
        if isinstance(data.get("trained_tokens"), int):
            progress["trained_tokens"] = data["trained_tokens"]
        if progress:
            await jobs.update_fields(session, job_id, **progress)
    await session.commit()
