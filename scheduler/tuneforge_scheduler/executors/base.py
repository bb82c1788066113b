"""The executor protocol: submit, status, cancel. Names are deterministic, so every call
is idempotent and a restarted scheduler finds its runs again."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol

from tuneforge.types import JobSpec


def run_name(job_id: str, attempt: int) -> str:
    return f"ft-{job_id}-a{attempt}"


class RunState(str, Enum):
    running = "running"
    exited = "exited"  # finished with an exit code
    lost = "lost"  # was started, is gone, left no exit code (killed, node lost)
    missing = "missing"  # never started (or nothing is known of it)


@dataclass(frozen=True)
class RunStatus:
    state: RunState
    exit_code: int | None = None
    detail: str = ""


class Executor(Protocol):
    max_concurrent: int

    def submit(self, name: str, spec: JobSpec, env: dict[str, str]) -> None: ...
    def status(self, name: str) -> RunStatus: ...
    def cancel(self, name: str) -> None: ...
    def shutdown(self) -> None: ...
