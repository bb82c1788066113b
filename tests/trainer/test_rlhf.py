"""rlhf end to end: ``python -m tuneforge_trainer`` with PPO (ours), GRPO and RLOO on the tiny model.

A reward model is trained first on the synthetic "the better answer names Forgeville" pairs
(shared by the module), and an SFT policy on fluent answers of which a quarter name Forgeville
(tests/trainer/ppo_setting.py). PPO then starts from the SFT adapter (``init_adapter_key``, as a
``model: "ft:..."`` job) and optimises it against the RM: the mean RM score of the last rollouts
must exceed that of the first by a stated margin, more answers must name the marker, and the KL
to the reference (the frozen SFT adapter) stays bounded. GRPO learns a built-in rule reward;
RLOO uses the reward model as its reward function.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.trainer.ppo_setting import (
    LORA,
    PPO_HP,
    PROMPTS,
    RM_JOB,
    RM_METHOD,
    SFT_JOB,
    SFT_METHOD,
    Collect,
    rm_rows,
    sft_rows,
)
from tests.trainer.synthetic import MARKER, jsonl
from tuneforge.storage import FileStorage, adapter_prefix, get_dir, job_prefix

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

    def error(self) -> dict[str, Any]:
        key = job_prefix(self.job.spec["project_id"], self.job.job_id) + "error.json"
        return json.loads(FileStorage(self.job.root).get_bytes(key))


def rlhf_method(algorithm: str, **hp: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"algorithm": algorithm, "hyperparameters": hp}
    if "reward_function" in hp:
        params["reward_function"] = hp.pop("reward_function")
    else:
        params["reward_model"] = RM_JOB
    return {"type": "rlhf", "rlhf": params}


def share_adapter(job: TrainerJob, other: TrainerJob, field: str = "reward_model_key") -> None:
    """Copy ``other``'s published adapter into this job's storage and point ``field`` at it, as the
    API would (``reward_model_key`` for the RM, ``init_adapter_key`` for an ``ft:`` model)."""
    import shutil

    prefix = adapter_prefix(other.spec["project_id"], other.job_id)
    shutil.copytree(other.root / prefix, job.root / prefix, dirs_exist_ok=True)
    job.spec[field] = prefix
    job.spec_path.write_text(json.dumps(job.spec))


def share_rm(job: TrainerJob, rm: TrainerJob) -> None:
    share_adapter(job, rm, "reward_model_key")


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    module_event_sink: EventSink,
    make_job: Callable[..., TrainerJob],
    start_trainer: Callable[..., TrainerProcess],
) -> dict[str, Run]:
    """RM and the SFT policy alongside GRPO (rule reward), then PPO from the SFT adapter alongside
    RLOO (both against the RM)."""
    folder = tmp_path_factory.mktemp("rlhf")
    url = module_event_sink.url
    rm = make_job(folder / "rm", jsonl(rm_rows()), url, job_id=RM_JOB, method=RM_METHOD, lora=LORA)
    sft = make_job(folder / "sft", jsonl(sft_rows()), url, job_id=SFT_JOB, method=SFT_METHOD, lora=LORA)
    grpo = make_job(
        folder / "grpo",
        jsonl(PROMPTS),
        url,
        job_id="ftjob-grpo",
        method=rlhf_method(
            "grpo",
            reward_function={"type": "length", "target_length": 4},
            n_epochs=4,
            batch_size=8,
            num_generations=4,
            max_new_tokens=12,
            ppo_epochs=1,
        ),
        lora=LORA,
    )
    first = {
        name: start_trainer(job, folder / f"{name}.log")
        for name, job in {"rm": rm, "sft": sft, "grpo": grpo}.items()
    }
    codes = {name: p.wait() for name, p in first.items()}
    assert codes["rm"] == 0, first["rm"].log[-3000:]
    assert codes["sft"] == 0, first["sft"].log[-3000:]
    ppo = make_job(
        folder / "ppo",
        jsonl(PROMPTS),
        url,
        job_id="ftjob-ppo",
        method=rlhf_method("ppo", **PPO_HP, checkpoint_every=4),
        lora=LORA,
    )
    share_adapter(ppo, sft, "init_adapter_key")
    rloo = make_job(
        folder / "rloo",
        jsonl(PROMPTS[:6]),
        url,
        job_id="ftjob-rloo",
        method=rlhf_method(
            "rloo", n_epochs=1, batch_size=4, num_generations=2, max_new_tokens=8, ppo_epochs=1
        ),
        lora=LORA,
    )
    for job in (ppo, rloo):
        share_rm(job, rm)
    second = {"ppo": start_trainer(ppo, folder / "ppo.log"), "rloo": start_trainer(rloo, folder / "rloo.log")}
    codes.update({name: p.wait() for name, p in second.items()})
    return {
        name: Run(p.job, codes[name], p.log, module_event_sink.events(p.job.job_id))
        for name, p in {**first, **second}.items()
    }


def test_ppo_raises_the_reward_model_score(runs: dict[str, Run]) -> None:
    run = runs["ppo"]
    assert run.returncode == 0, run.log[-4000:]
    steps = run.metrics_with("reward_mean")
    assert [s["step"] for s in steps] == list(range(1, 13))
    keys = {
        "reward_mean",
        "kl",
        "entropy",
        "clip_frac",
        "value_loss",
        "policy_loss",
        "approx_kl",
        "response_length",
        "step",
        "total_steps",
    }
    assert keys <= set(steps[0])
    rewards = [s["reward_mean"] for s in steps]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    print(f"PPO reward: first 3 {first:.3f}, last 3 {last:.3f}; kl {[round(s['kl'], 1) for s in steps]}")
    # Stated size: the last 3 rollouts score at least 2 RM units above the first 3. From the SFT
    # policy the rise was +3.3 to +6.8 on 13 seeds (bench/ppo_seeds.py; +5.1 to +5.9 on 1, 3, 7,
    # 42, 1234), so 2 is a margin, not this seed's luck; from a fresh LoRA it was -0.5 to +0.7.
    assert last - first >= 2.0, rewards
    # KL per answer to the frozen SFT adapter: 0 at the start, at most 4.4 on those 13 seeds.
    assert abs(steps[0]["kl"]) < 1e-3
    assert all(abs(s["kl"]) < 20 for s in steps), [s["kl"] for s in steps]
    manifest = run.manifest()
    assert manifest["method"] == "rlhf" and manifest["metrics"]["algorithm"] == "ppo"
    assert manifest["metrics"]["steps"] == 12


def test_ppo_adapter_loads_onto_the_base(runs: dict[str, Run], tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = runs["ppo"]
    adapter_dir = tmp_path / "adapter"
    get_dir(FileStorage(run.job.root), adapter_prefix("proj-test", run.job.job_id), adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == "tuneforge/tiny-llama"
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir)
    ids = tokenizer.apply_chat_template(
        [PROMPTS[0]["messages"][0]], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        tuned = model(**ids).logits
        with model.disable_adapter():
            plain = model(**ids).logits
    assert not torch.allclose(tuned, plain)


def marker_rate(model_dir: Path, adapter_dir: Path, *, samples: int = 8, seed: int = 0) -> float:
    """Share of sampled answers (PPO's temperature, ``samples`` per prompt) that name the marker."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).eval()
    torch.manual_seed(seed)
    hits = total = 0
    for record in PROMPTS:
        ids = tokenizer.apply_chat_template(
            record["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(
                **ids,
                do_sample=True,
                temperature=PPO_HP["temperature"],
                top_k=0,
                top_p=1.0,
                max_new_tokens=PPO_HP["max_new_tokens"],
                num_return_sequences=samples,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        answers = tokenizer.batch_decode(out[:, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += sum(MARKER in a for a in answers)
        total += len(answers)
    return hits / total


def test_ppo_names_the_marker_more_often_than_the_sft_policy(
    runs: dict[str, Run], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """What the RM rewards is the marker: PPO must raise its rate over the SFT policy it started from."""
    rates = {}
    for name in ("sft", "ppo"):
        job = runs[name].job
        get_dir(FileStorage(job.root), adapter_prefix("proj-test", job.job_id), tmp_path / name)
        rates[name] = marker_rate(tiny_model_dir, tmp_path / name)
    print(f"marker rate: SFT {rates['sft']:.2f}, after PPO {rates['ppo']:.2f}")
    # In the rollouts of 13 seeds: 0.11-0.39 over the first 3, 0.61-0.94 over the last 3.
    assert rates["ppo"] - rates["sft"] >= 0.2, rates


def test_ppo_uploads_resumable_checkpoints(runs: dict[str, Run]) -> None:
    from tuneforge.storage import complete_checkpoint_steps

    run = runs["ppo"]
    steps = complete_checkpoint_steps(FileStorage(run.job.root), "proj-test", run.job.job_id)
    assert steps == [4, 8]  # every 4 rollouts; the last one is the published adapter


def test_grpo_learns_a_rule_reward(runs: dict[str, Run]) -> None:
    run = runs["grpo"]
    assert run.returncode == 0, run.log[-4000:]
    rewards = [s["reward_mean"] for s in run.metrics_with("reward_mean")]
    assert len(rewards) >= 6
    k = len(rewards) // 3
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    print(f"GRPO length reward: first {first:.3f}, last {last:.3f}")
    assert last > first
    assert run.manifest()["metrics"]["algorithm"] == "grpo"


def test_rloo_with_the_reward_model_runs_and_publishes(runs: dict[str, Run]) -> None:
    run = runs["rloo"]
    assert run.returncode == 0, run.log[-4000:]
    assert run.metrics_with("reward_mean")
    manifest = run.manifest()
    assert manifest["metrics"]["algorithm"] == "rloo"
    assert "adapter_model.safetensors" in manifest["files"]


def _ppo_job(
    tmp_path: Path, url: str, make_job: Callable[..., TrainerJob], data: bytes | None = None
) -> TrainerJob:
    return make_job(
        tmp_path, data or jsonl(PROMPTS), url, job_id="ftjob-bad", method=rlhf_method("ppo"), lora=LORA
    )


def test_missing_reward_model_is_non_retriable(
    tmp_path: Path, event_sink: EventSink, make_job: Callable[..., TrainerJob], run_trainer: RunTrainer
) -> None:
    job = _ppo_job(tmp_path, event_sink.url, make_job)
    job.spec["reward_model_key"] = adapter_prefix("proj-test", "ftjob-gone")
    job.spec_path.write_text(json.dumps(job.spec))
    result = run_trainer(job)
    assert result.returncode == 42, result.stderr[-3000:]
    error = Run(job, 42, "", []).error()
    assert error["code"] == "reward_model_not_found" and error["param"] == "method.rlhf.reward_model"
    assert "Traceback" not in result.stderr


def test_reward_model_on_another_base_is_non_retriable(
    runs: dict[str, Run],
    tmp_path: Path,
    event_sink: EventSink,
    make_job: Callable[..., TrainerJob],
    run_trainer: RunTrainer,
) -> None:
    job = _ppo_job(tmp_path, event_sink.url, make_job)
    share_rm(job, runs["rm"].job)
    key = job.root / job.spec["reward_model_key"] / "manifest.json"
    manifest = json.loads(key.read_text())
    manifest["base_model"] = "acme/other-base"
    key.write_text(json.dumps(manifest))
    result = run_trainer(job)
    assert result.returncode == 42, result.stderr[-3000:]
    error = Run(job, 42, "", []).error()
    assert error["code"] == "reward_model_base_mismatch"
    assert "'acme/other-base'" in error["message"] and "'tuneforge/tiny-llama'" in error["message"]


def test_prompt_with_an_assistant_answer_is_non_retriable(
    tmp_path: Path, event_sink: EventSink, make_job: Callable[..., TrainerJob], run_trainer: RunTrainer
) -> None:
    answered = {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}
    job = _ppo_job(tmp_path, event_sink.url, make_job, jsonl([*PROMPTS[:2], answered]))
    result = run_trainer(job)
    assert result.returncode == 42
    error = Run(job, 42, "", []).error()
    assert error["code"] == "invalid_training_file"
    assert "line 3: the last message is the assistant's" in error["message"]


def in_process_ppo(
    root: Path, rm: TrainerJob, tiny_model_dir: Path, work: Path, *, seed: int = 42, **fields: Any
) -> tuple[dict[str, Any], Collect, Any]:
    """PPO through ``prepare_run`` and ``train_rlhf``, as a trainer process runs them; storage under
    ``root`` with the RM job's adapter copied in. ``(metrics, reporter, ctx)``."""
    import shutil

    from tuneforge.types import JobSpec
    from tuneforge_trainer.rlhf.prompts import load_prompt_file
    from tuneforge_trainer.rlhf.train import train_rlhf
    from tuneforge_trainer.workflow import prepare_run

    rm_prefix = adapter_prefix(rm.spec["project_id"], rm.job_id)
    shutil.copytree(rm.root / rm_prefix, root / rm_prefix, dirs_exist_ok=True)
    (root / "prompts.jsonl").write_bytes(jsonl(PROMPTS[:6]))
    hp = {"n_epochs": 4, "batch_size": 3, "rollout_batch_size": 6, "max_new_tokens": 8, "checkpoint_every": 2}
    spec = JobSpec.model_validate(
        {
            "job_id": "ftjob-ppo-inproc",
            "project_id": "proj-test",
            "attempt": 1,
            "base_model": "tuneforge/tiny-llama",
            "method": rlhf_method("ppo", **{**hp, **fields.pop("hp", {})}),
            "lora": LORA,
            "seed": seed,
            "training_file_key": "prompts.jsonl",
            "storage_uri": root.as_uri(),
            "api_base_url": "http://127.0.0.1:9",
            "reward_model_key": rm_prefix,
            **fields,
        }
    )
    storage = FileStorage(root)
    reporter = Collect()
    ctx = prepare_run(spec, storage, reporter, tiny_model_dir, work)  # type: ignore[arg-type]
    metrics = train_rlhf(ctx, load_prompt_file(storage, spec.training_file_key))
    return metrics, reporter, ctx


def test_ppo_resumes_from_its_checkpoint_to_the_same_adapter(
    runs: dict[str, Run], tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A retried attempt continues from step 2 with the optimizer, KL coefficient and score
    moments it had, and ends with the adapter an uninterrupted run publishes (bit for bit)."""
    from tuneforge.storage import checkpoint_prefix, complete_checkpoint_steps

    hp = {"kl_target": 1.0, "kl_horizon": 20}  # an adaptive KL coefficient that moves each rollout
    root = tmp_path / "storage"
    whole, first, ctx = in_process_ppo(root, runs["rm"].job, tiny_model_dir, tmp_path / "a1", hp=hp)
    assert complete_checkpoint_steps(FileStorage(root), "proj-test", "ftjob-ppo-inproc") == [2]
    coefs = [d["kl_coef"] for d in first.data if "kl_coef" in d]
    assert len(set(coefs)) == 4  # adapted after every rollout
    uninterrupted = (ctx.adapter_dir / "adapter_model.safetensors").read_bytes()

    resumed, second, ctx2 = in_process_ppo(
        root,
        runs["rm"].job,
        tiny_model_dir,
        tmp_path / "a2",
        hp=hp,
        attempt=2,
        resume_from_key=checkpoint_prefix("proj-test", "ftjob-ppo-inproc", 2),
    )
    assert second.messages == ["resumed from step 2 (attempt 2)"]
    steps = [d for d in second.data if "reward_mean" in d]
    assert [d["step"] for d in steps] == [3, 4]
    assert [d["kl_coef"] for d in steps] == coefs[2:]  # the controller's state came back too
    assert [d["reward_mean"] for d in steps] == [d["reward_mean"] for d in first.data if "reward_mean" in d][
        2:
    ]
    assert (ctx2.adapter_dir / "adapter_model.safetensors").read_bytes() == uninterrupted
    assert resumed["final_loss"] == whole["final_loss"]


def test_ppo_starts_from_an_sft_adapter(runs: dict[str, Run], tiny_model_dir: Path, tmp_path: Path) -> None:
    """model "ft:..." of an SFT job: the policy starts as that adapter (the reference is a frozen copy)."""
    from safetensors.torch import load_file

    from tuneforge.types import JobSpec
    from tuneforge_trainer.data import parse_sft_lines
    from tuneforge_trainer.sft import train_sft
    from tuneforge_trainer.training import RunContext

    sft_spec = JobSpec.model_validate(
        {
            "job_id": "ftjob-sft",
            "project_id": "proj-test",
            "attempt": 1,
            "base_model": "tuneforge/tiny-llama",
            "method": {
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 8}},
            },
            "lora": LORA,
            "training_file_key": "k",
            "storage_uri": tmp_path.as_uri(),
            "api_base_url": "http://127.0.0.1:9",
        }
    )
    demo = (Path(__file__).resolve().parents[2] / "examples" / "demo_chat.jsonl").read_bytes()
    sft_ctx = RunContext(spec=sft_spec, base_model_dir=tiny_model_dir, work_dir=tmp_path / "sft")
    train_sft(sft_ctx, parse_sft_lines(demo.splitlines()))

    # Publish the SFT adapter where the API points init_adapter_key for an ft: model.
    root = tmp_path / "storage"
    from tuneforge_trainer.publish import publish_adapter

    publish_adapter(FileStorage(root), sft_spec, sft_ctx.adapter_dir, {})
    hp = {"n_epochs": 1, "learning_rate_multiplier": 1e-6}  # one rollout, (almost) no update
    _, started, ctx = in_process_ppo(
        root,
        runs["rm"].job,
        tiny_model_dir,
        tmp_path / "ppo",
        hp=hp,
        init_adapter_key=adapter_prefix("proj-test", "ftjob-sft"),
    )
    assert ctx.init_adapter_dir is not None
    rollout = next(d for d in started.data if "reward_mean" in d)
    assert abs(rollout["kl"]) < 1e-4  # the reference is the SFT adapter's frozen copy: no KL at the start
    start, end = (
        load_file(sft_ctx.adapter_dir / "adapter_model.safetensors"),
        load_file(ctx.adapter_dir / "adapter_model.safetensors"),
    )
    assert start.keys() == end.keys()
    assert max(float((start[k] - end[k]).abs().max()) for k in start) < 1e-4  # the policy is the SFT one
    assert any(float(t.abs().max()) > 0.01 for k, t in end.items() if "lora_B" in k)  # not a fresh LoRA
