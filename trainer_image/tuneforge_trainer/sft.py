"""Supervised fine-tuning (SFT) with TRL's SFTTrainer, of a LoRA adapter or the whole model.

Loss covers only what the model must produce (the assistant turns of chat data, or the
completion of prompt/completion data) unless ``train_on_inputs`` is set. Examples longer
than ``max_seq_length`` are truncated and reported as an event; ``packing`` packs them into
fewer, fuller sequences. The trained weights and the tokenizer are saved to
``ctx.adapter_dir``; publishing them is ``publish``'s job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tuneforge_trainer.config_mapping import resolve_hyperparameters, sft_config_kwargs, sft_options
from tuneforge_trainer.data import SFTData, as_messages
from tuneforge_trainer.modeling import load_tokenizer, max_length_for
from tuneforge_trainer.training import RunContext, callbacks, fit

PARAMS = {"train": "training_file", "eval": "validation_file"}


@dataclass(frozen=True)
class PreparedStats:
    """What data preparation did to one dataset: truncation and packing."""

    examples: int  # tokenized examples
    truncated: int  # examples longer than max_length
    max_truncated_tokens: int  # tokens cut from the longest one
    sequences: int  # rows left: packed rows, or examples minus any left with no trained token
    tokens: int  # tokens kept
    max_length: int

    @property
    def fill(self) -> float:
        return self.tokens / max(1, self.sequences * self.max_length)


def train_sft(ctx: RunContext, data: SFTData, eval_data: SFTData | None = None) -> dict[str, Any]:
    """Train, save the adapter (or full model) into ``ctx.adapter_dir``, and return the run's metrics."""
    from tuneforge_trainer.progress import ProgressCallback

    progress = ProgressCallback(ctx.reporter)
    trainer, hp = build_sft_trainer(ctx, data, eval_data, progress)
    report_preparation(ctx, getattr(trainer, "prepared", {}), packing=trainer.args.packing)
    describe = f"SFT on {len(data)} examples ({data.format})"
    if trainer.args.packing:
        describe += f", packed into {trainer.prepared['train'].sequences} sequences"
    return fit(trainer, ctx, progress, hp, describe=describe)


def build_sft_trainer(
    ctx: RunContext, data: SFTData, eval_data: SFTData | None = None, progress: Any = None
) -> tuple[Any, Any]:
    """``(trainer, resolved hyperparameters)``; the trainer's datasets are tokenized, labelled,
    truncated or packed, and ``trainer.prepared`` says what that did."""
    from datasets import Dataset
    from trl import SFTConfig

    if eval_data is not None and eval_data.format != data.format:  # one schema for both files
        data, eval_data = as_messages(data), as_messages(eval_data)
    spec = ctx.spec
    tokenizer = load_tokenizer(spec, ctx.base_model_dir, chat=data.format == "messages")
    hp = resolve_hyperparameters(spec.method.params.hyperparameters, len(data))
    max_length = max_length_for(ctx.base_model_dir, sft_options(spec).max_seq_length)
    plan = ctx.acceleration(batch_size=hp.batch_size, max_length=max_length)
    kwargs = sft_config_kwargs(
        spec,
        hp,
        data_format=data.format,
        max_length=max_length,
        **ctx.config_kwargs(has_eval=eval_data is not None, acceleration=plan),
    )
    model, peft_config, quantization = ctx.model_and_lora(tokenizer, plan)
    trainer = counting_sft_trainer_class()(
        model=model,
        args=SFTConfig(**current_names(kwargs, SFTConfig)),
        train_dataset=Dataset.from_list(data.records),
        eval_dataset=Dataset.from_list(eval_data.records) if eval_data is not None else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        quantization_config=quantization if peft_config is not None else None,
        callbacks=callbacks(ctx, progress) if progress is not None else None,
    )
    return trainer, hp


def report_preparation(ctx: RunContext, prepared: dict[str, PreparedStats], *, packing: bool) -> None:
    """One event per file that had examples truncated, and one for packing (rank 0's reporter)."""
    for name, stats in prepared.items():
        param = PARAMS.get(name, name)
        what = param.replace("_", " ")
        if stats.truncated:
            text = (
                f"{stats.truncated} of {stats.examples} examples in the {what} are longer than "
                f"max_seq_length={stats.max_length} tokens and were truncated (by up to "
                f"{stats.max_truncated_tokens} tokens)"
            )
            if not packing and stats.sequences < stats.examples:
                text += f"; {stats.examples - stats.sequences} kept no trained token and were dropped"
            _say(ctx, text, "warn", param, stats)
        if packing:
            text = (
                f"packed {stats.examples} examples of the {what} into {stats.sequences} sequences of up to "
                f"{stats.max_length} tokens ({stats.fill:.0%} full)"
            )
            _say(ctx, text, "info", param, stats)


def _say(ctx: RunContext, text: str, level: Any, param: str, stats: PreparedStats) -> None:
    print(f"[tuneforge-trainer] {text}", flush=True)
    if ctx.reporter is not None:
        data = {
            "file": param,
            "examples": stats.examples,
            "truncated_examples": stats.truncated,
            "max_truncated_tokens": stats.max_truncated_tokens,
            "max_seq_length": stats.max_length,
            "sequences": stats.sequences,
            "fill": round(stats.fill, 4),
        }
        ctx.reporter.message(text, level=level, data=data)


def counting_sft_trainer_class() -> type:
    """Built on first use so that importing this module does not import TRL."""
    from trl import SFTTrainer

    class CountingSFTTrainer(SFTTrainer):
        """SFTTrainer whose data preparation also counts what ``max_length`` truncates.

        TRL tokenizes and truncates (or packs) in one ``_prepare_dataset`` call, so the lengths
        before truncation are gone afterwards. Here the first pass tokenizes and labels with no
        length limit; the lengths are counted; the second pass, on the tokenized dataset (TRL
        skips tokenizing what has ``input_ids`` and labelling what has ``labels``), truncates or
        packs exactly as TRL would have.
        """

        def _prepare_dataset(
            self,
            dataset: Any,
            processing_class: Any,
            args: Any,
            packing: bool,
            formatting_func: Any,
            dataset_name: str,
        ) -> Any:
            max_length = args.max_length
            args.max_length = None
            try:
                tokenized = super()._prepare_dataset(
                    dataset, processing_class, args, False, formatting_func, dataset_name
                )
            finally:
                args.max_length = max_length
            prepared = super()._prepare_dataset(
                tokenized, processing_class, args, packing, None, dataset_name
            )
            if max_length is not None:
                lengths = [len(ids) for ids in tokenized["input_ids"]]
                over = [n - max_length for n in lengths if n > max_length]
                self.__dict__.setdefault("prepared", {})[dataset_name] = PreparedStats(
                    examples=len(lengths),
                    truncated=len(over),
                    max_truncated_tokens=max(over, default=0),
                    sequences=len(prepared),
                    tokens=sum(len(ids) for ids in prepared["input_ids"]),
                    max_length=max_length,
                )
            return prepared

    return CountingSFTTrainer


def current_names(kwargs: dict[str, Any], config_cls: type) -> dict[str, Any]:
    """Use transformers 5's ``activation_checkpointing`` where it exists (the old name warns)."""
    fields = getattr(config_cls, "__dataclass_fields__", {})
    if "gradient_checkpointing" in kwargs and "activation_checkpointing" in fields:
        kwargs = dict(kwargs)
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
        if "gradient_checkpointing_kwargs" in kwargs and "activation_checkpointing_kwargs" in fields:
            kwargs["activation_checkpointing_kwargs"] = kwargs.pop("gradient_checkpointing_kwargs")
    return kwargs
