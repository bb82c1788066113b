"""The scheduler's worker sweeps storage hourly (and once at start), with the age from
``TUNEFORGE_STALE_UPLOAD_HOURS``: a real worker run removes a stale temp file and a stale file
object without a row at start, and keeps what is younger or owned."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

from tests.conftest import drop_queue
from tests.scheduler.file_rows import add_file_row, new_project
from tuneforge.storage import FileStorage, file_key, open_storage
from tuneforge_api.db.engine import migrate
from tuneforge_scheduler.settings import SchedulerSettings
from tuneforge_scheduler.worker import build_scheduler, build_worker, sweep_storage


def test_the_age_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert SchedulerSettings(home=tmp_path).stale_upload_hours == 24
    monkeypatch.setenv("TUNEFORGE_STALE_UPLOAD_HOURS", "1.5")
    assert SchedulerSettings(home=tmp_path).stale_upload_hours == 1.5
    monkeypatch.setenv("TUNEFORGE_STALE_UPLOAD_HOURS", "-1")
    with pytest.raises(ValueError):
        SchedulerSettings(home=tmp_path)


def test_the_sweep_is_an_hourly_cron_that_also_runs_at_start(tmp_path: Path, redis_url: str) -> None:
    worker = build_worker(SchedulerSettings(home=tmp_path, redis_url=redis_url))
    crons = {job.name: job for job in worker.cron_jobs}
    sweep = crons["cron:sweep_storage"]
    assert sweep.coroutine is sweep_storage and sweep.run_at_startup
    assert sweep.minute == 30 and sweep.hour is None  # once an hour, every hour


async def test_a_worker_run_removes_stale_temp_files_and_keeps_fresh_ones(
    tmp_path: Path, redis_url: str
) -> None:
    queue = f"tf-test:{uuid.uuid4().hex}"
    settings = SchedulerSettings(
        home=tmp_path / "home", redis_url=redis_url, queue_name=queue, stale_upload_hours=2
    )
    storage = open_storage(settings.resolved_storage_uri)
    assert isinstance(storage, FileStorage)
    stale, fresh = storage.root / ".tmp" / "killed-3h-ago", storage.root / ".tmp" / "killed-1h-ago"
    for path, hours in ((stale, 3), (fresh, 1)):
        path.write_bytes(b"partial")
        then = time.time() - hours * 3600
        os.utime(path, (then, then))
    storage.put_bytes("projects/p/files/f", b"visible")  # no row, but too young to judge

    scheduler = build_scheduler(settings)
    await migrate(scheduler.services.engine)  # the start-up reconcile reads the jobs table
    project = await new_project(scheduler.services)
    owned = file_key(project, await add_file_row(scheduler.services, project))
    orphan = file_key(project, "file-never-committed")
    for key in (owned, orphan):
        storage.put_bytes(key, b"data")
        then = time.time() - 3 * 3600
        os.utime(storage.root / key, (then, then))
    worker = build_worker(settings, scheduler, handle_signals=False, poll_delay=0.05)
    run = asyncio.create_task(worker.async_run())
    try:
        deadline = time.monotonic() + 60
        while stale.exists() or storage.exists(orphan):  # the start-up run of the cron removes them
            assert not run.done(), run
            assert time.monotonic() < deadline, "the worker did not sweep at start"
            await asyncio.sleep(0.05)
    finally:
        await worker.close()
        run.cancel()
        drop_queue(redis_url, queue)

    assert not stale.exists() and fresh.exists()
    assert storage.list("") == sorted([owned, "projects/p/files/f"])


async def test_each_part_of_the_sweep_runs_when_the_other_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Incomplete writes unlistable (say, a store that refuses ListMultipartUploads): orphans
    still go, and the cron still fails, so the error is seen."""
    settings = SchedulerSettings(home=tmp_path / "home", stale_upload_hours=0)
    scheduler = build_scheduler(settings)
    await migrate(scheduler.services.engine)
    storage = scheduler.services.storage
    storage.put_bytes("projects/p/files/file-orphan", b"data")

    def refused(*_: object) -> None:
        raise PermissionError("ListMultipartUploads: access denied")

    monkeypatch.setattr("tuneforge_scheduler.worker.sweep_incomplete", refused)
    ctx = {"scheduler": scheduler, "stale_upload_age": timedelta(0)}
    try:
        with pytest.raises(PermissionError):
            await sweep_storage(ctx)
    finally:
        await scheduler.services.close()
    assert storage.list("") == []
