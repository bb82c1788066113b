"""``tuneforge up``: API, scheduler, local executor and (if needed) Redis in one process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator

import uvicorn

from tuneforge_api.app import create_app
from tuneforge_api.bootstrap import ensure_default_project
from tuneforge_api.db.engine import migrate
from tuneforge_api.settings import load_settings
from tuneforge_scheduler.embedded_redis import EmbeddedRedis, redis_answers
from tuneforge_scheduler.settings import SchedulerSettings
from tuneforge_scheduler.worker import build_scheduler, build_worker

log = logging.getLogger("tuneforge.up")


class _Server(uvicorn.Server):
    """uvicorn re-raises a captured Ctrl-C when it stops; ``up`` handles signals itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def serve(settings: SchedulerSettings, host: str, port: int) -> None:
    scheduler = build_scheduler(settings)
    await migrate(scheduler.services.engine)
    new_key = await ensure_default_project(scheduler.services)
    if new_key:
        _say(
            f"Created the default project. Its admin API key (shown once, also saved to "
            f"{settings.home / 'credentials'}):\n\n    TUNEFORGE_API_KEY={new_key}\n"
        )
    app = create_app(settings, run_migrations=False, services=scheduler.services)
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
    worker = build_worker(settings, scheduler, handle_signals=False)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    server_task = asyncio.create_task(server.serve())
    worker_task = asyncio.create_task(worker.async_run())
    while not server.started and not server_task.done():
        await asyncio.sleep(0.02)
    if server.started:
        _say(f"Tuneforge is up on http://{host}:{port} (home {settings.home}); Ctrl-C stops it.")
    done, _ = await asyncio.wait(
        [server_task, worker_task, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED
    )
    _say("Stopping Tuneforge...")
    server.should_exit = True
    await worker.close()  # runs on_shutdown: stops trainer processes, closes the DB
    for task in (server_task, worker_task):
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(task, 10)
    for task in done:
        if task in (server_task, worker_task) and task.exception():
            raise task.exception()  # type: ignore[misc]


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return True
        except OSError:
            return False


def up(host: str = "127.0.0.1", port: int = 8000) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # arq logs every cron tick at INFO (two lines a second); failures still come through.
    logging.getLogger("arq").setLevel(logging.WARNING)
    if not _port_free(host, port):
        _say(f"Port {port} on {host} is in use; choose another with --port.")
        return 2
    overrides = {}
    if "TUNEFORGE_PUBLIC_URL" not in os.environ:
        overrides["public_url"] = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    settings = load_settings(SchedulerSettings, **overrides)
    # Datasets and adapters live here: readable by this user only.
    settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.home.chmod(0o700)
    embedded: EmbeddedRedis | None = None
    if "TUNEFORGE_REDIS_URL" not in os.environ and not redis_answers("127.0.0.1", 6379):
        embedded = EmbeddedRedis(settings.home / "redis").start()
        settings.redis_url = embedded.url
        _say(f"No Redis on 127.0.0.1:6379; started an embedded one on port {embedded.port}.")
    try:
        asyncio.run(serve(settings, host, port))
    finally:
        if embedded:
            embedded.stop()
    _say("Tuneforge stopped.")
    return 0
