"""The CLI against the running service, as a user types it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ADMIN_KEY
from tests.e2e.conftest import Service

pytestmark = pytest.mark.e2e
TUNEFORGE = str(Path(sys.executable).parent / "tuneforge")
DATA = Path(__file__).resolve().parents[2] / "examples" / "demo_chat.jsonl"


def cli(
    service: Service, *args: str, key: str = ADMIN_KEY, human: bool = False
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TUNEFORGE_BASE_URL": service.url, "TUNEFORGE_API_KEY": key}
    flags = [] if human else ["--json"]
    return subprocess.run([TUNEFORGE, *flags, *args], env=env, capture_output=True, text=True, timeout=600)


def ok(result: subprocess.CompletedProcess[str]):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_cli_upload_train_download(service: Service, tmp_path: Path) -> None:
    f = ok(cli(service, "files", "upload", str(DATA)))
    assert f["id"].startswith("file-") and f["bytes"] == DATA.stat().st_size
    assert f["id"] in [x["id"] for x in ok(cli(service, "files", "list"))]
    job = ok(
        cli(
            service,
            "jobs",
            "create",
            "--model",
            "tuneforge/tiny-llama",
            "--training-file",
            f["id"],
            "--hyperparameters",
            '{"n_epochs": 1, "batch_size": 8}',
            "--suffix",
            "cli",
            "--wait",
        )
    )
    assert job["status"] == "succeeded" and job["fine_tuned_model"].endswith(f":cli:{job['id']}")
    assert ok(cli(service, "jobs", "get", job["id"]))["id"] == job["id"]
    events = ok(cli(service, "jobs", "events", job["id"]))
    assert events[0]["message"].startswith("Created fine-tuning job")
    out = ok(cli(service, "adapters", "download", job["id"], str(tmp_path / "adapter")))
    assert (Path(out["path"]) / "manifest.json").is_file()
    assert job["fine_tuned_model"] in [m["id"] for m in ok(cli(service, "models"))]


def test_cli_admin(service: Service) -> None:
    project = ok(cli(service, "projects", "create", "cli-team"))
    key = ok(cli(service, "keys", "create", project["id"], "--name", "ci"))
    assert key["key"] and key["role"] == "member"
    assert ok(cli(service, "files", "list", key=key["key"])) == []
    denied = cli(service, "projects", "list", key=key["key"])
    assert denied.returncode == 1 and "403" in denied.stderr and "Traceback" not in denied.stderr


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["files", "list"], 1, "invalid_api_key"),
        (["files", "upload", "/no/such/file.jsonl"], 2, "No such file"),
        (["jobs", "create", "--model", "m", "--training-file", "f", "--hyperparameters", "{bad"], 2, "JSON"),
        (
            [
                "jobs",
                "create",
                "--model",
                "m",
                "--training-file",
                "f",
                "--hyperparameters",
                '{"n_epochs": -1}',
            ],
            2,
            "n_epochs",
        ),
        (["jobs", "create", "--model", "no/model", "--training-file", "file-x"], 1, "model_not_found"),
        (["jobs", "get", "ftjob-nope"], 1, "job_not_found"),
    ],
)
def test_cli_mistakes_are_clear(service: Service, args: list[str], code: int, text: str) -> None:
    key = "tf-wrong" if text == "invalid_api_key" else ADMIN_KEY
    result = cli(service, *args, key=key)
    assert result.returncode == code, result.stderr
    assert text in result.stderr and "Traceback" not in result.stderr


def test_cli_tables_for_people_and_exit_code_for_an_unsuccessful_job(service: Service) -> None:
    f = ok(cli(service, "files", "upload", str(DATA)))
    job = ok(cli(service, "jobs", "create", "--model", "tuneforge/tiny-llama", "--training-file", f["id"]))
    assert cli(service, "jobs", "cancel", job["id"]).returncode == 0  # asked and done: not an error
    waited = cli(service, "jobs", "wait", job["id"])
    assert waited.returncode == 3, waited.stderr  # scripts learn the outcome without parsing
    assert json.loads(waited.stdout)["status"] == "cancelled"
    assert cli(service, "jobs", "get", job["id"]).returncode == 0
    table = cli(service, "files", "list", human=True)
    assert table.returncode == 0
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["ID", "FILENAME", "BYTES", "STATUS", "CREATED_AT"]
    assert any(row.startswith(f["id"]) for row in rows)
    single = cli(service, "files", "get", f["id"], human=True)
    assert f"id: {f['id']}" in single.stdout.splitlines()
