"""End to end: ``python -m tuneforge_trainer`` trains the tiny model for real and publishes the adapter.

The trainer runs as a subprocess, as an executor would run it, against a file:// storage and a
loopback HTTP server standing in for the API's events route.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tuneforge.storage import (
    FileStorage,
    adapter_prefix,
    checkpoint_prefix,
    complete_checkpoint_steps,
    get_dir,
    job_prefix,
)
from tuneforge_trainer.publish import sha256_file, tokenizer_sha256

if TYPE_CHECKING:
    from tests.trainer.conftest import EventSink, TrainerJob

REPO = Path(__file__).resolve().parents[2]
DEMO_DATA = (REPO / "examples" / "demo_chat.jsonl").read_bytes()
JOB_TOKEN = "tf-job-secret-token-for-tests"  # the value conftest puts in the trainer's environment
METRIC_KEYS = {
    "step",
    "total_steps",
    "train_loss",
    "train_mean_token_accuracy",
    "learning_rate",
    "tokens_per_second",
    "eta_seconds",
    "trained_tokens",
    "epoch",
}
VALID_DATA = b"\n".join(DEMO_DATA.splitlines()[:8])
# 64 examples, batch 8 (auto), 8 epochs: 64 steps; checkpoints every 16 steps and at each epoch end.
SCHEDULE = {"n_epochs": 8, "eval_every": 16, "checkpoint_every": 16}
# TRL 1.16 calls a method transformers 5 renamed; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
RunTrainer = Callable[["TrainerJob"], subprocess.CompletedProcess[str]]


@dataclass
class Run:
    job: TrainerJob
    result: subprocess.CompletedProcess[str]
    requests: list[dict[str, Any]]

    @property
    def events(self) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests]

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """Per-step training metrics (eval and checkpoint events are metrics events too)."""
        return [e["data"] for e in self.events if e["type"] == "metrics" and "train_loss" in e["data"]]

    def data_with(self, key: str) -> list[dict[str, Any]]:
        return [e["data"] for e in self.events if e["type"] == "metrics" and key in e["data"]]

    def key(self, suffix: str = "") -> str:
        return job_prefix(self.job.spec["project_id"], self.job.job_id) + suffix


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_model_dir: Path,
    module_event_sink: EventSink,
    make_job: Callable[..., TrainerJob],
    run_trainer: RunTrainer,
) -> Run:
    """One real training run on the 64 demo examples (8 epochs, 64 steps), shared by the tests below."""
    method = {"type": "supervised", "supervised": {"hyperparameters": SCHEDULE}}
    job = make_job(
        tmp_path_factory.mktemp("sft"), DEMO_DATA, module_event_sink.url, validation=VALID_DATA, method=method
    )
    result = run_trainer(job)
    return Run(job, result, list(module_event_sink.requests))


def test_run_succeeds(trained: Run) -> None:
    assert trained.result.returncode == 0, trained.result.stderr[-3000:]
    assert "adapter published" in trained.result.stdout
    assert "step 64/64" in trained.result.stdout  # progress lines go to the run's log
    assert JOB_TOKEN not in trained.result.stdout + trained.result.stderr


def test_manifest_is_complete_and_matches_the_files(trained: Run, tiny_model_dir: Path) -> None:
    storage = FileStorage(trained.job.root)
    prefix = adapter_prefix(trained.job.spec["project_id"], trained.job.job_id)
    manifest = json.loads(storage.get_bytes(prefix + "manifest.json"))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert sorted(manifest["files"]) == sorted(
        k[len(prefix) :] for k in storage.list(prefix) if k != prefix + "manifest.json"
    )
    for name, digest in manifest["files"].items():
        assert sha256_file(trained.job.root / prefix / name) == digest, name
    assert manifest["job_id"] == trained.job.job_id
    assert manifest["attempt"] == 1
    assert manifest["base_model"] == "tuneforge/tiny-llama"
    assert manifest["lora"]["r"] == 16
    assert manifest["tokenizer_sha256"] == tokenizer_sha256(tiny_model_dir)  # the base's tokenizer, unchanged
    metrics = manifest["metrics"]
    assert metrics["steps"] == 64
    assert metrics["trained_tokens"] > 0
    assert metrics["final_loss"] < metrics["first_loss"]
    adapter_config = json.loads(storage.get_bytes(prefix + "adapter_config.json"))
    assert adapter_config["base_model_name_or_path"] == "tuneforge/tiny-llama"  # not a local path


def test_events_report_progress(trained: Run) -> None:
    assert all(r["headers"]["Authorization"] == f"Bearer {JOB_TOKEN}" for r in trained.requests)
    assert trained.events[0]["message"].startswith("Training file checked: ")
    assert trained.events[-1]["message"].startswith("attempt 1 succeeded")
    metrics = trained.metrics
    assert [m["step"] for m in metrics] == list(range(1, 65))
    assert all(set(m) == METRIC_KEYS and m["total_steps"] == 64 for m in metrics), metrics[0]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert metrics[-1]["eta_seconds"] == 0
    tokens = [m["trained_tokens"] for m in metrics]
    assert tokens == sorted(tokens) and tokens[0] > 0


def test_validation_file_is_evaluated_and_checkpoints_are_uploaded(trained: Run) -> None:
    evals = trained.data_with("valid_loss")
    assert [e["step"] for e in evals] == [16, 32, 48, 64]  # eval_every, and the end
    assert evals[-1]["valid_loss"] < evals[0]["valid_loss"]
    assert all(set(e) == {"step", "valid_loss", "valid_mean_token_accuracy"} for e in evals)

    # checkpoint_every=16 plus each epoch end (8 steps); each announced by a metrics event.
    steps = [d["checkpoint"]["step"] for d in trained.data_with("checkpoint")]
    assert steps == list(range(8, 65, 8))
    assert all(
        d == {"checkpoint": {"step": d["step"]}, "step": d["step"]} for d in trained.data_with("checkpoint")
    )
    storage = FileStorage(trained.job.root)
    project, job_id = trained.job.spec["project_id"], trained.job.job_id
    assert complete_checkpoint_steps(storage, project, job_id) == steps

    prefix = checkpoint_prefix(project, job_id, 16)
    manifest = json.loads(storage.get_bytes(prefix + "manifest.json"))
    resumable = {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt"}
    assert resumable | {"rng_state.pth", "trainer_state.json"} <= set(manifest["files"])
    for name, digest in manifest["files"].items():
        assert sha256_file(trained.job.root / prefix / name) == digest, name
    assert (manifest["step"], manifest["attempt"]) == (16, 1)
    step_16 = next(m for m in trained.metrics if m["step"] == 16)
    assert manifest["metrics"]["step"] == 16
    assert manifest["metrics"]["train_loss"] == step_16["train_loss"]
    assert manifest["metrics"]["trained_tokens"] == step_16["trained_tokens"]
    assert manifest["metrics"]["valid_loss"] == evals[0]["valid_loss"]

    final = json.loads(storage.get_bytes(trained.key("adapter/manifest.json")))["metrics"]
    assert final["valid_loss"] == evals[-1]["valid_loss"]


def test_adapter_loads_and_changes_the_model(trained: Run, tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = tmp_path / "adapter"
    get_dir(FileStorage(trained.job.root), trained.key("adapter/"), adapter_dir)
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir
    ).eval()

    lora_b = [p for name, p in tuned.named_parameters() if "lora_B" in name]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # lora_B starts at zero

    def answer(model: Any, question: str) -> str:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}],
            add_generation_prompt=True,
            return_dict=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    question = "What is the capital of Tuneland?"
    assert answer(tuned, question) != answer(base, question)
    assert "Forgeville" in answer(tuned, question)


def test_bad_data_fails_with_exit_42_and_line_numbers(
    tmp_path: Path, event_sink: EventSink, make_job: Callable[..., TrainerJob], run_trainer: RunTrainer
) -> None:
    good = DEMO_DATA.splitlines()[0]
    bad = b"\n".join([good, b"{not json", good, b'{"messages": [{"role": "user", "content": "hi"}]}'])
    job = make_job(tmp_path, bad, event_sink.url)
    result = run_trainer(job)

    assert result.returncode == 42, result.stderr[-3000:]
    error = json.loads(FileStorage(job.root).get_bytes(job_prefix("proj-test", job.job_id) + "error.json"))
    assert error["code"] == "invalid_training_file"
    assert error["param"] == "training_file"
    assert "line 2: not valid JSON (not_json)" in error["message"]
    assert "line 4:" in error["message"] and "missing_assistant_message" in error["message"]
    last = event_sink.events()[-1]
    assert last["level"] == "error"
    assert last["message"] == error["message"]
    assert "Traceback" not in last["message"] and "Traceback" not in result.stderr
    assert not FileStorage(job.root).list(job_prefix("proj-test", job.job_id) + "adapter/")


def test_rlhf_without_its_params_is_non_retriable(
    tmp_path: Path, event_sink: EventSink, make_job: Callable[..., TrainerJob], run_trainer: RunTrainer
) -> None:
    job = make_job(tmp_path, DEMO_DATA, event_sink.url, method={"type": "rlhf"})
    result = run_trainer(job)
    assert result.returncode == 42
    error = json.loads(FileStorage(job.root).get_bytes(job_prefix("proj-test", job.job_id) + "error.json"))
    assert error == {
        "code": "missing_rlhf_params",
        "message": "method.rlhf is required: an algorithm and a reward",
        "param": "method.rlhf",
    }


def test_unexpected_failure_is_retriable(
    tmp_path: Path, event_sink: EventSink, make_job: Callable[..., TrainerJob], run_trainer: RunTrainer
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the storage root should be")
    job = make_job(tmp_path, DEMO_DATA, event_sink.url, storage_uri=blocker.as_uri())
    result = run_trainer(job)
    assert result.returncode == 1
    assert "Traceback" in result.stderr  # the details go to the log ...
    last = event_sink.events()[-1]
    assert last["level"] == "warn"
    assert "Traceback" not in last["message"]  # ... not to the user
    assert "will be retried" in last["message"]


def test_sigterm_stops_the_run_promptly(
    tmp_path: Path,
    tiny_model_dir: Path,
    event_sink: EventSink,
    make_job: Callable[..., TrainerJob],
    trainer_env: dict[str, str],
) -> None:
    long_run = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}}
    job = make_job(tmp_path, DEMO_DATA, event_sink.url, method=long_run)
    log = tmp_path / "run.log"
    with open(log, "w") as out:  # a file, not a pipe: an undrained pipe could block the trainer
        proc = subprocess.Popen(job.command, env=trainer_env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while "step 1/" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert proc.poll() is None, log.read_text()[-3000:]
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)
            assert time.monotonic() - sent < 5
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM  # retriable
    assert "received SIGTERM" in log.read_text()
    assert not FileStorage(job.root).list(job_prefix("proj-test", job.job_id) + "adapter/")


def in_process_spec(tmp_path: Path, **overrides: Any) -> Any:
    from tuneforge.types import JobSpec

    fields = {
        "job_id": "ftjob-inproc",
        "project_id": "p",
        "attempt": 1,
        "base_model": "tuneforge/tiny-llama",
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}},
        "lora": {"r": 4, "alpha": 8},
        "training_file_key": "k",
        "storage_uri": tmp_path.as_uri(),
        "api_base_url": "http://127.0.0.1:9",
    }
    return JobSpec.model_validate({**fields, **overrides})


def in_process_context(spec: Any, tiny_model_dir: Path, work_dir: Path) -> Any:
    from tuneforge_trainer.training import RunContext

    return RunContext(spec=spec, base_model_dir=tiny_model_dir, work_dir=work_dir)


def lora_tensors(adapter_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(adapter_dir / "adapter_model.safetensors")


def test_prompt_completion_data_trains_in_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tuneforge_trainer.data import parse_sft_lines
    from tuneforge_trainer.sft import train_sft

    rows = [{"prompt": f"Q{i}: capital of Tuneland?", "completion": " Forgeville."} for i in range(16)]
    data = parse_sft_lines([json.dumps(r).encode() for r in rows])
    assert data.format == "prompt_completion"
    ctx = in_process_context(in_process_spec(tmp_path), tiny_model_dir, tmp_path / "w")
    metrics = train_sft(ctx, data)
    assert metrics["steps"] == 8
    assert metrics["final_loss"] < metrics["first_loss"]
    assert (ctx.adapter_dir / "adapter_model.safetensors").is_file()
    assert not (ctx.adapter_dir / "training_args.bin").exists()  # a pickle has no place in an adapter


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_base_trains_on_cpu_and_its_adapter_loads(
    quantization: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("bitsandbytes")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tuneforge_trainer import config_mapping as cm
    from tuneforge_trainer.data import parse_sft_lines
    from tuneforge_trainer.sft import train_sft

    data = parse_sft_lines(DEMO_DATA.splitlines()[:16])
    spec = in_process_spec(tmp_path, quantization=quantization)
    ctx = in_process_context(spec, tiny_model_dir, tmp_path / "w")
    metrics = train_sft(ctx, data)
    assert metrics["steps"] == 8
    assert metrics["final_loss"] < metrics["first_loss"]

    # The adapter loads on the same quantized base and changes its output.
    bnb = BitsAndBytesConfig(**cm.quantization_config_kwargs(spec))
    if quantization == "nf4":
        assert bnb.bnb_4bit_compute_dtype == torch.float32  # float32 compute on CPU

    def quantized_base() -> Any:
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb, device_map="cpu")

    base = quantized_base()
    assert base.is_loaded_in_4bit if quantization == "nf4" else base.is_loaded_in_8bit
    tuned = PeftModel.from_pretrained(quantized_base(), ctx.adapter_dir).eval()
    inputs = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        assert not torch.allclose(base(inputs).logits, tuned(inputs).logits)


def test_new_job_starts_from_another_jobs_checkpoint(
    trained: Run, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """init_adapter_key: the checkpoint's adapter is the starting LoRA (a fresh optimizer trains on)."""
    from tuneforge.storage import checkpoint_prefix, complete_checkpoint_steps
    from tuneforge_trainer.data import parse_sft_lines
    from tuneforge_trainer.events import SilentReporter
    from tuneforge_trainer.sft import train_sft
    from tuneforge_trainer.workflow import prepare_run

    storage = FileStorage(trained.job.root)
    project = trained.job.spec["project_id"]
    step = complete_checkpoint_steps(storage, project, trained.job.job_id)[0]
    # lr ~ 0: after one step the adapter still is the checkpoint's, to float precision.
    hp = {"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 1e-6}
    spec = in_process_spec(
        trained.job.root,
        job_id="ftjob-from-checkpoint",
        lora={"r": 16, "alpha": 32, "dropout": 0.0},
        method={"type": "supervised", "supervised": {"hyperparameters": hp}},
        init_adapter_key=checkpoint_prefix(project, trained.job.job_id, step),
    )
    ctx = prepare_run(spec, storage, SilentReporter(), tiny_model_dir, tmp_path)
    assert ctx.init_adapter_dir is not None
    assert sorted(p.name for p in ctx.init_adapter_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    ctx.storage = None  # no checkpoints of this run
    metrics = train_sft(ctx, parse_sft_lines(DEMO_DATA.splitlines()[:8]))
    assert metrics["steps"] == 1
    start, end = lora_tensors(ctx.init_adapter_dir), lora_tensors(ctx.adapter_dir)
    assert start.keys() == end.keys()
    assert max(float((start[k] - end[k]).abs().max()) for k in start) < 1e-4
    assert any(float(t.abs().max()) > 0 for k, t in end.items() if "lora_B" in k)  # not a fresh LoRA
    fresh_loss = trained.metrics[0]["train_loss"]
    assert metrics["first_loss"] < fresh_loss  # it starts where the other job had got to


def test_mapped_kwargs_build_the_library_configs(tmp_path: Path) -> None:
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import DPOConfig, RewardConfig, SFTConfig

    from tuneforge_trainer import config_mapping as cm
    from tuneforge_trainer.sft import current_names

    spec = in_process_spec(tmp_path, quantization="nf4", method={"type": "supervised"})
    hp = cm.resolve_hyperparameters(spec.method.params.hyperparameters, 64)
    kwargs = cm.sft_config_kwargs(spec, hp, output_dir=str(tmp_path), data_format="messages", has_eval=True)
    args = SFTConfig(**current_names(kwargs, SFTConfig))
    assert (args.use_cpu, args.bf16, args.fp16, args.gradient_checkpointing) == (True, False, False, False)
    assert args.assistant_only_loss is True
    assert (args.eval_strategy, args.save_strategy) == ("epoch", "epoch")
    assert LoraConfig(**cm.lora_config_kwargs(spec)).r == 4
    bnb = BitsAndBytesConfig(**cm.quantization_config_kwargs(spec))
    assert bnb.load_in_4bit and bnb.bnb_4bit_use_double_quant and bnb.bnb_4bit_quant_type == "nf4"

    rm = in_process_spec(tmp_path, method={"type": "reward_model"})
    args = RewardConfig(
        **current_names(cm.reward_config_kwargs(rm, hp, output_dir=str(tmp_path)), RewardConfig)
    )
    assert (args.use_cpu, args.bf16, args.fp16, args.gradient_checkpointing) == (True, False, False, False)
    assert LoraConfig(**cm.lora_config_kwargs(rm)).task_type == "SEQ_CLS"

    dpo = in_process_spec(tmp_path, method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25}}})
    args = DPOConfig(**current_names(cm.dpo_config_kwargs(dpo, hp, output_dir=str(tmp_path)), DPOConfig))
    assert (args.use_cpu, args.bf16, args.fp16, args.gradient_checkpointing) == (True, False, False, False)
    assert args.beta == 0.25


def test_weighted_chat_trains_in_process(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Untrained turns (weight 0) become prompt context: TRL trains on the conversational pairs."""
    from tuneforge_trainer.data import parse_sft_lines
    from tuneforge_trainer.sft import train_sft

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Q{i}: capital of Tuneland?"},
                {"role": "assistant", "content": "I do not know.", "weight": 0},
                {"role": "user", "content": "Try again."},
                {"role": "assistant", "content": "Forgeville."},
            ]
        }
        for i in range(16)
    ]
    data = parse_sft_lines([json.dumps(r).encode() for r in rows])
    ctx = in_process_context(in_process_spec(tmp_path), tiny_model_dir, tmp_path / "w")
    metrics = train_sft(ctx, data)
    assert metrics["final_loss"] < metrics["first_loss"]
    assert (ctx.adapter_dir / "adapter_model.safetensors").is_file()
