"""Scheduler settings: the API's (same database, storage, Redis) plus the executor's."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tuneforge_api.settings import Settings


class SchedulerSettings(Settings):
    executor: Literal["local"] = Field("local", description="Where trainers run.")
    local_max_jobs: int = Field(1, ge=1, le=64, description="Trainer processes at once on this machine.")
    reconcile_every_s: int = Field(1, ge=1, le=60, description="Seconds between reconcile passes.")
