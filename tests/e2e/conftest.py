"""The real service as a user runs it: `tuneforge up` in its own process, the local
executor, and the real trainer on the tiny model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_KEY, drop_queue, free_port
from tuneforge import Client

TUNEFORGE = str(Path(sys.executable).parent / "tuneforge")


@dataclass
class Service:
    url: str
    home: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def client(self, key: str = ADMIN_KEY) -> Client:
        return Client(base_url=self.url, api_key=key, timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="session")
def models_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny base model for the whole session (it is built deterministically on first use)."""
    return tmp_path_factory.mktemp("models")


def start_service(
    home: Path,
    redis_url: str,
    models_cache: Path,
    queue: str,
    port: int | None = None,
    extra_env: dict[str, str] | None = None,
) -> Service:
    port = port or free_port()
    log = home / f"up-{port}.log"
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "TUNEFORGE_HOME": str(home),
        "TUNEFORGE_REDIS_URL": redis_url,
        "TUNEFORGE_QUEUE_NAME": queue,
        "TUNEFORGE_MODELS_CACHE": str(models_cache),
    }
    env.update(extra_env or {})
    if ADMIN_KEY:  # the first-start test sets it to None
        env["TUNEFORGE_API_KEY"] = ADMIN_KEY
    else:
        env.pop("TUNEFORGE_API_KEY", None)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [TUNEFORGE, "up", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"tuneforge up did not start:\n{log.read_text()}")
        time.sleep(0.2)
    return Service(url, home, proc, log)


def stop_service(service: Service, timeout: float = 30) -> int:
    service.proc.send_signal(signal.SIGINT)
    try:
        return service.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(service.proc.pid, signal.SIGKILL)
        raise


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, models_cache: Path
) -> Iterator[Service]:
    queue = f"tf-e2e:{uuid.uuid4().hex}"
    # Loopback webhooks allowed: the tests' receivers listen on 127.0.0.1.
    svc = start_service(
        tmp_path_factory.mktemp("home"),
        redis_url,
        models_cache,
        queue,
        extra_env={"TUNEFORGE_WEBHOOKS_ALLOW_PRIVATE": "true"},
    )
    yield svc
    code = stop_service(svc)
    drop_queue(redis_url, queue)
    assert code == 0, svc.output()
    assert trainer_pids(str(svc.home)) == [], "Ctrl-C left trainer processes behind"


def trainer_pids(job_id: str, *, python_only: bool = False) -> list[int]:
    """Live trainer processes whose command line contains ``job_id`` (a job id, or a
    service's home folder, which every run's spec path lies under); with
    ``python_only`` the trainer itself, without the shell wrapper that records its exit code."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if python_only and cmd.startswith("/bin/sh"):
            continue
        if "tuneforge_trainer" in cmd and "--spec" in cmd and job_id in cmd and state != "Z":
            pids.append(int(proc.name))
    return pids


def wait_until(predicate, timeout: float, message: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(message)
        time.sleep(interval)
