"""The real service (`tuneforge up`, the local executor, the real trainer) on S3 storage with
its own credentials, logging as it does for an operator: after a job trained to the end, no API key, job token
or S3 credential is in the service log, the trainer's logs, the run folders or the events."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.conftest import ADMIN_KEY, drop_queue
from tests.e2e.conftest import start_service, stop_service, trainer_pids, wait_until
from tuneforge import JobStatus

pytestmark = pytest.mark.e2e
DATA = Path(__file__).resolve().parents[2] / "examples" / "demo_chat.jsonl"


def _job_token(job_id: str) -> str | None:
    """The token the scheduler gave the trainer, read from the trainer's environment."""
    for pid in trainer_pids(job_id, python_only=True):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"TUNEFORGE_JOB_TOKEN="):
                return item.split(b"=", 1)[1].decode()
    return None


def test_no_secret_in_the_services_logs(
    tmp_path: Path,
    redis_url: str,
    models_cache: Path,
    s3_bucket: str,
    monkeypatch,
) -> None:
    s3_key_id, s3_secret = f"AKIATF{uuid.uuid4().hex[:14].upper()}", f"tf-s3-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_key_id)  # the service and its trainers inherit them
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_secret)
    queue = f"tf-e2e:{uuid.uuid4().hex}"
    service = start_service(
        tmp_path / "home",
        redis_url,
        models_cache,
        queue,
        extra_env={"TUNEFORGE_STORAGE_URI": f"s3://{s3_bucket}/e2e"},
    )
    try:
        client = service.client()
        project = client.admin.create_project(f"sec-{uuid.uuid4().hex[:6]}")
        member = client.admin.create_key(project.id, name="m").key or ""
        user = service.client(member)
        user.files.list()
        for wrong in (member + "x", s3_secret):
            assert (
                service.client(wrong)
                ._http.get(f"{service.url}/v1/files", headers={"Authorization": f"Bearer {wrong}"})
                .status_code
                == 401
            )
        f = user.files.upload(DATA)
        job = user.create_job(
            model="tuneforge/tiny-llama", training_file=f.id, hyperparameters={"n_epochs": 1}
        )
        token = wait_until(lambda: _job_token(job.id), 120, "the trainer never started", interval=0.05)
        job = user.jobs.wait(job.id, timeout=600, poll_interval=0.5)
        events = "\n".join(f"{e.message} {e.data}" for e in user.jobs.events(job.id))
        assert job.status == JobStatus.succeeded, events
    finally:
        stop_service(service)
        drop_queue(redis_url, queue)
    texts = {"service log": service.output(), "events": events}
    for path in (tmp_path / "home").rglob("*"):
        if path.is_file() and path.name not in ("credentials",) and path.suffix not in (".db", ".db-wal"):
            if path.suffix in (".log", ".json", ".txt", "") or "log" in path.name:
                texts[str(path.relative_to(tmp_path))] = path.read_text(errors="replace")
    assert len(texts) > 2 and any("runs" in name for name in texts), sorted(texts)
    secrets = {"admin key": ADMIN_KEY, "member key": member, "job token": token, "S3 key id": s3_key_id}
    secrets["S3 secret"] = s3_secret
    for where, text in texts.items():
        for name, value in secrets.items():
            assert value not in text, f"{name} found in {where}"
