"""Direct Preference Optimization (DPO) of a LoRA adapter with TRL's DPOTrainer.

The reference policy is the base model with the adapter disabled: the trainer gets a peft
config and no ``ref_model``, so no second copy of the weights is loaded. (A job started from
another job's checkpoint gets TRL's frozen copy of that adapter as its reference instead:
the policy it starts from.) ``beta`` comes from the hyperparameters, default 0.1.
"""

from __future__ import annotations

from typing import Any

from tuneforge_trainer.config_mapping import dpo_config_kwargs, resolve_hyperparameters
from tuneforge_trainer.modeling import load_tokenizer, max_length_for
from tuneforge_trainer.preference_data import PreferenceData, one_schema
from tuneforge_trainer.training import RunContext, callbacks, fit


def train_dpo(
    ctx: RunContext, data: PreferenceData, eval_data: PreferenceData | None = None
) -> dict[str, Any]:
    """Train, save the adapter into ``ctx.adapter_dir``, and return the run's metrics."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tuneforge_trainer.progress import ProgressCallback
    from tuneforge_trainer.sft import current_names

    spec = ctx.spec
    data, eval_data = one_schema(data, eval_data)
    tokenizer = load_tokenizer(spec, ctx.base_model_dir, chat=data.format == "conversational")
    hp = resolve_hyperparameters(spec.method.params.hyperparameters, len(data))
    kwargs = dpo_config_kwargs(
        spec,
        hp,
        max_length=max_length_for(ctx.base_model_dir),
        **ctx.config_kwargs(has_eval=eval_data is not None),
    )
    model, peft_config, quantization = ctx.model_and_lora(tokenizer)
    progress = ProgressCallback(ctx.reporter)
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=DPOConfig(**current_names(kwargs, DPOConfig)),
        train_dataset=Dataset.from_list(data.records),
        eval_dataset=Dataset.from_list(eval_data.records) if eval_data is not None else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        quantization_config=quantization if peft_config is not None else None,
        callbacks=callbacks(ctx, progress),
    )
    describe = f"DPO on {len(data)} pairs ({data.format}), beta={trainer.args.beta:g}"
    return fit(trainer, ctx, progress, hp, describe=describe)
