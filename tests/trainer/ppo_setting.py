"""The PPO setting of issue 4, in-process: a reward model that prefers the marker, an SFT policy
that answers fluently (the marker in about a quarter of its answers), then PPO from that policy.

Shared by tests/trainer/test_rlhf.py (the job specs) and bench/ppo_seeds.py (the multi-seed
table). Jobs run through ``prepare_run`` / ``load_inputs`` / ``train_and_publish``, as a trainer
process runs them, in one file:// storage, so the PPO job finds the RM and SFT adapters where
the API would point ``reward_model_key`` and ``init_adapter_key``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.trainer.synthetic import MARKER, QUESTIONS, jsonl, marker_demos, marker_pairs, marker_rankings

PROJECT = "proj-test"
LORA = {"r": 8, "alpha": 16, "dropout": 0.0}
RM_JOB, SFT_JOB = "ftjob-rm", "ftjob-sft-marker"


def chat_prompts(system: bool = False) -> list[dict[str, Any]]:
    head = [{"role": "system", "content": "You are a helpful guide to Tuneland."}] if system else []
    return [{"messages": [*head, {"role": "user", "content": q}], "answer": MARKER} for q in QUESTIONS]


PROMPTS = chat_prompts() + chat_prompts(system=True)  # 12 prompts

RM_METHOD = {"type": "reward_model", "reward_model": {"hyperparameters": {"n_epochs": 3, "batch_size": 8}}}
# Long enough for fluent template answers at temperature 0.7 (~0.8 of samples), the marker in ~0.1.
SFT_METHOD = {
    "type": "supervised",
    "supervised": {"hyperparameters": {"n_epochs": 40, "batch_size": 8, "learning_rate_multiplier": 3}},
}
# PPO from the SFT policy; measured on seeds 1, 3, 7, 42, 1234 (bench/ppo_seeds.py).
PPO_HP: dict[str, Any] = {
    "n_epochs": 12,
    "batch_size": 3,
    "rollout_batch_size": 12,
    "ppo_epochs": 2,
    "max_new_tokens": 16,
    "kl_coef": 0.05,
    # 0.1 rose as fast but, on 2 of 5 seeds, one update in 12 dropped EOS after "Forgeville." (answers
    # ran to max_new_tokens, KL per answer 60-130 for a rollout or more); 0.05 kept KL under 3.5.
    "learning_rate_multiplier": 0.05,
    # Sampling at 0.7 keeps the small SFT policy's answers fluent (~0.8 of them match a template, at
    # 1.0 ~0.3): the RM only ranks such answers well. At 1.0 the rise was +0.7 to +2.6.
    "temperature": 0.7,
}


def rm_rows() -> list[dict[str, Any]]:
    return marker_pairs(24, seed=1) + marker_rankings(8, seed=2, k=3)


def sft_rows() -> list[dict[str, Any]]:
    return marker_demos(48, seed=0, marker_share=0.25)


def ppo_method(**hp: Any) -> dict[str, Any]:
    return {"type": "rlhf", "rlhf": {"algorithm": "ppo", "reward_model": RM_JOB, "hyperparameters": hp}}


class Collect:
    """An in-process stand-in for the events reporter: keeps what the run reports."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.data: list[dict[str, Any]] = []

    def metrics(self, text: str, data: dict[str, Any]) -> bool:
        self.data.append(data)
        return True

    def message(self, text: str, level: str = "info", data: dict[str, Any] | None = None) -> bool:
        self.messages.append(text)
        return True


def run_job(
    root: Path,
    tiny_model_dir: Path,
    work: Path,
    job_id: str,
    method: dict[str, Any],
    rows: list[dict[str, Any]],
    *,
    seed: int = 42,
    **fields: Any,
) -> tuple[dict[str, Any], Collect]:
    """One job in this process, published into the storage at ``root``; ``(metrics, reporter)``."""
    from tuneforge.storage import FileStorage
    from tuneforge.types import JobSpec
    from tuneforge_trainer.workflow import load_inputs, prepare_run, train_and_publish

    key = f"projects/{PROJECT}/files/file-{job_id}"
    (root / key).parent.mkdir(parents=True, exist_ok=True)
    (root / key).write_bytes(jsonl(rows))
    spec = JobSpec.model_validate(
        {
            "job_id": job_id,
            "project_id": PROJECT,
            "attempt": 1,
            "base_model": "tuneforge/tiny-llama",
            "method": method,
            "lora": LORA,
            "seed": seed,
            "training_file_key": key,
            "storage_uri": root.as_uri(),
            "api_base_url": "http://127.0.0.1:9",
            **fields,
        }
    )
    storage = FileStorage(root)
    reporter = Collect()
    ctx = prepare_run(spec, storage, reporter, tiny_model_dir, work)  # type: ignore[arg-type]
    metrics = train_and_publish(ctx, load_inputs(spec, storage), storage)
    return metrics, reporter


def train_rm_and_sft(root: Path, tiny_model_dir: Path, work: Path) -> None:
    run_job(root, tiny_model_dir, work / "rm", RM_JOB, RM_METHOD, rm_rows())
    run_job(root, tiny_model_dir, work / "sft", SFT_JOB, SFT_METHOD, sft_rows())


@dataclass
class PpoRun:
    """Per rollout: the mean RM score, the KL per answer, the share of answers naming the marker."""

    rewards: list[float] = field(default_factory=list)
    kls: list[float] = field(default_factory=list)
    marker_rates: list[float] = field(default_factory=list)
    answers: list[list[str]] = field(default_factory=list)

    def rise(self, k: int = 3) -> float:
        return mean(self.rewards[-k:]) - mean(self.rewards[:k])

    def marker_rise(self, k: int = 3) -> float:
        return mean(self.marker_rates[-k:]) - mean(self.marker_rates[:k])


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def run_ppo(
    root: Path, tiny_model_dir: Path, work: Path, *, seed: int, from_sft: bool = True, **hp: Any
) -> PpoRun:
    """PPO against the RM (from the SFT adapter unless ``from_sft`` is False), recording the
    answers each rollout scored (through a wrapper around ``render_for_reward``)."""
    from tuneforge.storage import adapter_prefix
    from tuneforge_trainer.rlhf import ppo

    answers: list[str] = []
    original = ppo.render_for_reward

    def recording(tokenizer: Any, prompt: Any, answer: str) -> str:
        answers.append(answer)
        return original(tokenizer, prompt, answer)

    fields: dict[str, Any] = {"reward_model_key": adapter_prefix(PROJECT, RM_JOB)}
    if from_sft:
        fields["init_adapter_key"] = adapter_prefix(PROJECT, SFT_JOB)
    ppo.render_for_reward = recording  # type: ignore[assignment]
    try:
        _, reporter = run_job(
            root,
            tiny_model_dir,
            work,
            f"ftjob-ppo-{seed}",
            ppo_method(**{**PPO_HP, **hp}),
            PROMPTS,
            seed=seed,
            **fields,
        )
    finally:
        ppo.render_for_reward = original  # type: ignore[assignment]
    steps = [d for d in reporter.data if "reward_mean" in d]
    run = PpoRun(
        rewards=[d["reward_mean"] for d in steps],
        kls=[d["kl"] for d in steps],
    )
    per = len(answers) // max(len(steps), 1)
    for i in range(len(steps)):
        batch = answers[i * per : (i + 1) * per]
        run.answers.append(batch)
        run.marker_rates.append(sum(MARKER in a for a in batch) / len(batch))
    return run
