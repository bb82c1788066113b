"""JobSpec -> keyword arguments for peft, TRL and bitsandbytes: pure functions, no torch.

Everything here returns plain dicts (dtypes as strings), so the mapping is testable without
torch, and the trainer builds the library objects from them in one line each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from tuneforge.types import Hyperparameters, JobSpec
from tuneforge_trainer.tiny_model import TINY_MODEL_ID

DataFormat = Literal["messages", "prompt_completion"]

LORA_BASE_LR = 2e-4
# A random tiny model barely moves at 2e-4 in a few dozen steps; 1e-2 makes the demo visible.
TINY_MODEL_BASE_LR = 1e-2
DEFAULT_N_EPOCHS = 3
MAX_AUTO_BATCH_SIZE = 8
DEFAULT_MAX_LENGTH = 1024


@dataclass(frozen=True)
class ResolvedHyperparameters:
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


def resolve_hyperparameters(hp: Hyperparameters, n_examples: int) -> ResolvedHyperparameters:
    """Replace any "auto" left in the spec (the API should have resolved them; be defensive)."""
    n_epochs = DEFAULT_N_EPOCHS if hp.n_epochs == "auto" else int(hp.n_epochs)
    if hp.batch_size == "auto":
        batch_size = max(1, min(MAX_AUTO_BATCH_SIZE, n_examples // 8))
    else:
        batch_size = int(hp.batch_size)
    multiplier = 1.0 if hp.learning_rate_multiplier == "auto" else float(hp.learning_rate_multiplier)
    return ResolvedHyperparameters(n_epochs, batch_size, multiplier)


def base_learning_rate(spec: JobSpec) -> float:
    return TINY_MODEL_BASE_LR if spec.base_model == TINY_MODEL_ID else LORA_BASE_LR


def learning_rate(spec: JobSpec, hp: ResolvedHyperparameters) -> float:
    return base_learning_rate(spec) * hp.learning_rate_multiplier


def on_cpu(spec: JobSpec) -> bool:
    return spec.resources.gpus == 0


def lora_config_kwargs(spec: JobSpec) -> dict[str, Any]:
    """Arguments for ``peft.LoraConfig``."""
    lora = spec.lora
    target = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    return {
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": target,
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }


def quantization_config_kwargs(spec: JobSpec) -> dict[str, Any] | None:
    """Arguments for ``transformers.BitsAndBytesConfig``, or None for an unquantized base."""
    if spec.quantization == "nf4":
        # QLoRA as in the paper: 4-bit NormalFloat, double quantization, bf16 compute.
        return {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "bfloat16",
        }
    if spec.quantization == "int8":
        return {"load_in_8bit": True}
    return None


def model_init_kwargs(spec: JobSpec) -> dict[str, Any]:
    """Arguments for ``from_pretrained`` of the base model (TRL's ``model_init_kwargs``)."""
    kwargs: dict[str, Any] = {"dtype": "float32" if on_cpu(spec) else "bfloat16"}
    if on_cpu(spec):
        kwargs["device_map"] = "cpu"
    return kwargs


def sft_config_kwargs(
    spec: JobSpec,
    hp: ResolvedHyperparameters,
    *,
    output_dir: str,
    data_format: DataFormat,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> dict[str, Any]:
    """Arguments for ``trl.SFTConfig``.

    Loss covers only what the model must produce: assistant turns for chat data
    (``assistant_only_loss``), the completion for prompt/completion data (TRL's default).
    """
    cpu = on_cpu(spec)
    kwargs: dict[str, Any] = {
        "output_dir": output_dir,
        "num_train_epochs": hp.n_epochs,
        "per_device_train_batch_size": hp.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": learning_rate(spec, hp),
        "max_length": max_length,
        "seed": spec.seed,
        "data_seed": spec.seed,
        "logging_steps": 1,
        "save_strategy": "no",  # checkpoints come with resume support
        "report_to": "none",
        "disable_tqdm": True,  # stdout is the run's log file; progress goes through our callback
        "include_num_input_tokens_seen": "non_padding",
        "dataloader_num_workers": 0,
        # TRL defaults bf16=True (even with use_cpu) and turns gradient checkpointing on: decide explicitly.
        "use_cpu": cpu,
        "bf16": not cpu,
        "fp16": False,
        "gradient_checkpointing": not cpu,
        "assistant_only_loss": data_format == "messages",
        "completion_only_loss": True if data_format == "prompt_completion" else None,
        "model_init_kwargs": model_init_kwargs(spec),
    }
    return kwargs
