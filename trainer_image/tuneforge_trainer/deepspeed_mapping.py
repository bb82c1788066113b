"""JobSpec -> DeepSpeed config: a pure dict, validated offline by DeepSpeed's own config class.

ZeRO-2 by default (optimizer state and gradients sharded; with LoRA the trainable state is
small, so this is the cheap, fast choice). ZeRO-3 also shards the frozen base weights, for
bases that do not fit one GPU, and is what full fine-tuning of a large model needs; the job
picks it with ``resources.zero_stage``. Precision and batch sizes are ``"auto"``: the HF
Trainer fills them from its own arguments, so the two can never disagree. There is no
``optimizer`` section: the Trainer's torch AdamW is used, which avoids compiling DeepSpeed's
CPU Adam op.

Related settings live with the other mappings in ``config_mapping``: QLoRA under ZeRO-3
stores the 4-bit weights in the compute dtype (``bnb_4bit_quant_storage``), and peft under
ZeRO-3 uses reentrant gradient checkpointing.
"""

from __future__ import annotations

import copy
from typing import Any

from tuneforge.types import JobSpec

ZERO_STAGES = (2, 3)


def deepspeed_config(spec: JobSpec, *, zero_stage: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config for a multi-process run of ``spec``; ``zero_stage`` defaults to the
    spec's ``resources.zero_stage``, then 2."""
    zero_stage = zero_stage or spec.resources.zero_stage or 2
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage must be one of {ZERO_STAGES}, not {zero_stage!r}")
    zero: dict[str, Any] = {
        "stage": zero_stage,
        "overlap_comm": spec.resources.gpus > 0,  # overlapping needs async (GPU) streams
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if zero_stage == 2:
        zero.update(allgather_partitions=True, reduce_scatter=True, allgather_bucket_size=5e8)
    else:
        zero.update(
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            # The adapter is saved as one file by rank 0; gather the sharded weights for it.
            stage3_gather_16bit_weights_on_model_save=True,
        )
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        "steps_per_print": 1_000_000,  # our progress callback reports steps
        "wall_clock_breakdown": False,
    }


def resolve_auto(
    config: dict[str, Any],
    *,
    micro_batch_size: int,
    gradient_accumulation_steps: int = 1,
    world_size: int = 1,
    bf16: bool = False,
    fp16: bool = False,
    hidden_size: int = 4096,
    max_grad_norm: float = 1.0,
) -> dict[str, Any]:
    """Fill the ``"auto"`` values the way the HF Trainer does, for offline validation."""
    resolved = copy.deepcopy(config)
    values = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
        "gradient_clipping": max_grad_norm,
    }
    for key, value in values.items():
        if resolved.get(key) == "auto":
            resolved[key] = value
    for key, enabled in (("bf16", bf16), ("fp16", fp16)):
        if resolved.get(key, {}).get("enabled") == "auto":
            resolved[key]["enabled"] = enabled
    zero = resolved.get("zero_optimization", {})
    sizes = {
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value
    return resolved


def validate_deepspeed_config(config: dict[str, Any], *, micro_batch_size: int, bf16: bool = False) -> None:
    """Raise ValueError unless DeepSpeed accepts ``config`` (imports deepspeed; not pure).

    DeepSpeed's config class rejects a bad ZeRO stage, a misspelt ``zero_optimization`` key and
    inconsistent batch sizes; it lets unknown top-level keys pass, so those are checked here.
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    unknown = set(config) - KNOWN_TOP_LEVEL_KEYS
    if unknown:
        raise ValueError(f"unknown DeepSpeed config keys: {sorted(unknown)}")
    resolved = resolve_auto(config, micro_batch_size=micro_batch_size, world_size=1, bf16=bf16)
    try:
        DeepSpeedConfig(resolved)
    except (AssertionError, ValueError, TypeError, KeyError) as exc:  # pydantic errors are ValueErrors
        raise ValueError(f"invalid DeepSpeed config: {exc}") from exc


KNOWN_TOP_LEVEL_KEYS = frozenset(
    {
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "train_batch_size",
        "gradient_clipping",
        "bf16",
        "fp16",
        "zero_optimization",
        "steps_per_print",
        "wall_clock_breakdown",
        "optimizer",
        "scheduler",
        "activation_checkpointing",
        "communication_data_type",
        "zero_allow_untested_optimizer",
        "zero_force_ds_cpu_optimizer",
    }
)
