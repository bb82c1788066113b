"""EventReporter: posts over real HTTP, and never lets a broken API break training."""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

import httpx
import pytest

from tuneforge.types import EventCreate
from tuneforge_trainer.events import EventReporter

if TYPE_CHECKING:
    from tests.trainer.conftest import EventSink


def test_posts_event_with_bearer_token(event_sink: EventSink) -> None:
    reporter = EventReporter(event_sink.url, "ftjob-9", token="tok-123")
    assert reporter.message("attempt 1 started")
    assert reporter.metrics("step 1/2: loss=1.00", {"step": 1, "total_steps": 2})
    first, second = event_sink.requests
    assert first["path"] == "/internal/v1/jobs/ftjob-9/events"
    assert first["headers"]["Authorization"] == "Bearer tok-123"
    assert first["body"] == {"level": "info", "message": "attempt 1 started", "type": "message"}
    assert second["body"]["type"] == "metrics"
    assert second["body"]["data"] == {"step": 1, "total_steps": 2}
    EventCreate.model_validate(second["body"])  # what the API will parse


def test_token_comes_from_the_environment(event_sink: EventSink, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEFORGE_JOB_TOKEN", "from-env")
    EventReporter(event_sink.url, "j").message("hi")
    assert event_sink.requests[0]["headers"]["Authorization"] == "Bearer from-env"


def test_long_messages_are_clipped_to_the_api_limit(event_sink: EventSink) -> None:
    EventReporter(event_sink.url, "j", token="t").message("x" * 5000)
    assert len(event_sink.requests[0]["body"]["message"]) == 4000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_api_down_never_raises_and_never_logs_the_token(capsys: pytest.CaptureFixture[str]) -> None:
    reporter = EventReporter(f"http://127.0.0.1:{free_port()}", "j", token="secret-token", backoff=0.01)
    start = time.monotonic()
    assert reporter.message("hello") is False
    assert reporter.metrics("step 1/1: loss=1.00", {"step": 1}) is False  # dropped while the API is down
    assert time.monotonic() - start < 2
    err = capsys.readouterr().err
    assert "could not post event" in err
    assert "secret-token" not in err


def test_retries_server_errors_then_gives_up() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(503)

    reporter = EventReporter(
        "http://api", "j", token="t", retries=2, backoff=0.0, transport=httpx.MockTransport(handler)
    )
    assert reporter.message("hello") is False
    assert len(calls) == 3
    assert reporter.message("again") is False  # backing off: one try, no retries
    assert len(calls) == 4


def test_client_errors_are_not_retried() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(401)

    reporter = EventReporter(
        "http://api", "j", token="t", backoff=0.0, transport=httpx.MockTransport(handler)
    )
    assert reporter.message("hello") is False
    assert len(calls) == 1
