"""Supervised fine-tuning (SFT) of a LoRA adapter with TRL's SFTTrainer.

Loss covers only what the model must produce: the assistant turns of chat data, or the
completion of prompt/completion data. The adapter and the tokenizer are saved to
``ctx.adapter_dir``; publishing it is ``publish``'s job.
"""

from __future__ import annotations

from typing import Any

from tuneforge_trainer.config_mapping import resolve_hyperparameters, sft_config_kwargs
from tuneforge_trainer.data import SFTData, as_messages
from tuneforge_trainer.modeling import load_tokenizer, max_length_for
from tuneforge_trainer.training import RunContext, callbacks, fit


def train_sft(ctx: RunContext, data: SFTData, eval_data: SFTData | None = None) -> dict[str, Any]:
    """Train, save the adapter into ``ctx.adapter_dir``, and return the run's metrics."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from tuneforge_trainer.progress import ProgressCallback

    if eval_data is not None and eval_data.format != data.format:  # one schema for both files
        data, eval_data = as_messages(data), as_messages(eval_data)
    spec = ctx.spec
    tokenizer = load_tokenizer(spec, ctx.base_model_dir, chat=data.format == "messages")
    hp = resolve_hyperparameters(spec.method.params.hyperparameters, len(data))
    kwargs = sft_config_kwargs(
        spec,
        hp,
        data_format=data.format,
        max_length=max_length_for(ctx.base_model_dir),
        **ctx.config_kwargs(has_eval=eval_data is not None),
    )
    model, peft_config, quantization = ctx.model_and_lora(tokenizer)
    progress = ProgressCallback(ctx.reporter)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**current_names(kwargs, SFTConfig)),
        train_dataset=Dataset.from_list(data.records),
        eval_dataset=Dataset.from_list(eval_data.records) if eval_data is not None else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        quantization_config=quantization if peft_config is not None else None,
        callbacks=callbacks(ctx, progress),
    )
    return fit(trainer, ctx, progress, hp, describe=f"SFT on {len(data)} examples ({data.format})")


def current_names(kwargs: dict[str, Any], config_cls: type) -> dict[str, Any]:
    """Use transformers 5's ``activation_checkpointing`` where it exists (the old name warns)."""
    fields = getattr(config_cls, "__dataclass_fields__", {})
    if "gradient_checkpointing" in kwargs and "activation_checkpointing" in fields:
        kwargs = dict(kwargs)
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
        if "gradient_checkpointing_kwargs" in kwargs and "activation_checkpointing_kwargs" in fields:
            kwargs["activation_checkpointing_kwargs"] = kwargs.pop("gradient_checkpointing_kwargs")
    return kwargs
