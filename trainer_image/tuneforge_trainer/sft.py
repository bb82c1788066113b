"""Supervised fine-tuning (SFT) of a LoRA adapter with TRL's SFTTrainer.

Loss covers only what the model must produce: the assistant turns of chat data, or the
completion of prompt/completion data. The adapter and the tokenizer are saved to a local
folder; publishing it is ``publish``'s job.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from tuneforge.types import JobSpec
from tuneforge_trainer.config_mapping import (
    DEFAULT_MAX_LENGTH,
    lora_config_kwargs,
    quantization_config_kwargs,
    resolve_hyperparameters,
    sft_config_kwargs,
)
from tuneforge_trainer.data import SFTData
from tuneforge_trainer.errors import ConfigError
from tuneforge_trainer.events import EventReporter


def train_sft(
    spec: JobSpec,
    base_model_dir: Path,
    data: SFTData,
    *,
    work_dir: Path,
    adapter_dir: Path,
    reporter: EventReporter | None = None,
) -> dict[str, Any]:
    """Train, save the adapter into ``adapter_dir``, and return the run's metrics."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoConfig, AutoTokenizer, BitsAndBytesConfig, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from tuneforge_trainer.progress import ProgressCallback

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    if data.format == "messages" and not tokenizer.chat_template:
        raise ConfigError(
            "unsupported_data_format",
            f"base model {spec.base_model!r} has no chat template: use prompt/completion examples",
            "training_file",
        )
    quantization = quantization_config_kwargs(spec)
    if quantization and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "quantization_unavailable",
            "this trainer image has no bitsandbytes for quantization",
            "quantization",
        )

    hp = resolve_hyperparameters(spec.method.params.hyperparameters, len(data))
    model_config = AutoConfig.from_pretrained(base_model_dir)
    max_length = min(DEFAULT_MAX_LENGTH, getattr(model_config, "max_position_embeddings", DEFAULT_MAX_LENGTH))
    kwargs = sft_config_kwargs(
        spec, hp, output_dir=str(work_dir), data_format=data.format, max_length=max_length
    )
    args = SFTConfig(**_current_names(kwargs, SFTConfig))
    progress = ProgressCallback(reporter)
    trainer = SFTTrainer(
        model=str(base_model_dir),
        args=args,
        train_dataset=Dataset.from_list(data.records),
        processing_class=tokenizer,
        peft_config=LoraConfig(**lora_config_kwargs(spec)),
        quantization_config=BitsAndBytesConfig(**quantization) if quantization else None,
        callbacks=[progress],
    )
    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; ProgressCallback prints lines
    steps = math.ceil(len(data) / hp.batch_size) * hp.n_epochs  # on one device
    print(
        f"[tuneforge-trainer] training: {len(data)} examples ({data.format}), epochs={hp.n_epochs} "
        f"batch_size={hp.batch_size} lr={args.learning_rate:g} steps~{steps}",
        flush=True,
    )
    result = trainer.train()

    save_adapter(trainer.model, tokenizer, adapter_dir, base_model=spec.base_model)
    losses = progress.losses
    return {
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "trained_tokens": int(trainer.state.num_input_tokens_seen),
        "steps": int(trainer.state.global_step),
        "train_runtime": float(result.metrics.get("train_runtime", 0.0)),
        "n_epochs": hp.n_epochs,
        "batch_size": hp.batch_size,
        "learning_rate": args.learning_rate,
    }


def _current_names(kwargs: dict[str, Any], config_cls: type) -> dict[str, Any]:
    """Use transformers 5's ``activation_checkpointing`` where it exists (the old name warns)."""
    fields = getattr(config_cls, "__dataclass_fields__", {})
    if "gradient_checkpointing" in kwargs and "activation_checkpointing" in fields:
        kwargs = dict(kwargs)
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
    return kwargs


def save_adapter(model: Any, tokenizer: Any, adapter_dir: Path, *, base_model: str) -> None:
    """Write adapter_config.json, adapter_model.safetensors and the tokenizer files."""
    adapter_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    # peft records the local folder the base came from; the public model id is what travels.
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_model
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # peft's generated model card repeats that local path and says nothing we don't.
    (adapter_dir / "README.md").unlink(missing_ok=True)
