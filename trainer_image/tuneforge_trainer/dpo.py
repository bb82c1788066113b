"""Direct Preference Optimization (DPO) of a LoRA adapter with TRL's DPOTrainer.

The reference policy is the base model with the adapter disabled: the trainer gets a peft
config and no ``ref_model``, so no second copy of the weights is loaded. (A job started from
another job's checkpoint gets TRL's frozen copy of that adapter as its reference instead:
the policy it starts from.) ``beta`` comes from the hyperparameters, default 0.1.
"""

from __future__ import annotations

from typing import Any

from tuneforge_trainer.config_mapping import dpo_config_kwargs
from tuneforge_trainer.pair_training import prepare_pair_run
from tuneforge_trainer.preference_data import PreferenceData
from tuneforge_trainer.training import RunContext, fit


def train_dpo(
    ctx: RunContext, data: PreferenceData, eval_data: PreferenceData | None = None
) -> dict[str, Any]:
    """Train, save the adapter into ``ctx.adapter_dir``, and return the run's metrics."""
    from trl import DPOConfig, DPOTrainer

    from tuneforge_trainer.sft import current_names

    run = prepare_pair_run(ctx, data, eval_data, dpo_config_kwargs)
    trainer = DPOTrainer(
        model=run.model,
        ref_model=None,
        args=DPOConfig(**current_names(run.config, DPOConfig)),
        **run.trainer_kwargs,
    )
    describe = f"DPO on {len(run.data)} pairs ({run.data.format}), beta={trainer.args.beta:g}"
    return fit(trainer, ctx, run.progress, run.hp, describe=describe)
