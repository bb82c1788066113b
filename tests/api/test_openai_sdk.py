"""The unmodified `openai` package against Tuneforge, only base_url swapped."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from tests.api.conftest import Harness, chat_lines
from tests.conftest import ADMIN_KEY
from tuneforge.types import JobStatus
from tuneforge_api.store import jobs

TINY = "tuneforge/tiny-llama"
OPENAI_STATUSES = {"validating_files", "queued", "running", "succeeded", "failed", "cancelled"}


@pytest.fixture
def oai(live_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_url}/v1", api_key=ADMIN_KEY, max_retries=0)


@pytest.fixture
def train_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_bytes(chat_lines(6))
    return path


def test_files(oai: openai.OpenAI, train_file: Path) -> None:
    with open(train_file, "rb") as fh:
        f = oai.files.create(file=fh, purpose="fine-tune")
    assert f.object == "file" and f.purpose == "fine-tune" and f.bytes == train_file.stat().st_size
    assert oai.files.wait_for_processing(f.id, poll_interval=0.1, max_wait_seconds=10).status == "processed"
    assert oai.files.retrieve(f.id).filename == "train.jsonl"
    assert [x.id for x in oai.files.list()] == [f.id]
    assert oai.files.content(f.id).read() == train_file.read_bytes()
    deleted = oai.files.delete(f.id)
    assert deleted.deleted is True and deleted.id == f.id
    with pytest.raises(openai.NotFoundError):
        oai.files.retrieve(f.id)


def test_jobs_create_retrieve_list_cancel_events(oai: openai.OpenAI, api: Harness, train_file: Path) -> None:
    with open(train_file, "rb") as fh:
        fid = oai.files.create(file=fh, purpose="fine-tune").id
    old_style = oai.fine_tuning.jobs.create(model=TINY, training_file=fid, hyperparameters={"n_epochs": 2})
    assert old_style.hyperparameters.n_epochs == 2 and old_style.method.type == "supervised"
    job = oai.fine_tuning.jobs.create(
        model=TINY,
        training_file=fid,
        validation_file=fid,
        suffix="oai",
        seed=11,
        metadata={"team": "ml"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 2}}},
    )
    assert job.object == "fine_tuning.job" and job.status in OPENAI_STATUSES and job.seed == 11
    assert job.error is None and job.result_files == [] and job.fine_tuned_model is None
    assert job.metadata == {"team": "ml"}
    third = oai.fine_tuning.jobs.create(model=TINY, training_file=fid)
    assert oai.fine_tuning.jobs.retrieve(job.id).id == job.id

    page = oai.fine_tuning.jobs.list(limit=2)
    assert page.has_more is True and [j.id for j in page.data] == [third.id, job.id]
    assert [j.id for j in oai.fine_tuning.jobs.list(limit=2)] == [third.id, job.id, old_style.id]  # all pages

    cancelled = oai.fine_tuning.jobs.cancel(third.id)
    assert cancelled.status == "cancelled"
    events = list(oai.fine_tuning.jobs.list_events(third.id, limit=1))  # iterates every page
    assert [e.message for e in events] == [
        "Job cancelled before it started",
        f"Created fine-tuning job {third.id}",
    ]
    assert all(
        e.object == "fine_tuning.job.event" and e.level == "info" and e.type == "message" for e in events
    )
    assert list(oai.fine_tuning.jobs.checkpoints.list(job.id)) == []


def test_failed_job_shape(oai: openai.OpenAI, api: Harness, train_file: Path) -> None:
    with open(train_file, "rb") as fh:
        fid = oai.files.create(file=fh, purpose="fine-tune").id
    job = oai.fine_tuning.jobs.create(model=TINY, training_file=fid)

    async def fail() -> None:
        async with api.app.state.services.sessions() as session:
            await jobs.transition(
                session,
                job.id,
                (JobStatus.validating_files,),
                JobStatus.failed,
                error={"code": "invalid_training_file", "message": "line 3: bad", "param": None},
            )
            await session.commit()

    api.http.portal.call(fail)
    got = oai.fine_tuning.jobs.retrieve(job.id)
    assert got.status == "failed" and got.error.code == "invalid_training_file" and got.finished_at


def test_error_classes(oai: openai.OpenAI, live_url: str, train_file: Path) -> None:
    with open(train_file, "rb") as fh:
        fid = oai.files.create(file=fh, purpose="fine-tune").id
    with pytest.raises(openai.BadRequestError) as bad:
        oai.fine_tuning.jobs.create(model="no/such", training_file=fid)
    assert bad.value.code == "model_not_found" and bad.value.param == "model"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{live_url}/v1", api_key="wrong", max_retries=0).files.list()
    with pytest.raises(openai.NotFoundError):
        oai.fine_tuning.jobs.retrieve("ftjob-missing")
    oai.fine_tuning.jobs.create(model=TINY, training_file=fid, extra_headers={"Idempotency-Key": "k"})
    with pytest.raises(openai.UnprocessableEntityError):
        oai.fine_tuning.jobs.create(
            model=TINY, training_file=fid, seed=1, extra_headers={"Idempotency-Key": "k"}
        )


def test_extra_methods_go_through_extra_body(oai: openai.OpenAI, train_file: Path) -> None:
    """Our methods beyond OpenAI's reach the same endpoint; until the trainer has them the
    API refuses them at create time with a clear 400, never in the pod."""
    with open(train_file, "rb") as fh:
        fid = oai.files.create(file=fh, purpose="fine-tune").id
    with pytest.raises(openai.BadRequestError) as exc:
        oai.fine_tuning.jobs.create(model=TINY, training_file=fid, extra_body={"method": {"type": "rlhf"}})
    assert exc.value.param == "method.rlhf"
    job = oai.fine_tuning.jobs.create(model=TINY, training_file=fid, extra_body={"lora": {"r": 4}})
    assert json.loads(job.model_dump_json())["lora"]["r"] == 4
