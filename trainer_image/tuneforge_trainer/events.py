"""Best-effort reporting of job events to the API.

Events are a window onto the run, not part of its result: if the API is down, training goes
on and the run's log file still has every line. So a post has a short timeout, retries a
couple of times, and swallows its errors. After a failure the reporter backs off for a while:
metrics (superseded by the next step anyway) are dropped and messages get a single try, so a
hanging API cannot slow training down. The job token is never logged.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Literal

import httpx

from tuneforge.types import EventCreate

TOKEN_ENV = "TUNEFORGE_JOB_TOKEN"
Level = Literal["info", "warn", "error"]


class EventReporter:
    """Posts ``EventCreate`` bodies to ``POST {api}/internal/v1/jobs/{job_id}/events``."""

    def __init__(
        self,
        api_base_url: str,
        job_id: str,
        token: str | None = None,
        *,
        timeout: float = 3.0,
        retries: int = 2,
        backoff: float = 0.5,
        down_for: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = f"{api_base_url.rstrip('/')}/internal/v1/jobs/{job_id}/events"
        token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(timeout=timeout, headers=headers, transport=transport)
        self._retries = retries
        self._backoff = backoff
        self._down_for = down_for
        self._down_until = 0.0
        self._warned = False

    def post(self, event: EventCreate) -> bool:
        """Send one event; True if the API accepted it. Never raises."""
        api_down = time.monotonic() < self._down_until
        if api_down and event.type == "metrics":
            return False
        body = event.model_dump(mode="json", exclude_none=True)
        retries = 0 if api_down else self._retries
        for attempt in range(retries + 1):
            try:
                response = self._client.post(self.url, json=body)
                if response.status_code < 500 and response.status_code != 429:
                    if response.is_error:
                        self._warn(f"API refused event: HTTP {response.status_code}")
                    self._down_until = 0.0
                    return response.is_success
                problem = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                problem = type(exc).__name__  # not str(exc): keep the log short and header-free
            if attempt < retries:
                time.sleep(self._backoff * (2**attempt))
        self._down_until = time.monotonic() + self._down_for
        self._warn(f"could not post event ({problem}); training continues")
        return False

    def message(self, text: str, level: Level = "info", data: dict[str, Any] | None = None) -> bool:
        return self.post(EventCreate(level=level, message=_clip(text), data=data))

    def metrics(self, text: str, data: dict[str, Any]) -> bool:
        return self.post(EventCreate(type="metrics", message=_clip(text), data=data))

    def close(self) -> None:
        self._client.close()

    def _warn(self, text: str) -> None:
        # Once per run: a dead API must not flood the log with one line per step.
        if not self._warned:
            print(f"warning: {text}", file=sys.stderr, flush=True)
            self._warned = True


def _clip(text: str, limit: int = 4000) -> str:
    """EventCreate caps messages at 4000 characters."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


class SilentReporter(EventReporter):
    """For workers other than rank 0 of a multi-process run: one process speaks for the job."""

    def __init__(self) -> None:
        super().__init__("http://unused.invalid", "none", token="")

    def post(self, event: EventCreate) -> bool:
        return False
