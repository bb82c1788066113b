"""`tuneforge up` on first start without a configured key, and again on the same home."""

from __future__ import annotations

import os
import re
import signal
import stat
import uuid
from pathlib import Path

import pytest

from tests.e2e import conftest as e2e
from tuneforge import Client

pytestmark = pytest.mark.e2e


def test_first_start_prints_a_key_once_and_saves_it_0600(
    tmp_path: Path, redis_url: str, models_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, queue = tmp_path / "home", f"tf-e2e:{uuid.uuid4().hex}"
    monkeypatch.setattr(e2e, "ADMIN_KEY", None)  # start_service passes no TUNEFORGE_API_KEY
    monkeypatch.delenv("TUNEFORGE_API_KEY", raising=False)
    first = e2e.start_service(home, redis_url, models_cache, queue)
    try:
        printed = re.findall(r"TUNEFORGE_API_KEY=(\S+)", first.output())
        assert len(printed) == 1
        cred = home / "credentials"
        assert stat.S_IMODE(cred.stat().st_mode) == 0o600
        assert cred.read_text().strip() == f"TUNEFORGE_API_KEY={printed[0]}"
        assert Client(base_url=first.url, api_key=printed[0]).files.list() == []
    finally:
        assert e2e.stop_service(first) == 0
    second = e2e.start_service(home, redis_url, models_cache, queue)
    try:
        assert "TUNEFORGE_API_KEY=" not in second.output()  # printed on the first start only
        assert Client(base_url=second.url, api_key=printed[0]).files.list() == []
    finally:
        assert e2e.stop_service(second) == 0
    assert "Tuneforge stopped." in second.output()
    assert not os.environ.get("TUNEFORGE_API_KEY")


def test_the_server_ignores_sigpipe(tmp_path: Path, redis_url: str, models_cache: Path) -> None:
    """The CLI restores SIGPIPE's default action so that `tuneforge jobs list | head` ends quietly;
    `up` must not: a write to a pipe or socket whose other end is gone (a client, a worker process)
    would then kill the whole service instead of raising in the one request. (A UI test's service
    died of signal 13 in CI before this.)"""
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("reads the signal mask from /proc (Linux)")
    svc = e2e.start_service(tmp_path / "home", redis_url, models_cache, f"tf-e2e:{uuid.uuid4().hex}")
    try:
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{svc.proc.pid}/status").read_text().splitlines()
        )
        assert int(fields["SigIgn"], 16) >> (signal.SIGPIPE - 1) & 1, "SIGPIPE is not ignored"
    finally:
        assert e2e.stop_service(svc) == 0, svc.output()
