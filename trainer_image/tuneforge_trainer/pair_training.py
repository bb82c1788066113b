"""What DPO and reward-model training share up to their TRL trainer: one schema for the train
and eval pairs, the tokenizer, resolved hyperparameters, the TRL config fields, the model with
its LoRA config, and the arguments every TRL trainer takes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tuneforge.types import JobSpec
from tuneforge_trainer.config_mapping import ResolvedHyperparameters, resolve_hyperparameters
from tuneforge_trainer.modeling import load_tokenizer, max_length_for
from tuneforge_trainer.preference_data import PreferenceData, one_schema
from tuneforge_trainer.training import RunContext, callbacks


@dataclass
class PairRun:
    data: PreferenceData
    tokenizer: Any
    hp: ResolvedHyperparameters
    config: dict[str, Any]  # fields of the method's TRL config class
    model: Any
    progress: Any  # the ProgressCallback that fit() reads
    trainer_kwargs: dict[str, Any]  # datasets, tokenizer, LoRA, quantization, callbacks


def prepare_pair_run(
    ctx: RunContext,
    data: PreferenceData,
    eval_data: PreferenceData | None,
    config_kwargs: Callable[..., dict[str, Any]],
) -> PairRun:
    from datasets import Dataset

    from tuneforge_trainer.progress import ProgressCallback

    spec: JobSpec = ctx.spec
    data, eval_data = one_schema(data, eval_data)
    tokenizer = load_tokenizer(spec, ctx.base_model_dir, chat=data.format == "conversational")
    hp = resolve_hyperparameters(spec.method.params.hyperparameters, len(data))
    max_length = max_length_for(ctx.base_model_dir)
    plan = ctx.acceleration(batch_size=hp.batch_size, max_length=max_length)
    config = config_kwargs(
        spec,
        hp,
        max_length=max_length,
        **ctx.config_kwargs(has_eval=eval_data is not None, acceleration=plan),
    )
    model, peft_config, quantization = ctx.model_and_lora(tokenizer, plan)
    progress = ProgressCallback(ctx.reporter)
    trainer_kwargs = dict(
        train_dataset=Dataset.from_list(data.records),
        eval_dataset=Dataset.from_list(eval_data.records) if eval_data is not None else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        quantization_config=quantization if peft_config is not None else None,
        callbacks=callbacks(ctx, progress),
    )
    return PairRun(data, tokenizer, hp, config, model, progress, trainer_kwargs)
