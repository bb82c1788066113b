"""The rlhf method: check the job's reward, then run PPO (ours) or GRPO / RLOO (TRL)."""

from __future__ import annotations

from typing import Any

from tuneforge.types import RlhfParams
from tuneforge_trainer.errors import ConfigError
from tuneforge_trainer.rlhf.prompts import PromptData
from tuneforge_trainer.training import RunContext


def rlhf_params(ctx: RunContext) -> RlhfParams:
    params = ctx.spec.method.rlhf
    if params is None:
        raise ConfigError(
            "missing_rlhf_params", "method.rlhf is required: an algorithm and a reward", "method.rlhf"
        )
    return params


def train_rlhf(ctx: RunContext, data: PromptData) -> dict[str, Any]:
    """Train, save the policy adapter into ``ctx.adapter_dir``, return the metrics."""
    from tuneforge_trainer.modeling import bnb_config, load_tokenizer
    from tuneforge_trainer.rlhf.rewards import build_reward_function, check_references
    from tuneforge_trainer.rlhf.roles import download_reward_model

    spec, params = ctx.spec, rlhf_params(ctx)
    reward_fn = None
    if params.reward_function is not None:  # checked before any model loads
        reward_fn = build_reward_function(params.reward_function)
        check_references(params.reward_function, data.records)
    rm_dir = None
    if params.reward_model is not None:
        if ctx.storage is None:
            raise ConfigError(
                "reward_model_not_found", "no storage to fetch the reward model from", "method.rlhf"
            )
        rm_dir = download_reward_model(spec, ctx.storage, ctx.work_dir / "reward_model")
    tokenizer = load_tokenizer(spec, ctx.base_model_dir, chat=data.conversational)
    if params.algorithm == "ppo":
        from tuneforge_trainer.rlhf.ppo import train_ppo
        from tuneforge_trainer.rlhf.roles import load_shared_base

        assert rm_dir is not None  # RlhfParams: ppo needs a reward model
        shared = load_shared_base(
            spec,
            ctx.base_model_dir,
            tokenizer,
            rm_dir,
            ctx.work_dir,
            init_adapter_dir=ctx.init_adapter_dir,
            quantization=bnb_config(spec),
        )
        return train_ppo(ctx, data, shared)
    from tuneforge_trainer.rlhf.grpo import train_group_rl

    if reward_fn is None:
        from tuneforge_trainer.rlhf.roles import RewardModelScorer

        assert rm_dir is not None
        reward_fn = RewardModelScorer(spec, ctx.base_model_dir, rm_dir, tokenizer)
    return train_group_rl(ctx, data, reward_fn, tokenizer)
