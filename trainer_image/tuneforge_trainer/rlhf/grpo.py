"""GRPO and RLOO through TRL's GRPOTrainer / RLOOTrainer (they do these well; PPO is ours).

The reward is either the RM job's model (``roles.RewardModelScorer``, a TRL reward function)
or a built-in rule from ``rewards``. Config mapping, CPU-safe like the other methods (use_cpu,
bf16 off, no gradient checkpointing on CPU), plus:

- ``num_generations`` answers per prompt; the per-step batch is ``batch_size`` answers rounded
  up to a multiple of it (TRL needs whole groups);
- ``max_new_tokens`` → ``max_completion_length``, ``temperature``, ``kl_coef`` → ``beta``,
  ``clip_range`` → ``epsilon``, ``ppo_epochs`` → ``num_iterations``.
"""

from __future__ import annotations

import math
from typing import Any

from tuneforge.types import JobSpec, RlhfHyperparameters
from tuneforge_trainer.config_mapping import ResolvedHyperparameters, training_args_kwargs
from tuneforge_trainer.progress import ProgressCallback
from tuneforge_trainer.rlhf.prompts import PromptData
from tuneforge_trainer.training import RunContext, callbacks, fit

# TRL's per-step logs -> the metric names PPO reports too.
RL_METRICS = {
    "reward": "reward_mean",
    "reward_std": "reward_std",
    "kl": "kl",
    "entropy": "entropy",
    "clip_ratio/region_mean": "clip_frac",
    "clip_ratio": "clip_frac",
    "completions/mean_length": "response_length",
}


def group_batch_size(hp: ResolvedHyperparameters, rl: RlhfHyperparameters) -> int:
    """Answers per micro-batch: whole groups of ``num_generations``, at least ``batch_size``."""
    return max(1, math.ceil(hp.batch_size / rl.num_generations)) * rl.num_generations


def group_config_kwargs(
    spec: JobSpec, hp: ResolvedHyperparameters, *, output_dir: str, **common: Any
) -> dict[str, Any]:
    """Arguments for ``trl.GRPOConfig`` / ``trl.RLOOConfig`` (pure; no torch)."""
    rl: RlhfHyperparameters = spec.method.rlhf.hyperparameters  # type: ignore[union-attr]
    kwargs = training_args_kwargs(spec, hp, output_dir=output_dir, **common)
    batch = group_batch_size(hp, rl)
    kwargs.update(
        per_device_train_batch_size=batch,
        per_device_eval_batch_size=batch,
        num_generations=rl.num_generations,
        max_completion_length=rl.max_new_tokens,
        temperature=rl.temperature,
        beta=rl.kl_coef,
        epsilon=rl.clip_range,
        num_iterations=rl.ppo_epochs,
        log_completions=False,
    )
    kwargs.pop("include_num_input_tokens_seen", None)
    return kwargs


class _RlReporter:
    """Adds the latest RL metrics to each metrics event ProgressCallback posts."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.extra: dict[str, float] = {}

    def metrics(self, text: str, data: dict[str, Any]) -> bool:
        return self.inner.metrics(text, {**data, **self.extra})

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class RlProgressCallback(ProgressCallback):
    def __init__(self, reporter: Any) -> None:
        super().__init__(_RlReporter(reporter) if reporter is not None else None)
        self.rewards: list[float] = []

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any
    ) -> None:
        if logs and "loss" in logs:
            extra = {ours: float(logs[theirs]) for theirs, ours in RL_METRICS.items() if theirs in logs}
            if "reward_mean" in extra:
                self.rewards.append(extra["reward_mean"])
            if self.reporter is not None:
                self.reporter.extra = extra  # type: ignore[attr-defined]
            self.last_rl = extra
        super().on_log(args, state, control, logs=logs, **kw)


def train_group_rl(ctx: RunContext, data: PromptData, reward_fn: Any, tokenizer: Any) -> dict[str, Any]:
    """GRPO or RLOO per the spec; saves the policy adapter into ``ctx.adapter_dir``; returns metrics."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from tuneforge_trainer.config_mapping import resolve_hyperparameters
    from tuneforge_trainer.modeling import max_length_for
    from tuneforge_trainer.sft import current_names

    spec = ctx.spec
    algorithm = spec.method.rlhf.algorithm  # type: ignore[union-attr]
    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if algorithm == "grpo" else (RLOOConfig, RLOOTrainer)
    hp = resolve_hyperparameters(spec.method.params.hyperparameters, len(data))
    rl: RlhfHyperparameters = spec.method.rlhf.hyperparameters  # type: ignore[union-attr]
    # A prompt and its answer stay within the default length: the plan needs only a bound.
    plan = ctx.acceleration(
        batch_size=group_batch_size(hp, rl), max_length=max_length_for(ctx.base_model_dir)
    )
    kwargs = group_config_kwargs(spec, hp, **ctx.config_kwargs(has_eval=False, acceleration=plan))
    model, peft_config, quantization = ctx.model_and_lora(tokenizer, plan)
    progress = RlProgressCallback(ctx.reporter)
    trainer = trainer_cls(
        model=model,
        reward_funcs=[reward_fn],
        args=config_cls(**current_names(kwargs, config_cls)),
        train_dataset=Dataset.from_list(data.records),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks(ctx, progress),
    )
    describe = (
        f"{algorithm.upper()} on {len(data)} prompts, {kwargs['num_generations']} answers each, "
        f"reward {getattr(reward_fn, '__name__', 'reward_model')}"
    )
    metrics = fit(trainer, ctx, progress, hp, describe=describe)
    metrics.update(algorithm=algorithm, **getattr(progress, "last_rl", {}))
    if progress.rewards:
        metrics["first_reward_mean"] = progress.rewards[0]
    return metrics
