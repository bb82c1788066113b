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
    # Why it ended, or, while running, why it is not making progress ("Waiting for quota ...",
    # "Unschedulable ..."): stable text, so a caller can report it whenever it changes.
    detail: str = ""
    # Stopped by us (the service shut down), not by a fault: the attempt is not charged.
    interrupted: bool = False


@dataclass(frozen=True)
class RunRef:
    """A run the executor found on its own (not asked about): whose attempt it claims to be."""

    name: str  # run_name(job_id, attempt)
    job_id: str
    attempt: int
    project_id: str


class Executor(Protocol):
    max_concurrent: int

    def submit(self, name: str, spec: JobSpec, env: dict[str, str]) -> None: ...
    def status(self, name: str) -> RunStatus: ...
    def cancel(self, name: str) -> None: ...
    def shutdown(self) -> None: ...


class BatchingExecutor(Executor, Protocol):
    """Optional hooks; the scheduler calls them only when an executor has them.

    - ``refresh()`` runs once at the start of each reconcile pass, so that an executor can fetch
      the state of all its runs at once (one LIST) and answer ``status`` from that.
    - ``release(name)`` runs once the scheduler has recorded how a run ended; the executor may
      forget it (stop listing it, let it be cleaned up).
    """

    def refresh(self) -> None: ...
    def release(self, name: str) -> None: ...


class OrphanReapingExecutor(Executor, Protocol):
    """Optional hooks for runs that outlive their record (the scheduler calls them when present).

    - ``orphan_candidates(expected)``: runs the executor has, not yet released, whose name is not
      in ``expected`` (the current attempts of the running jobs);
    - ``reap_orphans(orphans)``: the scheduler has checked the candidates against the database
      (run name -> why it is an orphan); the executor deletes those that stay orphans long enough.
    """

    def orphan_candidates(self, expected: set[str]) -> list[RunRef]: ...
    def reap_orphans(self, orphans: dict[str, str]) -> list[str]: ...
