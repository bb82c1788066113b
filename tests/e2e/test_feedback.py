"""The human-feedback loop through the service: upload prompts, a session whose sample job runs
on the local executor with the real trainer, a labeler key that ranks every item, the export,
and a reward_model job trained on that export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.conftest import Service
from tests.trainer.synthetic import QUESTIONS, jsonl
from tuneforge import Client, JobStatus
from tuneforge.errors import PermissionDeniedError

pytestmark = pytest.mark.e2e
TINY = "tuneforge/tiny-llama"


def test_sample_rank_export_train(service: Service, tmp_path: Path) -> None:
    owner = service.client()
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(jsonl([{"messages": [{"role": "user", "content": q}]} for q in QUESTIONS]))
    prompts = owner.files.upload(path)
    fbs = owner.feedback.create_session(
        model=TINY,
        prompts_file=prompts.id,
        k=3,
        sampling={"temperature": 1.0, "max_new_tokens": 12, "seed": 4},
    )
    assert fbs.status == "generating" and fbs.progress.prompts_total == len(QUESTIONS)
    ready = owner.feedback.wait_until_ready(fbs.id, timeout=600, poll_interval=0.5)
    events = list(owner.jobs.events(fbs.job_id))
    assert ready.status == "ready", (ready.error, [e.message for e in events])
    assert ready.progress.prompts_generated == ready.progress.items_total == len(QUESTIONS)
    progress = [e.data for e in events if e.type == "metrics" and e.data and "prompts_generated" in e.data]
    assert progress and progress[-1]["prompts_generated"] == len(QUESTIONS)
    job = owner.jobs.get(fbs.job_id)
    assert job.status == JobStatus.succeeded and job.fine_tuned_model is None

    key = owner.feedback.create_labeler_key("e2e").key or ""
    labeler = Client(base_url=service.url, api_key=key, timeout=30)
    with pytest.raises(PermissionDeniedError):
        labeler.files.list()
    ranked = 0
    while (nxt := labeler.feedback.next_item(fbs.id)).item is not None:
        item = nxt.item
        assert item.messages[-1].role == "user" and len(item.answers) == 3
        # Longer answers first; equal lengths tie.
        by_length: dict[int, list[str]] = {}
        for answer in item.answers:
            by_length.setdefault(-len(answer.text), []).append(answer.id)
        labeler.feedback.label(fbs.id, item.id, ranking=[by_length[n] for n in sorted(by_length)])
        ranked += 1
    assert ranked == len(QUESTIONS)
    session = owner.feedback.get_session(fbs.id)
    assert session.progress.labels_done == len(QUESTIONS)
    assert [(s.name, s.labels) for s in session.labelers] == [("e2e", len(QUESTIONS))]

    export = owner.feedback.export(fbs.id)
    assert export.status == "processed" and export.validation and export.validation.format == "rankings"
    lines = [json.loads(x) for x in owner.files.content(export.id).splitlines()]
    assert lines and all(len(x["responses"]) >= 2 for x in lines)
    rm = owner.create_job(
        model=TINY,
        training_file=export.id,
        seed=0,
        method={
            "type": "reward_model",
            "reward_model": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}},
        },
    )
    rm = owner.jobs.wait(rm.id, timeout=900, poll_interval=0.5)
    assert rm.status == JobStatus.succeeded, [e.message for e in owner.jobs.events(rm.id)]
