"""The arq worker: three short tasks plus crons (reconcile, webhooks, hourly clean-ups), written
the way arq itself is."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from datetime import timedelta
from typing import Any

import httpx
from arq import Worker, cron
from arq.connections import RedisSettings
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tuneforge.storage_sweep import sweep_incomplete
from tuneforge_api.services import Services
from tuneforge_api.store import idempotency
from tuneforge_scheduler import webhook_delivery
from tuneforge_scheduler.executors import Executor
from tuneforge_scheduler.executors.local import LocalExecutor
from tuneforge_scheduler.lifecycle import Scheduler
from tuneforge_scheduler.orphan_files import remove_orphan_files
from tuneforge_scheduler.settings import SchedulerSettings

log = logging.getLogger("tuneforge.scheduler")


def build_scheduler(settings: SchedulerSettings) -> Scheduler:
    executor: Executor
    if settings.executor == "kubernetes":
        from tuneforge_scheduler.executors.kubernetes import KubernetesExecutor  # the "kubernetes" extra

        models_dir = str(settings.models_dir) if settings.models_dir else None
        executor = KubernetesExecutor(settings.kubernetes, models_dir=models_dir)
    else:
        executor = LocalExecutor(settings.home / "runs", max_concurrent=settings.local_max_jobs)
    return Scheduler(services=Services.build(settings), executor=executor)


async def submit_job(ctx: dict[str, Any], job_id: str) -> None:
    await ctx["scheduler"].submit(job_id)


async def cancel_job(ctx: dict[str, Any], job_id: str) -> None:
    await ctx["scheduler"].cancel(job_id)


async def reconcile(ctx: dict[str, Any]) -> None:
    await ctx["scheduler"].reconcile()


async def deliver_webhook(ctx: dict[str, Any], delivery_id: str) -> None:
    await webhook_delivery.deliver(ctx["scheduler"].services, ctx["webhook_http"], delivery_id)


async def purge_idempotency_keys(ctx: dict[str, Any]) -> None:
    """Keys are kept 24 h; without this, an expired key only goes when it is used again."""
    services = ctx["scheduler"].services
    async with services.sessions() as session:
        purged = await idempotency.purge_expired(session)
        await session.commit()
    if purged:
        log.info("purged %d expired idempotency keys", purged)


async def sweep_storage(ctx: dict[str, Any]) -> None:
    """Removes what killed uploads and trainers left in storage: incomplete writes (temp files,
    open multipart uploads), never visible, so only their age tells a dead one from a live one;
    and file objects without a file row, once older than an upload takes to commit its row.
    Each part runs even if the other fails (its error is raised after)."""
    services = ctx["scheduler"].services
    age = ctx["stale_upload_age"]
    errors: list[Exception] = []
    try:
        result = await asyncio.to_thread(sweep_incomplete, services.storage, age)
        if result.count:
            log.info("removed %d stale incomplete uploads (%d bytes)", result.count, result.bytes_freed)
    except Exception as exc:
        log.exception("the sweep of incomplete uploads failed")
        errors.append(exc)
    try:
        orphans = await remove_orphan_files(services, age)
        log.info(
            "removed %d orphan file objects (%d bytes); kept %d with a file row and %d younger than %s",
            orphans.count,
            orphans.bytes_freed,
            orphans.owned,
            orphans.young,
            age,
        )
    except Exception as exc:
        log.exception("the sweep of orphan file objects failed")
        errors.append(exc)
    if errors:
        raise errors[0]


async def dispatch_webhooks(ctx: dict[str, Any]) -> None:
    await webhook_delivery.enqueue_due(ctx["scheduler"].services, ctx["redis"])


class _Worker(Worker):
    """arq's worker, whose ``close`` still stops the trainers when Redis is the part that is down
    (arq's own would raise on deleting its health-check key and skip ``on_shutdown``)."""

    async def close(self) -> None:
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        if not self._pool:
            return
        if self.tasks:  # bounded: a task stopped while Redis is down retries its bookkeeping
            await asyncio.wait(list(self.tasks.values()), timeout=5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.pool.delete(self.health_check_key), 2)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.pool.close(close_connection_pool=True), 2)
        self._pool = None


def redis_settings(url: str) -> RedisSettings:
    """Every Redis command waits out an outage (capped backoff, no limit) instead of raising:
    Redis only delivers work, and a worker that died with it would leave reconcile undone."""
    redis = RedisSettings.from_dsn(url)
    redis.retry = Retry(ExponentialBackoff(cap=2.0, base=0.05), -1)
    # redis-py only retries the errors listed here; OSError is a refused connection while it restarts.
    redis.retry_on_error = [RedisConnectionError, RedisTimeoutError, OSError]
    return redis


def build_worker(settings: SchedulerSettings, scheduler: Scheduler | None = None, **overrides: Any) -> Worker:
    """A worker bound to one scheduler; ``overrides`` go to ``arq.Worker`` (tests use burst=True)."""
    scheduler = scheduler or build_scheduler(settings)

    async def on_startup(ctx: dict[str, Any]) -> None:
        ctx["scheduler"] = scheduler
        ctx["webhook_http"] = httpx.AsyncClient(headers={"user-agent": "tuneforge-webhooks"})
        ctx["stale_upload_age"] = timedelta(hours=settings.stale_upload_hours)

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        await ctx["webhook_http"].aclose()
        scheduler.executor.shutdown()
        await scheduler.services.close()

    every = settings.reconcile_every_s
    redis = redis_settings(settings.redis_url)
    options: dict[str, Any] = dict(
        functions=[submit_job, cancel_job, deliver_webhook],
        cron_jobs=[
            cron(reconcile, second=set(range(0, 60, every)), run_at_startup=True, timeout=120),
            cron(dispatch_webhooks, second=set(range(0, 60, every)), run_at_startup=True, timeout=60),
            cron(purge_idempotency_keys, minute=0, second=30, run_at_startup=True, timeout=120),
            # Hourly, so it may take most of the hour on a large store (a listing per project).
            cron(sweep_storage, minute=30, second=15, run_at_startup=True, timeout=3000),
        ],
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        redis_settings=redis,
        queue_name=settings.resolved_queue_name,
        keep_result=0,  # results are not used, and a kept result would block re-enqueueing a job id
        poll_delay=0.1,
        max_jobs=16,
        job_timeout=120,
        job_serializer=lambda d: json.dumps(d).encode(),
        job_deserializer=json.loads,
    )
    options.update(overrides)
    return _Worker(**options)
