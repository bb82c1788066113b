"""DeepSpeed: the generated config (pure), its validation by DeepSpeed's own config class, and a
2-process ZeRO-2 SFT run through torchrun with gloo on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tuneforge.storage import FileStorage, adapter_prefix, complete_checkpoint_steps
from tuneforge.types import JobSpec
from tuneforge_trainer import config_mapping as cm
from tuneforge_trainer.deepspeed_mapping import deepspeed_config, resolve_auto, validate_deepspeed_config
from tuneforge_trainer.launch import job_exit_code

if TYPE_CHECKING:
    from tests.trainer.conftest import EventSink, TrainerJob

REPO = Path(__file__).resolve().parents[2]
HAVE_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAVE_DEEPSPEED, reason="deepspeed is not installed (pip extra 'deepspeed')"
)


def make_spec(**overrides: Any) -> JobSpec:
    fields: dict[str, Any] = {
        "job_id": "j",
        "project_id": "p",
        "attempt": 1,
        "base_model": "tuneforge/tiny-llama",
        "method": {"type": "supervised"},
        "lora": {},
        "resources": {"gpus": 8},
        "training_file_key": "k",
        "storage_uri": "file:///tmp/s",
        "api_base_url": "http://127.0.0.1:9",
    }
    return JobSpec.model_validate({**fields, **overrides})


def test_zero2_is_the_default_and_precision_is_left_to_the_trainer() -> None:
    config = deepspeed_config(make_spec())
    assert config["zero_optimization"]["stage"] == 2
    assert config["bf16"] == {"enabled": "auto"} and config["fp16"] == {"enabled": "auto"}
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        assert config[key] == "auto"
    assert "optimizer" not in config  # the Trainer's AdamW: no DeepSpeed CPU-Adam build
    assert config["zero_optimization"]["overlap_comm"] is True
    assert deepspeed_config(make_spec(resources={"gpus": 0}))["zero_optimization"]["overlap_comm"] is False


def test_zero3_shards_weights_and_gathers_them_to_save() -> None:
    zero = deepspeed_config(make_spec(), zero_stage=3)["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert "allgather_partitions" not in zero
    with pytest.raises(ValueError):
        deepspeed_config(make_spec(), zero_stage=1)


def test_qlora_under_zero3_stores_4bit_weights_in_the_compute_dtype() -> None:
    spec = make_spec(quantization="nf4")
    assert "bnb_4bit_quant_storage" not in cm.quantization_config_kwargs(spec, zero_stage=2)
    assert cm.quantization_config_kwargs(spec, zero_stage=3)["bnb_4bit_quant_storage"] == "bfloat16"
    cpu = make_spec(quantization="nf4", resources={"gpus": 0})
    assert cm.quantization_config_kwargs(cpu, zero_stage=3)["bnb_4bit_quant_storage"] == "float32"


def test_peft_under_zero3_uses_reentrant_checkpointing() -> None:
    spec, hp = make_spec(), cm.resolve_hyperparameters(make_spec().method.params.hyperparameters, 64)
    zero3 = cm.training_args_kwargs(spec, hp, output_dir="o", deepspeed=deepspeed_config(spec, zero_stage=3))
    assert zero3["gradient_checkpointing"] is True
    assert zero3["gradient_checkpointing_kwargs"] == {"use_reentrant": True}
    zero2 = cm.training_args_kwargs(spec, hp, output_dir="o", deepspeed=deepspeed_config(spec))
    assert "gradient_checkpointing_kwargs" not in zero2
    cpu = make_spec(resources={"gpus": 0})
    distributed = cm.training_args_kwargs(
        cpu, hp, output_dir="o", deepspeed=deepspeed_config(cpu), distributed=True
    )
    assert distributed["ddp_backend"] == "gloo"
    assert "device_map" not in distributed["model_init_kwargs"]  # accelerate places the model


def test_auto_values_resolve_like_the_hf_trainer() -> None:
    resolved = resolve_auto(
        deepspeed_config(make_spec()),
        micro_batch_size=4,
        gradient_accumulation_steps=2,
        world_size=8,
        bf16=True,
    )
    assert resolved["train_batch_size"] == 64
    assert resolved["bf16"] == {"enabled": True} and resolved["fp16"] == {"enabled": False}
    assert resolved["zero_optimization"]["reduce_bucket_size"] == 4096 * 4096
    assert deepspeed_config(make_spec())["train_batch_size"] == "auto"  # the original is untouched


def test_worker_exit_codes_decide_the_jobs() -> None:
    assert job_exit_code(0, [0, 0]) == 0
    assert job_exit_code(1, [42, 1]) == 42  # torchrun says 1; a worker said "bad config"
    assert job_exit_code(1, [1]) == 1
    assert job_exit_code(-9, []) == 1  # killed: retriable


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_generated_configs_pass_deepspeeds_own_validation(stage: int) -> None:
    validate_deepspeed_config(deepspeed_config(make_spec(), zero_stage=stage), micro_batch_size=4, bf16=True)


@needs_deepspeed
@pytest.mark.parametrize(
    ("change", "expect"),
    [
        (lambda c: c["zero_optimization"].update(stage=7), "invalid DeepSpeed config"),
        (lambda c: c["zero_optimization"].update(overlap_com=True), "invalid DeepSpeed config"),
        (lambda c: c.update(train_batch_size=3), "invalid DeepSpeed config"),
        (lambda c: c.update(zero_optimisation={}), "unknown DeepSpeed config keys"),
    ],
)
def test_deepspeed_validation_rejects_bad_configs(
    change: Callable[[dict[str, Any]], None], expect: str
) -> None:
    config = deepspeed_config(make_spec())
    change(config)
    with pytest.raises(ValueError, match=expect):
        validate_deepspeed_config(config, micro_batch_size=4)


@needs_deepspeed
def test_two_process_zero2_run_through_torchrun(
    tmp_path: Path,
    tiny_model_dir: Path,
    event_sink: EventSink,
    make_job: Callable[..., TrainerJob],
    trainer_env: dict[str, str],
) -> None:
    data = b"\n".join((REPO / "examples" / "demo_chat.jsonl").read_bytes().splitlines()[:32])
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}}}
    job = make_job(tmp_path, data, event_sink.url, method=method)
    env = dict(trainer_env, TUNEFORGE_TRAINER_NPROC="2")
    # The first run on a machine compiles DeepSpeed's shared-memory comm op (~40 s); later runs reuse it.
    env.setdefault(
        "TORCH_EXTENSIONS_DIR",
        os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
    )
    result = subprocess.run(job.command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "world_size=2" in result.stdout

    # 32 examples, 4 per process, 2 processes: 4 steps per epoch. Only rank 0 spoke.
    events = event_sink.events(job.job_id)
    steps = [e["data"]["step"] for e in events if e["type"] == "metrics" and "train_loss" in e["data"]]
    assert steps == list(range(1, 9))
    assert [e["message"] for e in events].count("Training file checked: 32 examples") == 1
    assert sum(e["message"].startswith("attempt 1 succeeded") for e in events) == 1
    storage = FileStorage(job.root)
    assert complete_checkpoint_steps(storage, "proj-test", job.job_id) == [4, 8]
    manifest = json.loads(storage.get_bytes(adapter_prefix("proj-test", job.job_id) + "manifest.json"))
    assert manifest["metrics"]["steps"] == 8
    assert manifest["metrics"]["final_loss"] < manifest["metrics"]["first_loss"]
    assert "adapter_model.safetensors" in manifest["files"]
    # Tokens are summed over both processes once: every example's tokens, once per epoch.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    chats = [json.loads(line)["messages"] for line in data.splitlines()]
    per_epoch = sum(
        len(tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"]) for c in chats
    )
    assert manifest["metrics"]["trained_tokens"] == 2 * per_epoch


def test_zero_stage_comes_from_the_spec() -> None:
    from tuneforge_trainer.launch import zero_stage

    assert zero_stage(make_spec()) == 2
    three = make_spec(resources={"gpus": 8, "zero_stage": 3})
    assert zero_stage(three) == 3
    assert deepspeed_config(three)["zero_optimization"]["stage"] == 3
    assert deepspeed_config(make_spec())["zero_optimization"]["stage"] == 2


@needs_deepspeed
@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_two_process_zero3_run_through_torchrun(
    adapter: str,
    tmp_path: Path,
    tiny_model_dir: Path,
    event_sink: EventSink,
    make_job: Callable[..., TrainerJob],
    trainer_env: dict[str, str],
) -> None:
    """ZeRO-3 shards the weights too; saving gathers them, so the published weights are whole."""
    from safetensors.torch import load_file

    data = b"\n".join((REPO / "examples" / "demo_chat.jsonl").read_bytes().splitlines()[:16])
    params = {"hyperparameters": {"n_epochs": 2, "batch_size": 4}, "adapter": adapter}
    method = {"type": "supervised", "supervised": params}
    job = make_job(tmp_path, data, event_sink.url, method=method, resources={"gpus": 0, "zero_stage": 3})
    env = dict(trainer_env, TUNEFORGE_TRAINER_NPROC="2")
    env.setdefault(
        "TORCH_EXTENSIONS_DIR",
        os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
    )
    result = subprocess.run(job.command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "world_size=2" in result.stdout

    storage = FileStorage(job.root)
    prefix = adapter_prefix("proj-test", job.job_id)
    manifest = json.loads(storage.get_bytes(prefix + "manifest.json"))
    assert manifest["metrics"]["steps"] == 4  # 16 examples, 4 per process, 2 processes, 2 epochs
    assert manifest["metrics"]["final_loss"] < manifest["metrics"]["first_loss"]
    weights_file = "adapter_model.safetensors" if adapter == "lora" else "model.safetensors"
    assert manifest["adapter"] == adapter and weights_file in manifest["files"]
    weights = load_file(job.root / prefix / weights_file)
    # Gathered, not rank 0's shard: every tensor has its full shape (a ZeRO-3 shard is flat, or empty).
    base = load_file(tiny_model_dir / "model.safetensors")
    for name, tensor in weights.items():
        assert tensor.numel() > 0, name
        if adapter == "full":
            assert tensor.shape == base[name].shape, name
