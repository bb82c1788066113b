"""Reward model and DPO jobs end to end through the service, and a killed trainer that
resumes from its checkpoint. Data: a learnable preference (the chosen answer names the
capital), from tests/trainer/synthetic.py."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.e2e.conftest import Service, trainer_pids, wait_until
from tests.trainer.synthetic import jsonl, marker_pairs, marker_rankings
from tuneforge import JobStatus

pytestmark = pytest.mark.e2e
TINY = "tuneforge/tiny-llama"


def upload(service: Service, tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return service.client().files.upload(path).id


def metrics(events, key: str) -> list[float]:
    return [e.data[key] for e in events if e.type == "metrics" and e.data and key in e.data]


def test_reward_model_learns_the_preference(service: Service, tmp_path: Path) -> None:
    client = service.client()
    train = upload(service, tmp_path, "rm_train.jsonl", jsonl(marker_rankings(12, seed=2, k=3)))
    valid = upload(service, tmp_path, "rm_valid.jsonl", jsonl(marker_pairs(24, seed=3)))
    job = client.create_job(
        model=TINY,
        training_file=train,
        validation_file=valid,
        seed=0,
        method={
            "type": "reward_model",
            "reward_model": {"hyperparameters": {"n_epochs": 4, "batch_size": 8}},
        },
    )
    job = client.jobs.wait(job.id, timeout=900, poll_interval=0.5)
    events = list(client.jobs.events(job.id))
    assert job.status == JobStatus.succeeded, [e.message for e in events]
    accuracy = metrics(events, "valid_accuracy")
    assert accuracy and accuracy[-1] >= 0.9, accuracy
    assert client.adapters.download(job.id, tmp_path / "rm").joinpath("manifest.json").is_file()


def test_dpo_margin_grows(service: Service, tmp_path: Path) -> None:
    client = service.client()
    train = upload(service, tmp_path, "dpo_train.jsonl", jsonl(marker_pairs(32, seed=4)))
    valid = upload(service, tmp_path, "dpo_valid.jsonl", jsonl(marker_pairs(16, seed=5)))
    hp = {"n_epochs": 3, "batch_size": 8, "beta": 0.2, "eval_every": 4}
    job = client.create_job(
        model=TINY,
        training_file=train,
        validation_file=valid,
        seed=0,
        method={"type": "dpo", "dpo": {"hyperparameters": hp}},
    )
    job = client.jobs.wait(job.id, timeout=900, poll_interval=0.5)
    events = list(client.jobs.events(job.id))
    assert job.status == JobStatus.succeeded, [e.message for e in events]
    assert job.hyperparameters["beta"] == 0.2
    margins = metrics(events, "valid_reward_margin")
    assert len(margins) >= 2 and margins[-1] > margins[0], margins


def test_killed_trainer_resumes_from_its_checkpoint(service: Service, tmp_path: Path) -> None:
    client = service.client()
    data = Path(__file__).resolve().parents[2] / "examples" / "demo_chat.jsonl"
    job = client.create_job(
        model=TINY,
        training_file=client.files.upload(data).id,
        seed=3,
        hyperparameters={"n_epochs": 2, "batch_size": 8, "checkpoint_every": 4},
    )
    wait_until(lambda: client.jobs.checkpoints(job.id), 300, "no checkpoint was written")
    for pid in trainer_pids(job.id, python_only=True):
        os.kill(pid, signal.SIGKILL)
    job = client.jobs.wait(job.id, timeout=900, poll_interval=0.5)
    messages = [e.message for e in client.jobs.events(job.id)]
    assert job.status == JobStatus.succeeded, messages
    assert "Attempt 2 started" in messages
    assert any(m.startswith("resumed from step ") and m.endswith("(attempt 2)") for m in messages), messages
    steps = [c.step_number for c in client.jobs.checkpoints(job.id)]
    assert steps == sorted(steps, reverse=True) and steps[-1] == 4


def test_rlhf_loop_reward_model_then_ppo_and_grpo(service: Service, tmp_path: Path) -> None:
    """The seed's RLHF: rankings train a reward model; PPO then trains the policy against it.
    GRPO runs on the same prompts with a built-in reward."""
    client = service.client()
    prompts = client.files.upload(Path(__file__).resolve().parents[2] / "examples" / "rlhf_prompts.jsonl").id
    train = upload(service, tmp_path, "rm_train.jsonl", jsonl(marker_pairs(24, seed=1)))
    rm = client.create_job(
        model=TINY,
        training_file=train,
        seed=0,
        method={
            "type": "reward_model",
            "reward_model": {"hyperparameters": {"n_epochs": 3, "batch_size": 8}},
        },
    )
    rm = client.jobs.wait(rm.id, timeout=900, poll_interval=0.5)
    assert rm.status == JobStatus.succeeded, [e.message for e in client.jobs.events(rm.id)]

    hp = {"n_epochs": 1, "batch_size": 4, "rollout_batch_size": 8, "max_new_tokens": 8}
    ppo = client.create_job(
        model=TINY,
        training_file=prompts,
        seed=0,
        method={"type": "rlhf", "rlhf": {"algorithm": "ppo", "reward_model": rm.id, "hyperparameters": hp}},
    )
    grpo = client.create_job(
        model=TINY,
        training_file=prompts,
        seed=0,
        method={
            "type": "rlhf",
            "rlhf": {
                "algorithm": "grpo",
                "reward_function": {"type": "contains"},
                "hyperparameters": {**hp, "num_generations": 4},
            },
        },
    )
    for job in (ppo, grpo):
        done = client.jobs.wait(job.id, timeout=900, poll_interval=0.5)
        events = list(client.jobs.events(job.id))
        assert done.status == JobStatus.succeeded, [e.message for e in events]
        assert metrics(events, "reward_mean"), "no reward metrics were reported"
        assert (client.adapters.download(job.id, tmp_path / job.id) / "adapter_model.safetensors").is_file()
    ppo_events = list(client.jobs.events(ppo.id))
    assert all(
        k in metrics_keys(ppo_events) for k in ("kl", "value_loss", "clip_frac", "approx_kl", "entropy")
    )


def metrics_keys(events) -> set[str]:
    return {k for e in events if e.type == "metrics" and e.data for k in e.data}
