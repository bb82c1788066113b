"""Validation through the API: OpenAI-shaped file objects, the background path for large files
(and its restart sweep), the scheduler waiting on it, and the dry run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from tests.api.conftest import Harness, auth, chat_lines
from tests.api.test_validation import make_tokenizer
from tests.conftest import ADMIN_KEY
from tuneforge import BadRequestError
from tuneforge.storage import file_key
from tuneforge.types import TINY_MODEL_ID, JobStatus
from tuneforge_api.app import create_app
from tuneforge_api.db.tables import FileRow, JobEventRow, JobRow
from tuneforge_api.store import jobs
from tuneforge_api.store.ids import new_id, now
from tuneforge_scheduler.lifecycle import Scheduler

BAD = chat_lines(3) + b'{"messages": [{"role": "user", "content": "no answer"}]}\n{oops\n'


@pytest.fixture
def async_api(monkeypatch: pytest.MonkeyPatch, database_url: str, request: pytest.FixtureRequest) -> Harness:
    """The app with a 64-byte threshold: every upload but a tiny one is validated in the background
    (``database_url`` is named so that these tests run on both databases too)."""
    monkeypatch.setenv("TUNEFORGE_VALIDATION_SYNC_MAX_BYTES", "64")
    return request.getfixturevalue("api")


def settle(api: Harness) -> None:
    api.http.portal.call(api.app.state.background_validation.wait)


def upload(api: Harness, data: bytes, key: str = ADMIN_KEY) -> dict:
    r = api.http.post(
        "/v1/files", files={"file": ("t.jsonl", data)}, data={"purpose": "fine-tune"}, headers=auth(key)
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_small_file_is_processed_in_the_request_with_its_report(api: Harness) -> None:
    f = upload(api, chat_lines(4))
    assert f["object"] == "file" and f["status"] == "processed" and f["status_details"] is None
    v = f["validation"]
    assert v["format"] == "chat" and v["n_examples"] == 4 and v["n_problems"] == 0 and v["problems"] == []
    stats = v["stats"]
    assert stats["tokens_per_example"]["min"] > 0 and stats["trained_tokens"] > 0
    assert set(stats) >= {"total_tokens", "max_seq_length", "n_over_max_seq_length", "estimated", "method"}
    assert api.http.get(f"/v1/files/{f['id']}", headers=auth(ADMIN_KEY)).json() == f
    assert api.http.get("/v1/files", headers=auth(ADMIN_KEY)).json()["data"] == [f]


def test_large_file_is_validated_in_the_background(async_api: Harness) -> None:
    api = async_api
    f = upload(api, chat_lines(50))
    assert f["status"] == "uploaded" and f["validation"] is None
    done = api.client().files.wait_for_processing(f["id"], timeout=30, poll_interval=0.05)
    assert done.status == "processed" and done.validation is not None and done.validation.n_examples == 50
    assert api.client().files.content(f["id"]) == chat_lines(50)


def test_large_bad_file_ends_in_error_and_stays_listable_and_deletable(async_api: Harness) -> None:
    api = async_api
    f = upload(api, BAD)
    assert f["status"] == "uploaded"
    settle(api)
    got = api.client().files.get(f["id"])
    assert got.status == "error" and got.validation is not None
    assert [(p.line, p.code) for p in got.validation.problems] == [
        (4, "missing_assistant_message"),
        (5, "not_json"),
    ]
    assert got.status_details and "line 4" in got.status_details and "not_json" in got.status_details
    assert [x.id for x in api.client().files.list()] == [f["id"]]
    with pytest.raises(BadRequestError) as exc:  # a file in error cannot train
        api.client().create_job(model=TINY_MODEL_ID, training_file=f["id"])
    assert exc.value.code == "invalid_file"
    assert api.client().files.delete(f["id"]) is True and api.stored_objects() == []


def test_a_file_left_uploaded_is_validated_after_a_restart(api: Harness) -> None:
    """As if the API died mid-validation: the row says "uploaded", the object is stored."""
    file_id = new_id("file")
    project = api.client().models.list() and _default_project(api)
    api.app.state.services.storage.put_bytes(file_key(project, file_id), chat_lines(7))

    async def insert() -> None:
        async with api.app.state.services.sessions() as session:
            session.add(_row(file_id, project, "uploaded"))
            await session.commit()

    api.http.portal.call(insert)
    restarted = create_app(api.settings)
    with TestClient(restarted) as http:
        http.portal.call(restarted.state.background_validation.wait)
        got = http.get(f"/v1/files/{file_id}", headers=auth(ADMIN_KEY)).json()
    assert got["status"] == "processed" and got["validation"]["n_examples"] == 7


def _default_project(api: Harness) -> str:
    f = upload(api, chat_lines(1))

    async def project_of() -> str:
        async with api.app.state.services.sessions() as session:
            return await session.scalar(select(FileRow.project_id).where(FileRow.id == f["id"]))

    return api.http.portal.call(project_of)


def _row(file_id: str, project: str, status: str, **values: object) -> FileRow:
    return FileRow(
        id=file_id,
        project_id=project,
        filename="t.jsonl",
        purpose="fine-tune",
        bytes=100,
        created_at=now(),
        status=status,
        n_examples=0,
        **values,
    )


def _job_values(project: str, file_id: str, hyperparameters: dict) -> dict:
    ts = now()
    return dict(
        id=new_id("ftjob"),
        project_id=project,
        created_at=ts,
        updated_at=ts,
        model=TINY_MODEL_ID,
        status=JobStatus.validating_files.value,
        training_file=file_id,
        validation_file=None,
        method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        lora={},
        quantization=None,
        resources={},
        seed=1,
        attempt=0,
        max_attempts=3,
        cancel_requested=False,
    )


def test_scheduler_waits_for_validation_then_fails_or_queues(api: Harness) -> None:
    """A job on an "uploaded" file stays validating_files; a file in error fails it with
    invalid_training_file; a processed file queues it, with "auto" resolved from the file."""
    services = api.app.state.services
    project = _default_project(api)
    scheduler = Scheduler(services=services, executor=None)  # type: ignore[arg-type]  # not reached
    bad, good_ = new_id("file"), new_id("file")
    services.storage.put_bytes(file_key(project, bad), BAD)
    services.storage.put_bytes(file_key(project, good_), chat_lines(40))
    auto = {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}

    async def make_jobs() -> tuple[str, str]:
        async with services.sessions() as session:
            session.add_all([_row(bad, project, "uploaded"), _row(good_, project, "uploaded")])
            await session.flush()
            a = await jobs.insert(session, _job_values(project, bad, auto))
            b = await jobs.insert(session, _job_values(project, good_, auto))
            await session.commit()
        return a.id, b.id

    async def validate(job_id: str) -> JobRow:
        async with services.sessions() as session:
            row = await jobs.get_row_any_project(session, job_id)
            await scheduler._validate_files(session, row)
            await session.commit()
        async with services.sessions() as session:
            return await jobs.get_row_any_project(session, job_id)

    on_bad, on_good = api.http.portal.call(make_jobs)
    assert api.http.portal.call(validate, on_bad).status == JobStatus.validating_files.value
    assert api.http.portal.call(validate, on_good).status == JobStatus.validating_files.value
    for file_id in (bad, good_):
        api.http.portal.call(lambda f=file_id: _start(api, project, f))
    settle(api)
    failed = api.http.portal.call(validate, on_bad)
    assert failed.status == JobStatus.failed.value and failed.error["code"] == "invalid_training_file"
    assert "line 4" in failed.error["message"] and "missing_assistant_message" in failed.error["message"]
    queued = api.http.portal.call(validate, on_good)
    assert queued.status == JobStatus.queued.value
    assert queued.method["supervised"]["hyperparameters"]["n_epochs"] == 3  # 40 examples x 3 >= 100


async def _start(api: Harness, project: str, file_id: str) -> None:
    api.app.state.background_validation.start(project, file_id)


def count_rows(api: Harness, table: type) -> int:
    async def count() -> int:
        async with api.app.state.services.sessions() as session:
            return await session.scalar(select(func.count()).select_from(table))

    return api.http.portal.call(count)


def test_dry_run_reports_and_creates_nothing(api: Harness) -> None:
    f = upload(api, chat_lines(20))
    body = {"model": TINY_MODEL_ID, "training_file": f["id"], "validation_file": f["id"], "suffix": "x"}
    r = api.http.post("/v1/fine_tuning/jobs/validate", json=body, headers=auth(ADMIN_KEY))
    assert r.status_code == 200, r.text
    out = r.json()
    assert (
        out["object"] == "fine_tuning.job.validation"
        and out["ready"] is True
        and out["method"] == "supervised"
    )
    assert out["training_file"]["validation"]["n_examples"] == 20 and out["validation_file"]["id"] == f["id"]
    stats = out["training_file"]["model_stats"]
    assert out["hyperparameters"]["n_epochs"] == 5  # 20 examples: ceil(100 / 20)
    assert out["estimated_trained_tokens"] == 5 * stats["total_tokens"] > 5 * stats["trained_tokens"] > 0
    estimate = out["estimate"]
    assert estimate["hardware"] == "cpu" and estimate["size_class"] == "tiny" and estimate["seconds"] > 0
    assert "estimate" in estimate["note"]
    assert count_rows(api, JobRow) == 0 and count_rows(api, JobEventRow) == 0
    assert api.client().jobs.list().data == []
    via_sdk = api.client().jobs.validate(body)
    assert via_sdk.estimated_trained_tokens == out["estimated_trained_tokens"]
    assert count_rows(api, JobRow) == 0


def test_dry_run_answers_like_create(api: Harness, other_key: str) -> None:
    f = upload(api, chat_lines(5))
    for key, body, code in [
        (other_key, {"model": TINY_MODEL_ID, "training_file": f["id"]}, "file_not_found"),
        (ADMIN_KEY, {"model": "no/such", "training_file": f["id"]}, "model_not_found"),
        (ADMIN_KEY, {"model": TINY_MODEL_ID, "training_file": "file-nope"}, "file_not_found"),
    ]:
        r = api.http.post("/v1/fine_tuning/jobs/validate", json=body, headers=auth(key))
        create = api.http.post("/v1/fine_tuning/jobs", json=body, headers=auth(key))
        assert r.status_code == create.status_code == 400
        assert r.json()["error"]["code"] == create.json()["error"]["code"] == code
    r = api.http.post(
        "/v1/fine_tuning/jobs/validate", json={"model": TINY_MODEL_ID, "training_file": f["id"]}
    )
    assert r.status_code == 401
    assert count_rows(api, JobRow) == 0


def test_dry_run_on_a_file_in_error_says_why(async_api: Harness) -> None:
    api = async_api
    f = upload(api, BAD)
    settle(api)
    r = api.http.post(
        "/v1/fine_tuning/jobs/validate",
        json={"model": TINY_MODEL_ID, "training_file": f["id"]},
        headers=auth(ADMIN_KEY),
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_file"
    assert "line 4" in r.json()["error"]["message"]


def test_dry_run_counts_with_the_models_tokenizer(api: Harness, tmp_path: Path) -> None:
    models = tmp_path / "models"
    make_tokenizer(models / "org--words", max_positions=16)
    api.settings.models_dir = models
    lines = [
        {
            "messages": [
                {"role": "user", "content": "alpha " * n},
                {"role": "assistant", "content": "beta gamma"},
            ]
        }
        for n in (1, 2, 30)
    ]
    f = upload(api, b"".join(json.dumps(x).encode() + b"\n" for x in lines))
    out = api.client().jobs.validate({"model": "org/words", "training_file": f["id"]})
    stats = out.training_file.model_stats
    assert stats["tokenizer"] == "org/words" and stats["estimated"] is False and stats["method"] == "exact"
    assert stats["tokens_per_example"]["max"] == 30 + 2 + 8 and stats["max_seq_length"] == 16
    assert stats["n_over_max_seq_length"] == 1 and stats["trained_tokens"] == 3 * 3
    assert out.estimate is not None and out.estimate.seconds is None  # no throughput known for it
