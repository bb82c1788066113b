"""Runs each attempt as a subprocess on this machine, in its own session (process group).

A run folder ``{home}/runs/{name}/`` holds spec.json, the log, the pid and, once the
trainer ends, its exit code, written by a small shell wrapper. The folder, not this
process's memory, is the record, so a restarted scheduler sees the same runs.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tuneforge.types import JobSpec
from tuneforge_scheduler.executors.base import RunState, RunStatus

TERM_GRACE_S = 3.0
INTERRUPTED = "interrupted"  # marker: the service stopped this run


class LocalExecutor:
    def __init__(self, runs_dir: Path, *, max_concurrent: int = 1, command: list[str] | None = None) -> None:
        self.runs_dir = Path(runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.max_concurrent = max_concurrent
        # The trainer entrypoint; "--spec <path>" is appended.
        self.command = command or [sys.executable, "-m", "tuneforge_trainer"]
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        # Runs between "decided to start" and "pid recorded": running, not missing, for status().
        self._starting: set[str] = set()
        self._lock = threading.Lock()

    def _dir(self, name: str) -> Path:
        return self.runs_dir / name

    def submit(self, name: str, spec: JobSpec, env: dict[str, str]) -> None:
        with self._lock:  # submit and reconcile run in threads: one start per run
            if name in self._starting or self.status(name).state == RunState.running:
                return
            self._starting.add(name)
        try:
            self._start(name, spec, env)
        finally:
            with self._lock:
                self._starting.discard(name)

    def _start(self, name: str, spec: JobSpec, env: dict[str, str]) -> None:
        run = self._dir(name)
        run.mkdir(parents=True, exist_ok=True)
        for stale in ("exit_code", "pid", INTERRUPTED):
            (run / stale).unlink(missing_ok=True)
        _write_atomic(run / "spec.json", spec.model_dump_json(indent=2))
        trainer = shlex.join([*self.command, "--spec", str(run / "spec.json")])
        # The wrapper records the exit code atomically; a killed wrapper records nothing ("lost").
        script = f"{trainer} >> log.txt 2>&1; echo $? > exit_code.tmp && mv exit_code.tmp exit_code"
        proc = subprocess.Popen(
            ["/bin/sh", "-c", script],
            cwd=run,
            env={**os.environ, **env},
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._children[name] = proc
        # Until exec, /proc shows the parent's command line; wait so that a restarted
        # scheduler can always recognise the run by it.
        deadline = time.monotonic() + 5
        while not _is_our_process(proc.pid, name) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        _write_atomic(run / "pid", str(proc.pid))

    def status(self, name: str) -> RunStatus:
        run = self._dir(name)
        child = self._children.get(name)
        if child is not None:
            child.poll()  # reap, so a finished child is not a zombie that looks alive
        code = _read_int(run / "exit_code")
        interrupted = (run / INTERRUPTED).exists()
        if code is not None:
            return RunStatus(RunState.exited, code, interrupted=interrupted and code != 0)
        pid = _read_int(run / "pid")
        if pid is None and name in self._starting:
            return RunStatus(RunState.running)
        if pid is None:
            # A scheduler killed between starting the wrapper and recording its pid left it
            # running unrecorded: adopt it, or a relaunch would run the attempt twice.
            pid = _find_run_group(name)
            if pid is None:
                return RunStatus(RunState.missing)
            _write_atomic(run / "pid", str(pid))
        if child is not None and child.returncode is None:
            return RunStatus(RunState.running)
        if child is None and _is_our_process(pid, name):
            return RunStatus(RunState.running)
        code = _read_int(run / "exit_code")  # it may have written the code just now
        if code is not None:
            return RunStatus(RunState.exited, code, interrupted=interrupted and code != 0)
        if interrupted:
            return RunStatus(RunState.lost, detail="the service stopped", interrupted=True)
        return RunStatus(RunState.lost, detail="the trainer process ended without an exit code")

    def cancel(self, name: str) -> None:
        pid = _read_int(self._dir(name) / "pid")
        if pid is None:
            return
        child = self._children.get(name)
        if child is None and not _is_our_process(pid, name):
            return
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE_S
        while _group_alive(pid, child) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _group_alive(pid, child):
            _signal_group(pid, signal.SIGKILL)
            while _group_alive(pid, child):
                time.sleep(0.05)
        self._children.pop(name, None)

    def shutdown(self) -> None:
        """Stop every run this process started. Each is marked as interrupted first, so its
        job resumes later without the stop counting as one of its failed attempts."""
        for name in list(self._children):
            (self._dir(name) / INTERRUPTED).touch()
            self.cancel(name)

    def log_tail(self, name: str, max_bytes: int = 4000) -> str:
        path = self._dir(name) / "log.txt"
        if not path.is_file():
            return ""
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - max_bytes))
            return fh.read().decode("utf-8", "replace")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _is_our_process(pid: int, name: str) -> bool:
    """Alive and still our wrapper: its command line names the run, so a reused pid does not count."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return name.encode() in cmdline


def _find_run_group(name: str) -> int | None:
    """The process group (the wrapper's pid) of a live process whose command line names the run."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if name.encode() not in (proc / "cmdline").read_bytes():
                continue
            stat = (proc / "stat").read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        pgid = int(stat[2])
        # Only a group whose leader (the wrapper, in its own session) names the run is ours.
        if stat[0] != "Z" and pgid > 1 and _is_our_process(pgid, name):
            return pgid
    return None


def _signal_group(pgid: int, sig: int) -> None:
    if pgid <= 1:  # a damaged pid file: 0 is our own group, 1 would be every process
        return
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int, child: subprocess.Popen[bytes] | None) -> bool:
    if child is not None:
        child.poll()
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
