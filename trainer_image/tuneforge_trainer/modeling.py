"""Tokenizer, base model and LoRA for one run: what every method needs before its TRL trainer.

A fresh run hands TRL the base model's folder plus a ``LoraConfig`` and lets it load and wrap
the model (TRL seeds before loading, prepares k-bit models, and so on). A run that starts
from another job's checkpoint (``init_adapter_key``) loads the base itself and puts the
checkpoint's adapter on top, trainable, with a fresh optimizer.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge.types import JobSpec, MethodType
from tuneforge_trainer.config_mapping import (
    DEFAULT_MAX_LENGTH,
    adapter_kind,
    lora_config_kwargs,
    model_init_kwargs,
    quantization_config_kwargs,
)
from tuneforge_trainer.errors import ConfigError

if TYPE_CHECKING:
    from tuneforge_trainer.acceleration import AccelerationPlan


def load_tokenizer(spec: JobSpec, base_model_dir: Path, *, chat: bool) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    if chat and not tokenizer.chat_template:
        raise ConfigError(
            "unsupported_data_format",
            f"base model {spec.base_model!r} has no chat template: use plain-text examples",
            "training_file",
        )
    if tokenizer.pad_token is None:  # every method pads batches; EOS is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def max_length_for(base_model_dir: Path, requested: int | None = None) -> int:
    """``requested`` (or 1024 when None), capped at the model's context length."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_model_dir)
    wanted = requested or DEFAULT_MAX_LENGTH
    return min(wanted, getattr(config, "max_position_embeddings", wanted))


def bnb_config(spec: JobSpec, *, zero_stage: int | None = None) -> Any:
    """``BitsAndBytesConfig`` for a quantized base, or None."""
    kwargs = quantization_config_kwargs(spec, zero_stage=zero_stage)
    if kwargs is None:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "quantization_unavailable",
            "this trainer image has no bitsandbytes for quantization",
            "quantization",
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**kwargs)


def model_and_lora(
    spec: JobSpec,
    base_model_dir: Path,
    tokenizer: Any,
    *,
    init_adapter_dir: Path | None = None,
    quantization: Any = None,
    distributed: bool = False,
    acceleration: AccelerationPlan | None = None,
) -> tuple[Any, Any]:
    """``(model, peft_config)`` for a TRL trainer: ``(folder, LoraConfig)`` or ``(PeftModel, None)``;
    ``(folder, None)`` for full fine-tuning, where TRL trains every weight of the loaded base."""
    from peft import LoraConfig

    if adapter_kind(spec) == "full":
        # The API refuses these combinations at create time; a hand-written spec still fails clearly.
        if quantization is not None:
            raise ConfigError("invalid_adapter", "full fine-tuning needs an unquantized base", "quantization")
        if init_adapter_dir is not None:
            raise ConfigError(
                "invalid_adapter", "full fine-tuning starts from the base model", "from_checkpoint"
            )
        return str(base_model_dir), None
    lora = lora_config_kwargs(spec)
    if init_adapter_dir is None:
        return str(base_model_dir), LoraConfig(**lora)
    _check_adapter_matches(init_adapter_dir, lora["task_type"])
    return load_with_adapter(
        spec, base_model_dir, tokenizer, init_adapter_dir, quantization, distributed, acceleration
    ), None


def load_with_adapter(
    spec: JobSpec,
    base_model_dir: Path,
    tokenizer: Any,
    adapter_dir: Path,
    quantization: Any = None,
    distributed: bool = False,
    acceleration: AccelerationPlan | None = None,
) -> Any:
    import torch
    from peft import PeftModel, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed

    set_seed(spec.seed)
    kwargs = dict(model_init_kwargs(spec, distributed=distributed, acceleration=acceleration))
    kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if spec.method.type == MethodType.reward_model:
        model = AutoModelForSequenceClassification.from_pretrained(base_model_dir, num_labels=1, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_model_dir, **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id  # sequence classifiers find the last token by it
    if quantization is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)


def _check_adapter_matches(adapter_dir: Path, task_type: str) -> None:
    # An SFT adapter has no reward head, a reward adapter no LM head: starting across methods is a user error.
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("task_type") != task_type:
        raise ConfigError(
            "incompatible_checkpoint",
            f"the checkpoint's adapter is for {config.get('task_type')}, this job needs {task_type}",
            "from_checkpoint",
        )
