"""The acceleration plan: pure decisions over a table of machines, and the trainer wiring on CPU."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.test_train_sft import in_process_spec
from tuneforge.types import Hyperparameters, JobSpec
from tuneforge_trainer import acceleration as accel
from tuneforge_trainer import config_mapping as cm
from tuneforge_trainer.deepspeed_mapping import deepspeed_config

GIB = 2**30
H100 = accel.Environment(
    cuda=True,
    compute_capability=(9, 0),
    gpu_memory_bytes=80 * GIB,
    gpu_name="NVIDIA H100 80GB HBM3",
    flash_attn="2.8.3.post2",
    liger_kernel="0.8.5",
)
L4 = accel.Environment(  # Ada, 24 GB, same kernel packages
    cuda=True, compute_capability=(8, 9), gpu_memory_bytes=24 * GIB, flash_attn="2.8.3", liger_kernel="0.8.5"
)
T4 = replace(L4, compute_capability=(7, 5), gpu_memory_bytes=16 * GIB)  # Turing: no FlashAttention-2
# Llama-3.2-1B and Llama-3-8B dimensions (bench/train_throughput.py uses the same).
LLAMA_1B = accel.ModelShape(2048, 8192, 16, 32, 8, 128256, tied=True)
LLAMA_8B = accel.ModelShape(4096, 14336, 32, 32, 8, 128256, tied=False)


def make_spec(**overrides: Any) -> JobSpec:
    fields: dict[str, Any] = {
        "job_id": "ftjob-1",
        "project_id": "proj-1",
        "attempt": 1,
        "base_model": "acme/llama",
        "base_model_path": "/models/llama",
        "method": {"type": "supervised"},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "quantization": "nf4",
        "resources": {"gpus": 1},
        "training_file_key": "k",
        "storage_uri": "file:///tmp/storage",
        "api_base_url": "http://127.0.0.1:9",
    }
    fields.update(overrides)
    return JobSpec.model_validate(fields)


def plan(
    spec: JobSpec | None = None,
    env: accel.Environment = H100,
    shape: accel.ModelShape | None = LLAMA_1B,
    batch_tokens: int | None = 8 * 2048,
    zero_stage: int | None = None,
) -> accel.AccelerationPlan:
    return accel.plan_acceleration(
        spec or make_spec(), env, shape=shape, batch_tokens=batch_tokens, zero_stage=zero_stage
    )


CPU_SPEC = {"resources": {"gpus": 0}}
ZERO3_SPEC = {"resources": {"gpus": 4, "zero_stage": 3}}
CPU = accel.CPU_ENVIRONMENT
FA2 = "flash_attention_2"
COMPILE = replace(H100, compile_requested=True)
NO_FA = replace(H100, flash_attn=None)
NO_LIGER = replace(H100, liger_kernel=None)
NEITHER = replace(H100, flash_attn=None, liger_kernel=None)
OLD_FA = replace(H100, flash_attn="2.3.2")
OLD_LIGER = replace(H100, liger_kernel="0.6.4")  # breaks under transformers 5


@pytest.mark.parametrize(
    ("name", "spec", "env", "shape", "zero_stage", "expected"),
    [
        # expected: (attention, liger, gradient checkpointing, compile)
        ("cpu job", CPU_SPEC, CPU, LLAMA_1B, None, (None, False, False, False)),
        ("cpu job on a GPU machine", CPU_SPEC, H100, LLAMA_1B, None, (None, False, False, False)),
        ("h100, everything", {}, H100, LLAMA_1B, None, (FA2, True, False, False)),
        ("h100 without flash_attn", {}, NO_FA, LLAMA_1B, None, (None, True, False, False)),
        ("h100 without liger", {}, NO_LIGER, LLAMA_1B, None, (FA2, False, False, False)),
        ("h100, neither", {}, NEITHER, LLAMA_1B, None, (None, False, False, False)),
        ("h100, flash_attn too old", {}, OLD_FA, LLAMA_1B, None, (None, True, False, False)),
        ("h100, liger too old", {}, OLD_LIGER, LLAMA_1B, None, (FA2, False, False, False)),
        ("h100, 8B does not fit", {}, H100, LLAMA_8B, None, (FA2, True, True, False)),
        ("small GPU (24 GiB), 1B", {}, L4, LLAMA_1B, None, (FA2, True, True, False)),
        ("turing, flash_attn installed", {}, T4, LLAMA_1B, None, (None, True, True, False)),
        ("unknown model shape", {}, H100, None, None, (FA2, True, True, False)),
        ("zero-3", ZERO3_SPEC, H100, LLAMA_1B, 3, (FA2, True, True, False)),
        ("gpu job, no CUDA visible", {}, CPU, LLAMA_1B, None, (None, False, True, False)),
        ("compile opt-in", {}, COMPILE, LLAMA_1B, None, (FA2, True, False, True)),
        ("compile opt-in, cpu job", CPU_SPEC, COMPILE, LLAMA_1B, None, (None, False, False, False)),
    ],
)  # fmt: skip
def test_plan_over_environments(
    name: str,
    spec: dict[str, Any],
    env: accel.Environment,
    shape: accel.ModelShape | None,
    zero_stage: int | None,
    expected: tuple[str | None, bool, bool, bool],
) -> None:
    result = plan(make_spec(**spec), env, shape, zero_stage=zero_stage)
    got = (result.attn_implementation, result.liger, result.gradient_checkpointing, result.compile)
    assert got == expected, name
    assert set(result.reasons) == {"attention", "liger", "gradient_checkpointing", "compile"}


def test_summary_says_what_ran_and_why() -> None:
    text = plan().summary()
    assert text.startswith("acceleration: flash_attention_2 (flash_attn 2.8.3.post2, sm90), liger on")
    assert "gradient checkpointing off (est. " in text and "GiB of 80 GiB)" in text
    assert "torch.compile off (opt-in, TUNEFORGE_TRAINER_COMPILE=1: compile time hurts short jobs)" in text
    small = plan(env=L4).summary()
    assert "gradient checkpointing on (est. " in small and "without it, 24 GiB GPU)" in small
    no_fa = plan(env=replace(T4, flash_attn=None)).summary()
    assert "sdpa (transformers' default): flash_attn not installed" in no_fa
    assert "sdpa (transformers' default): sm75 is older than Ampere (sm80)" in plan(env=T4).summary()
    assert "DeepSpeed ZeRO-3" in plan(zero_stage=3).summary()


def test_plan_data_for_the_event() -> None:
    data = plan().as_data()
    assert data["attn_implementation"] == "flash_attention_2" and data["liger"] is True
    assert data["gradient_checkpointing"] is False and data["torch_compile"] is False
    assert data["gpu_memory_gib"] == 80.0
    assert 20 < data["estimated_memory_gib"] < 80
    cpu = plan(make_spec(**CPU_SPEC), accel.CPU_ENVIRONMENT).as_data()
    assert cpu == {
        "attn_implementation": "sdpa",
        "liger": False,
        "gradient_checkpointing": False,
        "torch_compile": False,
    }


def test_checkpointing_follows_the_memory_estimate() -> None:
    spec = make_spec()
    estimate = accel.estimate_memory(spec, LLAMA_1B, 8 * 2048)
    fits = replace(H100, gpu_memory_bytes=estimate.with_margin)
    assert plan(env=fits).gradient_checkpointing is False
    assert plan(env=replace(fits, gpu_memory_bytes=estimate.with_margin - 1)).gradient_checkpointing is True
    # Shorter batches need less: the same small GPU can drop checkpointing for them.
    assert plan(env=L4, batch_tokens=2 * 1024).gradient_checkpointing is False


def test_memory_estimate_terms() -> None:
    nf4, bf16 = make_spec(), make_spec(quantization=None)
    short, long = accel.estimate_memory(nf4, LLAMA_8B, 1024), accel.estimate_memory(nf4, LLAMA_8B, 2048)
    assert long.activations == 2 * short.activations  # linear in tokens: no T² attention scores
    assert long.weights == short.weights and long.trainable_state == short.trainable_state
    # nf4 stores the 8B's layers in ~3.7 GB; peft upcasts its embedding and head to fp32 (~4.2 GB).
    assert 7 * GIB < short.weights < 8 * GIB
    assert accel.estimate_memory(bf16, LLAMA_8B, 1024).weights == LLAMA_8B.total_params * 2
    # LoRA state: 16 bytes per adapter parameter; full fine-tuning: 6 more bytes per weight.
    assert short.trainable_state == LLAMA_8B.lora_params(16) * 16
    full = make_spec(quantization=None, method={"type": "supervised", "supervised": {"adapter": "full"}})
    assert accel.estimate_memory(full, LLAMA_8B, 1024).trainable_state == LLAMA_8B.total_params * 6
    # Full DPO also holds TRL's frozen reference copy; LoRA DPO's reference is the base itself.
    full_dpo = make_spec(quantization=None, method={"type": "dpo", "dpo": {"adapter": "full"}})
    lora_dpo = make_spec(quantization=None, method={"type": "dpo"})
    assert accel.estimate_memory(full_dpo, LLAMA_8B, 1024).weights == LLAMA_8B.total_params * 4
    assert accel.estimate_memory(lora_dpo, LLAMA_8B, 1024).weights == LLAMA_8B.total_params * 2
    # LoRA dropout keeps a copy of each adapted input.
    dropout = make_spec(lora={"r": 16, "dropout": 0.05})
    assert accel.estimate_memory(dropout, LLAMA_8B, 1024).activations > short.activations
    assert estimate_is_ordered(short)


def estimate_is_ordered(estimate: accel.MemoryEstimate) -> bool:
    return estimate.total < estimate.with_margin == int(estimate.total * 1.3) + 4 * GIB


def test_pair_methods_count_chosen_and_rejected() -> None:
    assert accel.batch_tokens_for(make_spec(), 4, 1024) == 4096
    assert accel.batch_tokens_for(make_spec(method={"type": "dpo"}), 4, 1024) == 8192
    assert accel.batch_tokens_for(make_spec(method={"type": "reward_model"}), 4, 1024) == 8192


def test_model_shape_from_config() -> None:
    config = {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    }
    assert accel.ModelShape.from_config(config) == LLAMA_8B
    assert LLAMA_8B.total_params == 8_030_261_248  # Meta's Llama-3-8B
    assert LLAMA_1B.total_params == 1_235_814_400  # Meta's Llama-3.2-1B
    assert accel.ModelShape.from_config({"text_config": config}) == LLAMA_8B  # multimodal wrappers
    assert accel.ModelShape.from_config({**config, "num_local_experts": 8}) is None  # MoE: not sized
    assert accel.ModelShape.from_config({"hidden_size": 64}) is None
    no_gqa = {k: v for k, v in config.items() if k != "num_key_value_heads"}
    assert accel.ModelShape.from_config(no_gqa).kv_heads == 32  # type: ignore[union-attr]


def test_read_model_shape(tmp_path: Path, tiny_model_dir: Path) -> None:
    shape = accel.read_model_shape(tiny_model_dir)
    assert shape is not None and shape.hidden == 64 and shape.layers == 2
    assert accel.read_model_shape(tmp_path) is None  # no config.json
    (tmp_path / "config.json").write_text("not json")
    assert accel.read_model_shape(tmp_path) is None


@pytest.mark.parametrize(("value", "on"), [("1", True), ("true", True), ("0", False), ("", False)])
def test_compile_opt_in_env(value: str, on: bool) -> None:
    assert accel.compile_requested({accel.COMPILE_ENV: value}) is on
    assert accel.compile_requested({}) is False


def test_detect_environment_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv(accel.COMPILE_ENV, "1")
    assert accel.detect_environment() == accel.Environment(compile_requested=True)


# ---- the mapping applies the plan ------------------------------------------------------------


def resolved() -> cm.ResolvedHyperparameters:
    return cm.resolve_hyperparameters(Hyperparameters(batch_size=8), n_examples=64)


@pytest.mark.parametrize("mapping", [cm.sft_config_kwargs, cm.dpo_config_kwargs, cm.reward_config_kwargs])
def test_cpu_plan_resolves_to_todays_settings(mapping: Any) -> None:
    cpu = make_spec(**CPU_SPEC, base_model="tuneforge/tiny-llama", quantization=None)
    cpu_plan = plan(cpu, accel.CPU_ENVIRONMENT)
    extra = {"data_format": "messages"} if mapping is cm.sft_config_kwargs else {}
    today = mapping(cpu, resolved(), output_dir="o", **extra)
    assert mapping(cpu, resolved(), output_dir="o", acceleration=cpu_plan, **extra) == today
    assert cm.model_init_kwargs(cpu, acceleration=cpu_plan) == {"dtype": "float32", "device_map": "cpu"}


def test_gpu_plan_sets_attention_liger_checkpointing_and_compile() -> None:
    spec = make_spec()
    fast = plan(spec, replace(H100, compile_requested=True))
    kwargs = cm.sft_config_kwargs(spec, resolved(), output_dir="o", data_format="messages", acceleration=fast)
    assert kwargs["model_init_kwargs"] == {"dtype": "bfloat16", "attn_implementation": "flash_attention_2"}
    assert kwargs["use_liger_kernel"] is True
    assert kwargs["liger_kernel_config"] == {"fused_linear_cross_entropy": False, "cross_entropy": False}
    assert kwargs["gradient_checkpointing"] is False
    assert kwargs["torch_compile"] is True
    # Nothing chosen, nothing set: transformers' default attention, no Liger or compile fields.
    plain = plan(spec, replace(H100, flash_attn=None, liger_kernel=None, gpu_memory_bytes=8 * GIB))
    kwargs = cm.sft_config_kwargs(
        spec, resolved(), output_dir="o", data_format="messages", acceleration=plain
    )
    assert kwargs["model_init_kwargs"] == {"dtype": "bfloat16"}
    assert kwargs["gradient_checkpointing"] is True
    assert not {"use_liger_kernel", "liger_kernel_config", "torch_compile"} & set(kwargs)


def test_zero3_keeps_reentrant_checkpointing_with_a_plan() -> None:
    spec = make_spec(resources={"gpus": 4, "zero_stage": 3})
    zero3 = plan(spec, zero_stage=3)
    kwargs = cm.training_args_kwargs(
        spec, resolved(), output_dir="o", deepspeed=deepspeed_config(spec, zero_stage=3), acceleration=zero3
    )
    assert kwargs["gradient_checkpointing"] is True
    assert kwargs["gradient_checkpointing_kwargs"] == {"use_reentrant": True}


def test_plan_fields_exist_in_every_trl_config() -> None:
    from trl import DPOConfig, RewardConfig, SFTConfig

    from tuneforge_trainer.sft import current_names

    fields = plan(env=replace(H100, compile_requested=True)).training_args_kwargs()
    for config in (SFTConfig, DPOConfig, RewardConfig):
        assert set(current_names(fields, config)) <= set(config.__dataclass_fields__), config.__name__


# ---- the trainer on CPU runs with the plan's settings ----------------------------------------


class Collect:
    def __init__(self) -> None:
        self.messages: list[tuple[str, dict[str, Any] | None]] = []

    def message(self, text: str, level: str = "info", data: dict[str, Any] | None = None) -> bool:
        self.messages.append((text, data))
        return True

    def metrics(self, text: str, data: dict[str, Any]) -> bool:
        return True


def tiny_spec(tmp_path: Path, **overrides: Any) -> JobSpec:
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 2}}}
    return in_process_spec(tmp_path, job_id="ftjob-accel", method=method, **overrides)


def test_cpu_sft_trainer_uses_the_cpu_plan_and_announces_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tuneforge_trainer.data import parse_sft_lines
    from tuneforge_trainer.sft import build_sft_trainer
    from tuneforge_trainer.training import RunContext

    reporter = Collect()
    # A GPU machine's facts must not matter to a CPU job.
    ctx = RunContext(
        spec=tiny_spec(tmp_path),
        base_model_dir=tiny_model_dir,
        work_dir=tmp_path / "w",
        reporter=reporter,  # type: ignore[arg-type]
        environment=replace(H100, compile_requested=True),
    )
    line = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    trainer, _ = build_sft_trainer(ctx, parse_sft_lines([json.dumps(line).encode()] * 4))
    args = trainer.args
    assert args.use_cpu and not args.gradient_checkpointing
    assert not args.use_liger_kernel and not args.torch_compile
    assert trainer.model.config._attn_implementation == "sdpa"  # transformers' default, as before
    assert reporter.messages == [
        (
            "acceleration: sdpa (transformers' default; CPU run), liger off (CPU run), "
            "gradient checkpointing off (CPU run), torch.compile off (CPU run)",
            {
                "attn_implementation": "sdpa",
                "liger": False,
                "gradient_checkpointing": False,
                "torch_compile": False,
            },
        )
    ]


def test_gpu_job_context_maps_the_detected_machine(tiny_model_dir: Path, tmp_path: Path) -> None:
    """What a GPU run would hand TRL, from the run context (no GPU needed to build the kwargs)."""
    from tuneforge_trainer.training import RunContext

    spec = tiny_spec(tmp_path, resources={"gpus": 1}, quantization="nf4")
    reporter = Collect()
    ctx = RunContext(
        spec=spec, base_model_dir=tiny_model_dir, work_dir=tmp_path, reporter=reporter, environment=H100
    )  # type: ignore[arg-type]
    fast = ctx.acceleration(batch_size=2, max_length=128)
    kwargs = cm.sft_config_kwargs(
        spec, resolved(), data_format="messages", **ctx.config_kwargs(has_eval=False, acceleration=fast)
    )
    assert kwargs["model_init_kwargs"]["attn_implementation"] == "flash_attention_2"
    assert kwargs["use_liger_kernel"] is True and kwargs["gradient_checkpointing"] is False
    assert [text for text, _ in reporter.messages] == [fast.summary()]
