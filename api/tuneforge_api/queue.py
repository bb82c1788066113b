"""Enqueue short scheduler tasks on arq. Redis only delivers work: a lost enqueue is
repaired by the scheduler's reconcile loop, so failures here are logged, not raised."""

from __future__ import annotations

import json
import logging

from arq import create_pool
from arq.connections import ArqRedis, RedisSettings

log = logging.getLogger("tuneforge.api.queue")


class TaskQueue:
    def __init__(self, redis_url: str, queue_name: str) -> None:
        self._settings = RedisSettings.from_dsn(redis_url)
        self._settings.conn_retries = 0
        self._queue_name = queue_name
        self._pool: ArqRedis | None = None

    async def _get_pool(self) -> ArqRedis:
        if self._pool is None:
            self._pool = await create_pool(
                self._settings,
                default_queue_name=self._queue_name,
                job_serializer=lambda d: json.dumps(d).encode(),
                job_deserializer=json.loads,
            )
        return self._pool

    async def enqueue(self, task: str, job_id: str) -> bool:
        try:
            pool = await self._get_pool()
            await pool.enqueue_job(task, job_id, _job_id=f"{task}:{job_id}")
            return True
        except Exception as exc:  # noqa: BLE001 - any Redis failure is repaired by reconcile
            log.warning(
                "could not enqueue %s for %s (%s); reconcile will retry", task, job_id, type(exc).__name__
            )
            self._pool = None
            return False

    async def ping(self) -> bool:
        try:
            pool = await self._get_pool()
            return bool(await pool.ping())
        except Exception:  # noqa: BLE001
            self._pool = None
            return False

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None
