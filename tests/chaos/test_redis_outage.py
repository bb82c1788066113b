"""The scheduler's worker across a Redis SIGKILL: it waits the outage out instead of dying (which
left jobs unreconciled: the "redis" chaos run found them stuck), and a stop while Redis is
still down stops its trainers (arq's own close raised first and skipped that)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.cluster import _killpg, _redis_answers, free_port, redis_binary
from tests.chaos.stand_ins import SLEEPER, groups_running, spec
from tuneforge_api.db.engine import migrate
from tuneforge_scheduler.executors.local import INTERRUPTED, LocalExecutor
from tuneforge_scheduler.settings import SchedulerSettings
from tuneforge_scheduler.worker import build_scheduler, build_worker

pytestmark = pytest.mark.chaos


class Redis:
    """A private redis-server that can be SIGKILLed and started again, empty, on its port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not _redis_answers(self.port):
            assert self.proc.poll() is None, "redis-server did not start"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def redis() -> Iterator[Redis]:
    server = Redis()
    server.start()
    yield server
    server.kill()


async def test_the_worker_outlives_a_redis_outage_and_stops_its_trainers_during_one(
    tmp_path: Path, redis: Redis
) -> None:
    settings = SchedulerSettings(
        home=tmp_path / "home", redis_url=f"redis://127.0.0.1:{redis.port}/0", queue_name="tf-outage"
    )
    scheduler = build_scheduler(settings)
    scheduler.executor = LocalExecutor(settings.home / "runs", command=SLEEPER)
    await migrate(scheduler.services.engine)
    worker = build_worker(settings, scheduler, handle_signals=False, poll_delay=0.05)
    task = asyncio.create_task(worker.async_run())
    name = "ft-ftjob-outage-a1"
    try:
        while "scheduler" not in worker.ctx:  # on_startup has run
            assert not task.done(), task
            await asyncio.sleep(0.05)
        await asyncio.to_thread(scheduler.executor.submit, name, spec(), {})

        redis.kill()
        await asyncio.sleep(2)  # some twenty polls against a dead Redis
        assert not task.done(), "the worker died with Redis"
        redis.start()  # empty
        await asyncio.sleep(1)
        assert not task.done()
        assert groups_running(name), "the trainer did not survive the outage"

        redis.kill()  # and the service is stopped while Redis is down
        await asyncio.wait_for(worker.close(), 30)
        assert groups_running(name) == set(), "a trainer outlived the stop"
        assert (settings.home / "runs" / name / INTERRUPTED).exists()
    finally:
        task.cancel()
        for pgid in groups_running(name):
            _killpg(pgid)
