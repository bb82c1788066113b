"""The sample method: ``python -m tuneforge_trainer`` writes K answers per prompt for a feedback
session, from the base tiny model and from an SFT adapter on top of it (loaded through peft)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.trainer.synthetic import MARKER, QUESTIONS, jsonl
from tuneforge.storage import FileStorage, adapter_prefix, job_prefix
from tuneforge.types import SampleRecord
from tuneforge_trainer.publish import sha256_file

if TYPE_CHECKING:
    from tests.trainer.conftest import EventSink, TrainerJob

RunTrainer = Callable[["TrainerJob"], subprocess.CompletedProcess[str]]
PROJECT = "proj-test"
K = 3


def sample_method(**sampling: Any) -> dict[str, Any]:
    return {"type": "sample", "sample": {"k": K, "max_new_tokens": 12, **sampling}}


def samples_prefix(job_id: str) -> str:
    return job_prefix(PROJECT, job_id) + "samples/"


def read_samples(job: TrainerJob) -> list[SampleRecord]:
    storage = FileStorage(job.root)
    prefix = samples_prefix(job.job_id)
    manifest = json.loads(storage.get_bytes(prefix + "manifest.json"))
    path = job.root / prefix / "samples.jsonl"
    assert manifest["files"] == {"samples.jsonl": sha256_file(path)}
    return [SampleRecord.model_validate_json(line) for line in path.read_bytes().splitlines()]


def sample_job(
    make_job: Callable[..., TrainerJob], folder: Path, url: str, prompts: bytes, **over: Any
) -> TrainerJob:
    job_id = over.pop("job_id", "ftjob-sample")
    return make_job(
        folder,
        prompts,
        url,
        job_id=job_id,
        method=sample_method(**over.pop("sampling", {})),
        samples_prefix=samples_prefix(job_id),
        **over,
    )


PLAIN = jsonl([{"prompt": q} for q in QUESTIONS])
CHAT = jsonl([{"messages": [{"role": "user", "content": q}]} for q in QUESTIONS])


def test_k_answers_per_prompt_seeded_with_progress(
    tmp_path: Path,
    tiny_model_dir: Path,
    event_sink: EventSink,
    make_job: Callable[..., TrainerJob],
    run_trainer: RunTrainer,
) -> None:
    job = sample_job(make_job, tmp_path / "a", event_sink.url, PLAIN, seed=7)
    done = run_trainer(job)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = read_samples(job)
    assert [r.index for r in records] == list(range(len(QUESTIONS)))
    assert [r.prompt for r in records] == QUESTIONS
    assert all(len(r.answers) == K for r in records)
    assert any(len(set(r.answers)) > 1 for r in records), "sampling gave K copies of one answer everywhere"
    progress = [e["data"] for e in event_sink.events(job.job_id) if e["type"] == "metrics"]
    assert progress[-1] == {"prompts_generated": len(QUESTIONS), "prompts_total": len(QUESTIONS)}
    # No adapter is published by a sample job: the samples are its output.
    assert not (job.root / adapter_prefix(PROJECT, job.job_id)).exists()

    # Same seed: a retried attempt writes the same answers. Another seed: other answers.
    again = sample_job(make_job, tmp_path / "b", event_sink.url, PLAIN, seed=7, attempt=2)
    assert run_trainer(again).returncode == 0
    assert [r.answers for r in read_samples(again)] == [r.answers for r in records]
    other = sample_job(make_job, tmp_path / "c", event_sink.url, PLAIN, seed=8)
    assert run_trainer(other).returncode == 0
    assert [r.answers for r in read_samples(other)] != [r.answers for r in records]


def test_answers_from_an_sft_adapter(
    tmp_path: Path,
    tiny_model_dir: Path,
    event_sink: EventSink,
    make_job: Callable[..., TrainerJob],
    run_trainer: RunTrainer,
) -> None:
    """An SFT adapter that always answers with the capital changes what is sampled."""
    sft_rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"{MARKER}."}]}
        for q in QUESTIONS
    ]
    sft = make_job(
        tmp_path / "sft",
        jsonl(sft_rows),
        event_sink.url,
        job_id="ftjob-sft",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 30, "batch_size": 2}}},
    )
    trained = run_trainer(sft)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]

    low = {"temperature": 0.3, "max_new_tokens": 6}
    base = sample_job(make_job, tmp_path / "base", event_sink.url, CHAT, seed=3, sampling=low)
    tuned = sample_job(make_job, tmp_path / "tuned", event_sink.url, CHAT, seed=3, sampling=low)
    key = adapter_prefix(PROJECT, sft.job_id)
    shutil.copytree(sft.root / key, tuned.root / key)  # as the API points an ft: model at its adapter
    tuned.spec["init_adapter_key"] = key
    tuned.spec_path.write_text(json.dumps(tuned.spec))
    for job in (base, tuned):
        done = run_trainer(job)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def share(job: TrainerJob) -> float:
        answers = [a for r in read_samples(job) for a in r.answers]
        return sum(MARKER in a for a in answers) / len(answers)

    assert share(tuned) >= 0.5
    assert share(base) < 0.2
