"""The JobSpec -> library kwargs mapping is pure: these tests need no torch."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from tuneforge.types import Hyperparameters, JobSpec
from tuneforge_trainer import config_mapping as cm


def make_spec(**overrides: Any) -> JobSpec:
    fields: dict[str, Any] = {
        "job_id": "ftjob-1",
        "project_id": "proj-1",
        "attempt": 1,
        "base_model": "tuneforge/tiny-llama",
        "method": {"type": "supervised"},
        "lora": {},
        "training_file_key": "projects/proj-1/files/file-1",
        "storage_uri": "file:///tmp/storage",
        "api_base_url": "http://127.0.0.1:8000",
        "seed": 7,
    }
    fields.update(overrides)
    return JobSpec.model_validate(fields)


def resolved(**hp: Any) -> cm.ResolvedHyperparameters:
    return cm.resolve_hyperparameters(Hyperparameters(**hp), n_examples=64)


@pytest.mark.parametrize(
    ("n_examples", "batch_size"), [(0, 1), (7, 1), (16, 2), (40, 5), (64, 8), (10_000, 8)]
)
def test_auto_batch_size_scales_with_the_dataset(n_examples: int, batch_size: int) -> None:
    assert cm.resolve_hyperparameters(Hyperparameters(), n_examples).batch_size == batch_size


def test_auto_hyperparameters_resolve_to_defaults() -> None:
    hp = cm.resolve_hyperparameters(Hyperparameters(), n_examples=64)
    assert hp == cm.ResolvedHyperparameters(n_epochs=3, batch_size=8, learning_rate_multiplier=1.0)


def test_explicit_hyperparameters_are_kept() -> None:
    hp = resolved(n_epochs=5, batch_size=3, learning_rate_multiplier=0.5)
    assert hp == cm.ResolvedHyperparameters(n_epochs=5, batch_size=3, learning_rate_multiplier=0.5)


def test_learning_rate_is_base_times_multiplier() -> None:
    hp = resolved(learning_rate_multiplier=2.0)
    assert cm.learning_rate(make_spec(), hp) == pytest.approx(2e-2)  # tiny model base 1e-2
    other = make_spec(base_model="acme/llama-8b", base_model_path="/models/llama-8b")
    assert cm.learning_rate(other, hp) == pytest.approx(4e-4)  # LoRA base 2e-4


def test_lora_kwargs_use_peft_names() -> None:
    spec = make_spec(lora={"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]})
    assert cm.lora_config_kwargs(spec) == {
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.1,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    assert cm.lora_config_kwargs(make_spec())["target_modules"] == "all-linear"


def test_quantization_kwargs() -> None:
    assert cm.quantization_config_kwargs(make_spec()) is None
    nf4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    # QLoRA computes in bf16 on a GPU; a CPU has no fast bf16 path, so float32 there.
    gpu = make_spec(quantization="nf4", resources={"gpus": 1})
    assert cm.quantization_config_kwargs(gpu) == {**nf4, "bnb_4bit_compute_dtype": "bfloat16"}
    cpu = make_spec(quantization="nf4")
    assert cm.quantization_config_kwargs(cpu) == {**nf4, "bnb_4bit_compute_dtype": "float32"}
    assert cm.quantization_config_kwargs(make_spec(quantization="int8")) == {"load_in_8bit": True}


def test_cpu_run_overrides_trl_defaults() -> None:
    kwargs = cm.sft_config_kwargs(make_spec(), resolved(), output_dir="/tmp/out", data_format="messages")
    assert "ddp_backend" not in kwargs and "deepspeed" not in kwargs
    # TRL defaults bf16=True even on CPU and turns gradient checkpointing on: both must be explicit.
    assert kwargs["use_cpu"] is True
    assert kwargs["bf16"] is False
    assert kwargs["fp16"] is False
    assert kwargs["gradient_checkpointing"] is False
    assert kwargs["model_init_kwargs"] == {"dtype": "float32", "device_map": "cpu"}


def test_gpu_run_uses_bf16() -> None:
    spec = make_spec(resources={"gpus": 1})
    kwargs = cm.sft_config_kwargs(spec, resolved(), output_dir="/tmp/out", data_format="messages")
    assert kwargs["use_cpu"] is False
    assert kwargs["bf16"] is True
    assert kwargs["model_init_kwargs"] == {"dtype": "bfloat16"}


def test_sft_kwargs_carry_the_spec() -> None:
    hp = resolved(n_epochs=4, batch_size=2, learning_rate_multiplier=0.5)
    kwargs = cm.sft_config_kwargs(
        make_spec(), hp, output_dir="/tmp/out", data_format="messages", max_length=256
    )
    assert kwargs["output_dir"] == "/tmp/out"
    assert kwargs["num_train_epochs"] == 4
    assert kwargs["per_device_train_batch_size"] == 2
    assert kwargs["learning_rate"] == pytest.approx(5e-3)
    assert kwargs["max_length"] == 256
    assert kwargs["seed"] == 7
    assert kwargs["report_to"] == "none"
    assert kwargs["save_strategy"] == "epoch"
    assert kwargs["eval_strategy"] == "no"
    assert kwargs["logging_steps"] == 1


def test_loss_mask_follows_the_data_format() -> None:
    chat = cm.sft_config_kwargs(make_spec(), resolved(), output_dir="o", data_format="messages")
    assert chat["assistant_only_loss"] is True
    pairs = cm.sft_config_kwargs(make_spec(), resolved(), output_dir="o", data_format="prompt_completion")
    # TRL rejects assistant_only_loss on non-chat data; the completion mask does the same job there.
    assert pairs["assistant_only_loss"] is False
    assert pairs["completion_only_loss"] is True


def method(kind: str, **hp: Any) -> dict[str, Any]:
    return {"type": kind, kind: {"hyperparameters": hp}}


def test_each_method_has_its_lora_base_rate() -> None:
    hp = resolved()
    real = {"base_model": "acme/llama-8b", "base_model_path": "/models/llama-8b"}
    rates = {
        kind: cm.learning_rate(make_spec(method=method(kind), **real), hp)
        for kind in ("supervised", "reward_model", "dpo")
    }
    assert rates == {"supervised": 2e-4, "reward_model": 1e-4, "dpo": 5e-5}


def test_every_method_is_supported() -> None:
    # "sample" is a feedback session's generation job (sample.py), not a training method.
    assert {m.value for m in cm.SUPPORTED_METHODS} == {"supervised", "reward_model", "dpo", "rlhf", "sample"}


def test_reward_model_maps_to_a_sequence_classifier() -> None:
    spec = make_spec(method=method("reward_model"))
    assert cm.lora_config_kwargs(spec)["task_type"] == "SEQ_CLS"  # peft then trains and saves the score head
    kwargs = cm.reward_config_kwargs(spec, resolved(), output_dir="o", max_length=128)
    assert kwargs["max_length"] == 128
    assert (kwargs["use_cpu"], kwargs["bf16"], kwargs["fp16"], kwargs["gradient_checkpointing"]) == (
        True,
        False,
        False,
        False,
    )


def test_dpo_takes_beta_from_hyperparameters() -> None:
    assert cm.dpo_config_kwargs(make_spec(method=method("dpo")), resolved(), output_dir="o")["beta"] == 0.1
    spec = make_spec(method=method("dpo", beta=0.3))
    kwargs = cm.dpo_config_kwargs(spec, resolved(), output_dir="o")
    assert kwargs["beta"] == 0.3
    assert cm.lora_config_kwargs(spec)["task_type"] == "CAUSAL_LM"
    assert (kwargs["use_cpu"], kwargs["bf16"], kwargs["fp16"], kwargs["gradient_checkpointing"]) == (
        True,
        False,
        False,
        False,
    )


@pytest.mark.parametrize(
    ("hp", "has_eval", "expected"),
    [
        ({}, False, {"save_strategy": "epoch", "eval_strategy": "no"}),
        ({}, True, {"save_strategy": "epoch", "eval_strategy": "epoch"}),
        ({"eval_every": 5}, True, {"save_strategy": "epoch", "eval_strategy": "steps", "eval_steps": 5}),
        ({"eval_every": 5}, False, {"save_strategy": "epoch", "eval_strategy": "no"}),
        ({"checkpoint_every": 7}, False, {"save_strategy": "steps", "save_steps": 7, "eval_strategy": "no"}),
    ],
)
def test_eval_and_checkpoint_schedule(hp: dict[str, Any], has_eval: bool, expected: dict[str, Any]) -> None:
    assert cm.schedule_kwargs(make_spec(method=method("supervised", **hp)), has_eval=has_eval) == expected


def test_mapping_module_does_not_import_torch() -> None:
    code = (
        "import sys, tuneforge_trainer.config_mapping, tuneforge_trainer.deepspeed_mapping, "
        "tuneforge_trainer.preference_data, tuneforge_trainer.__main__; "
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'peft') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
