"""Bad settings at start: the process exits with one line per problem, naming the variable,
and without the values. pydantic's own error prints the inputs, a secret among them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tuneforge_api.settings import Settings, load_settings
from tuneforge_scheduler.settings import SchedulerSettings

SECRET_URL = "postgresql+asyncpg://tuneforge:hunter2-db-password@db.internal/tuneforge"


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in [n for n in os.environ if n.startswith("TUNEFORGE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path))
    monkeypatch.setenv("TUNEFORGE_DATABASE_URL", SECRET_URL)
    return monkeypatch


@pytest.mark.parametrize("cls", [Settings, SchedulerSettings])
def test_a_placeholder_key_in_production_exits_without_the_inputs(env: pytest.MonkeyPatch, cls: type) -> None:
    env.setenv("TUNEFORGE_ENVIRONMENT", "production")
    env.setenv("TUNEFORGE_API_KEY", "changeme")
    with pytest.raises(SystemExit) as exited:
        load_settings(cls)
    message = str(exited.value.code)
    assert "TUNEFORGE_API_KEY is a placeholder" in message
    assert "hunter2" not in message and "input" not in message


def test_each_bad_variable_is_named(env: pytest.MonkeyPatch) -> None:
    env.setenv("TUNEFORGE_RATE_LIMIT_PER_S", "fast")
    env.setenv("TUNEFORGE_MAX_ACTIVE_JOBS", "-1")
    with pytest.raises(SystemExit) as exited:
        load_settings(Settings)
    lines = str(exited.value.code).splitlines()
    assert lines[0] == "Tuneforge cannot start, its settings are invalid:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "TUNEFORGE_RATE_LIMIT_PER_S",
        "TUNEFORGE_MAX_ACTIVE_JOBS",
    ]
    assert "fast" not in "\n".join(lines) and "hunter2" not in "\n".join(lines)


def test_good_settings_load(env: pytest.MonkeyPatch) -> None:
    env.setenv("TUNEFORGE_ENVIRONMENT", "production")
    env.setenv("TUNEFORGE_API_KEY", "a-real-secret-of-some-length")
    settings = load_settings(SchedulerSettings, public_url="http://127.0.0.1:9")
    assert settings.api_key is not None and settings.public_url == "http://127.0.0.1:9"


def test_the_scheduler_process_exits_with_the_message(env: pytest.MonkeyPatch) -> None:
    """The real entry point: exit status 1, the message, no traceback."""
    env.setenv("TUNEFORGE_ENVIRONMENT", "production")
    env.setenv("TUNEFORGE_API_KEY", "changeme")
    done = subprocess.run(
        [sys.executable, "-m", "tuneforge_scheduler"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert "TUNEFORGE_API_KEY is a placeholder" in done.stderr
    assert "Traceback" not in done.stderr and "hunter2" not in done.stderr + done.stdout


def test_the_app_factory_exits_with_the_message(env: pytest.MonkeyPatch) -> None:
    """``uvicorn --factory tuneforge_api.app:create_app`` (the image's command) reads the settings."""
    from tuneforge_api.app import create_app

    env.setenv("TUNEFORGE_ENVIRONMENT", "production")
    env.setenv("TUNEFORGE_API_KEY", "changeme")
    with pytest.raises(SystemExit, match="TUNEFORGE_API_KEY is a placeholder"):
        create_app()
