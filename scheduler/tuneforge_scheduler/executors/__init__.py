"""Executors run trainer attempts; the scheduler talks to them through ``Executor``."""

from tuneforge_scheduler.executors.base import Executor, RunState, RunStatus, run_name

__all__ = ["Executor", "RunState", "RunStatus", "run_name"]
