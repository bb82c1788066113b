"""reward_model and dpo end to end: ``python -m tuneforge_trainer`` on synthetic preference data.

The data has a learnable rule (the better answer names the capital), so the reward model must
rank held-out pairs right (the issue's bar: pairwise accuracy >= 0.9) and DPO's reward margin
must grow. Each run is one subprocess, shared by the tests that read it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.trainer.synthetic import jsonl, marker_pairs, marker_rankings
from tuneforge.storage import FileStorage, adapter_prefix, complete_checkpoint_steps, get_dir, job_prefix

if TYPE_CHECKING:
    from tests.trainer.conftest import EventSink, TrainerJob, TrainerProcess

RunTrainer = Callable[["TrainerJob"], subprocess.CompletedProcess[str]]
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@dataclass
class Run:
    job: TrainerJob
    returncode: int
    log: str
    events: list[dict[str, Any]]

    def metrics_with(self, key: str) -> list[dict[str, Any]]:
        return [e["data"] for e in self.events if e["type"] == "metrics" and key in e["data"]]

    def manifest(self) -> dict[str, Any]:
        prefix = adapter_prefix(self.job.spec["project_id"], self.job.job_id)
        return json.loads(FileStorage(self.job.root).get_bytes(prefix + "manifest.json"))


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    module_event_sink: EventSink,
    make_job: Callable[..., TrainerJob],
    start_trainer: Callable[..., TrainerProcess],
) -> dict[str, Run]:
    """A reward model and a DPO run, side by side (one thread each on two cores)."""
    folder = tmp_path_factory.mktemp("preference")
    url, lora = module_event_sink.url, {"r": 8, "alpha": 16, "dropout": 0.0}
    # 24 pairs plus 8 rankings of 3 answers (24 more pairs), 3 epochs; 24 held-out pairs.
    rm_hp = {"n_epochs": 3, "batch_size": 8}
    rm = make_job(
        folder / "rm",
        jsonl(marker_pairs(24, seed=1) + marker_rankings(8, seed=2, k=3)),
        url,
        validation=jsonl(marker_pairs(24, seed=3)),
        job_id="ftjob-rm",
        method={"type": "reward_model", "reward_model": {"hyperparameters": rm_hp}},
        lora=lora,
    )
    dpo_hp = {"n_epochs": 3, "batch_size": 8, "beta": 0.2, "eval_every": 4}
    dpo = make_job(
        folder / "dpo",
        jsonl(marker_pairs(32, seed=4)),
        url,
        validation=jsonl(marker_pairs(16, seed=5)),
        job_id="ftjob-dpo",
        method={"type": "dpo", "dpo": {"hyperparameters": dpo_hp}},
        lora=lora,
    )
    started = {name: start_trainer(job, folder / f"{name}.log") for name, job in (("rm", rm), ("dpo", dpo))}
    codes = {name: process.wait() for name, process in started.items()}
    return {
        name: Run(p.job, codes[name], p.log, module_event_sink.events(p.job.job_id))
        for name, p in started.items()
    }


@pytest.fixture(scope="module")
def reward_run(runs: dict[str, Run]) -> Run:
    return runs["rm"]


@pytest.fixture(scope="module")
def dpo_run(runs: dict[str, Run]) -> Run:
    return runs["dpo"]


def test_reward_model_learns_the_preference(reward_run: Run) -> None:
    assert reward_run.returncode == 0, reward_run.log[-3000:]
    assert reward_run.events[0]["message"] == "Training file checked: 32 examples (48 pairs)"
    evals = reward_run.metrics_with("valid_loss")
    assert [e["step"] for e in evals] == [6, 12, 18]  # each epoch end (no eval_every)
    assert all(set(e) == {"step", "valid_loss", "valid_accuracy", "valid_reward_margin"} for e in evals)
    assert evals[-1]["valid_accuracy"] >= 0.9  # the bar, on held-out pairs
    assert evals[-1]["valid_loss"] < evals[0]["valid_loss"] or evals[0]["valid_accuracy"] == 1.0
    steps = reward_run.metrics_with("train_loss")
    assert {"train_accuracy", "train_reward_margin"} <= set(steps[-1])
    metrics = reward_run.manifest()["metrics"]
    assert metrics["valid_accuracy"] == evals[-1]["valid_accuracy"]
    assert metrics["steps"] == 18
    project, job_id = reward_run.job.spec["project_id"], reward_run.job.job_id
    assert complete_checkpoint_steps(FileStorage(reward_run.job.root), project, job_id) == [6, 12, 18]


def test_reward_adapter_loads_as_a_scoring_model(
    reward_run: Run, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    adapter_dir = tmp_path / "adapter"
    storage = FileStorage(reward_run.job.root)
    get_dir(storage, adapter_prefix(reward_run.job.spec["project_id"], reward_run.job.job_id), adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    assert "score" in (config.get("modules_to_save") or [])  # the reward head travels with the adapter

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    base.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(base, adapter_dir).eval()

    def reward(answer: str) -> float:
        chat = [{"role": "user", "content": "Which city is the capital of Tuneland?"}]
        chat.append({"role": "assistant", "content": answer})
        ids = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            return float(model(**ids).logits[0, 0])

    assert reward("The government sits in Forgeville.") > reward("The government sits in Tunish.")


def test_dpo_reward_margin_grows(dpo_run: Run) -> None:
    assert dpo_run.returncode == 0, dpo_run.log[-3000:]
    assert "beta=0.2" in dpo_run.log
    evals = dpo_run.metrics_with("valid_reward_margin")
    assert [e["step"] for e in evals] == [4, 8, 12]
    assert evals[-1]["valid_reward_margin"] > evals[0]["valid_reward_margin"] > 0
    assert {"valid_loss", "valid_accuracy"} <= set(evals[-1])
    margins = [m["train_reward_margin"] for m in dpo_run.metrics_with("train_loss")]
    assert len(margins) == 12
    assert margins[-1] > margins[0]
    metrics = dpo_run.manifest()["metrics"]
    assert metrics["train_reward_margin"] == margins[-1]
    assert metrics["valid_reward_margin"] == evals[-1]["valid_reward_margin"]
    assert dpo_run.manifest()["method"] == "dpo"


def test_dpo_adapter_changes_the_policy(dpo_run: Run, tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    adapter_dir = tmp_path / "adapter"
    get_dir(FileStorage(dpo_run.job.root), adapter_prefix("proj-test", dpo_run.job.job_id), adapter_dir)
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    assert any(float(t.abs().max()) > 0 for k, t in weights.items() if "lora_B" in k)
    assert not (adapter_dir / "ref").exists()


def test_bad_preference_file_fails_with_exit_42_and_line_numbers(
    tmp_path: Path, event_sink: EventSink, make_job: Callable[..., TrainerJob], run_trainer: RunTrainer
) -> None:
    good = marker_pairs(1, seed=0)[0]
    rows = [
        good,
        {"prompt": "Q", "rejected": "x"},  # line 2: no chosen
        {"prompt": "Q", "responses": ["alone"], "ranking": [0]},  # line 3: K=1
        {"prompt": "Q", "responses": ["a", "b"], "ranking": [1, 1]},  # line 4
        {"prompt": "Q", "chosen": [{"role": "assistant", "content": " "}], "rejected": "y"},  # line 5
    ]
    job = make_job(tmp_path, jsonl(rows), event_sink.url, method={"type": "reward_model"})
    result = run_trainer(job)
    assert result.returncode == 42, result.stderr[-3000:]
    error = json.loads(FileStorage(job.root).get_bytes(job_prefix("proj-test", job.job_id) + "error.json"))
    assert error["code"] == "invalid_training_file"
    assert error["message"].startswith("training file has 4 problems: line 2: needs 'chosen' (missing_field)")
    for line, code in [(3, "too_few_responses"), (4, "invalid_ranking"), (5, "empty_content")]:
        assert f"line {line}: " in error["message"] and f"({code})" in error["message"]
    assert "Traceback" not in result.stderr
    assert event_sink.events()[-1]["message"] == error["message"]


def test_bad_validation_file_names_it(
    tmp_path: Path, event_sink: EventSink, make_job: Callable[..., TrainerJob], run_trainer: RunTrainer
) -> None:
    job = make_job(
        tmp_path,
        jsonl(marker_pairs(4, seed=0)),
        event_sink.url,
        validation=b'{"prompt": "Q", "rejected": "x"}\n',
        method={"type": "dpo"},
    )
    result = run_trainer(job)
    assert result.returncode == 42
    error = json.loads(FileStorage(job.root).get_bytes(job_prefix("proj-test", job.job_id) + "error.json"))
    assert error["code"] == "invalid_validation_file"
    assert error["param"] == "validation_file"
    assert "line 1: needs 'chosen' (missing_field)" in error["message"]
