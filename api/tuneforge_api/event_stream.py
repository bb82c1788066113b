"""Server-Sent Events for a job's events: resumable with ``Last-Event-ID``, with heartbeats,
ending once the job is finished and every event has been sent.

Events are read from the DB (the source of truth) by polling in ``seq`` order, so a
reconnecting client resumes exactly after the last event it saw.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from sqlalchemy import select

from tuneforge.types import JobStatus
from tuneforge_api.db.tables import JobEventRow, JobRow
from tuneforge_api.services import Services
from tuneforge_api.store.jobs import event_model

POLL_S = 0.5
HEARTBEAT_S = 15.0
BATCH = 200


def sse(event_id: str, event: str, data: str) -> bytes:
    return f"id: {event_id}\nevent: {event}\ndata: {data}\n\n".encode()


async def stream_events(services: Services, job_id: str, last_event_id: str | None) -> AsyncIterator[bytes]:
    poll_s, heartbeat_s = POLL_S, HEARTBEAT_S  # read at call time, so they can be tuned
    last_seq = 0
    async with services.sessions() as session:
        if last_event_id:
            seq = await session.scalar(
                select(JobEventRow.seq).where(JobEventRow.job_id == job_id, JobEventRow.id == last_event_id)
            )
            last_seq = seq or 0
    yield b"retry: 2000\n\n"
    last_sent = time.monotonic()
    while True:
        # Read the status before the events: a job seen finished has written all its events.
        async with services.sessions() as session:
            status = await session.scalar(select(JobRow.status).where(JobRow.id == job_id))
            rows = list(
                await session.scalars(
                    select(JobEventRow)
                    .where(JobEventRow.job_id == job_id, JobEventRow.seq > last_seq)
                    .order_by(JobEventRow.seq)
                    .limit(BATCH)
                )
            )
        for row in rows:
            last_seq = row.seq
            yield sse(row.id, "event", event_model(row).model_dump_json())
            last_sent = time.monotonic()
        if len(rows) == BATCH:
            continue
        if status is None or JobStatus(status).is_finished():
            yield sse(f"end-{job_id}", "done", json.dumps({"status": status}))
            return
        if time.monotonic() - last_sent >= heartbeat_s:
            yield b": heartbeat\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(poll_s)
