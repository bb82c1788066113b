"""Reward model: a scalar head on the base (sequence classification, 1 label) plus LoRA, TRL's RewardTrainer.

The loss is Bradley-Terry on pairs, ``-log σ(r(chosen) − r(rejected))``. Pairs expanded from
a K-way ranking carry a weight (see ``preference_data``): TRL's RewardTrainer has no per-pair
weights, so ``WeightedRewardTrainer`` overrides ``compute_loss`` to average ``weight · loss``
instead. We chose that over "all pairs of one prompt in one batch" (InstructGPT's batching):
it keeps TRL's collator, shuffling and batch size, works with any K, and weights of mean 1
make a pairs-only file train exactly as plain TRL does.

Pairwise accuracy on the validation file is the exact fraction of pairs with
r(chosen) > r(rejected) (TRL averages per-batch means, which a short last batch skews).
"""

from __future__ import annotations

from typing import Any

from tuneforge_trainer.config_mapping import reward_config_kwargs
from tuneforge_trainer.pair_training import prepare_pair_run
from tuneforge_trainer.preference_data import PreferenceData
from tuneforge_trainer.training import RunContext, fit


def train_reward_model(
    ctx: RunContext, data: PreferenceData, eval_data: PreferenceData | None = None
) -> dict[str, Any]:
    """Train, save the adapter (LoRA + score head) into ``ctx.adapter_dir``, return the metrics."""
    from trl import RewardConfig

    from tuneforge_trainer.sft import current_names

    run = prepare_pair_run(ctx, data, eval_data, reward_config_kwargs)
    trainer = weighted_reward_trainer_class()(
        model=run.model,
        args=RewardConfig(**current_names(run.config, RewardConfig)),
        **run.trainer_kwargs,
    )
    # The classifier pools the last non-pad token, so the model must know the pad id (TRL sets it too).
    trainer.model.config.pad_token_id = run.tokenizer.pad_token_id
    describe = f"reward model on {len(run.data)} pairs from {run.data.n_examples} prompts ({run.data.format})"
    return fit(trainer, ctx, run.progress, run.hp, describe=describe)


def pairwise_loss(chosen: Any, rejected: Any, weight: Any = None) -> Any:
    """Bradley-Terry loss of reward tensors, each pair's term times its weight (mean-1 weights)."""
    import torch.nn.functional as F

    losses = -F.logsigmoid(chosen - rejected)
    return losses.mean() if weight is None else (weight.to(losses.dtype) * losses).mean()


def weighted_reward_trainer_class() -> type:
    """Built on first use so that importing this module does not import torch or TRL."""
    import torch
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    class WeightedCollator(DataCollatorForPreference):
        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            batch = super().torch_call(examples)
            if "weight" in examples[0]:
                batch["weight"] = torch.tensor([e["weight"] for e in examples], dtype=torch.float)
            return batch

    class WeightedRewardTrainer(RewardTrainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            tokenizer = kwargs["processing_class"]
            config = kwargs["args"]
            kwargs["data_collator"] = WeightedCollator(
                pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=config.pad_to_multiple_of
            )
            super().__init__(*args, **kwargs)
            self._eval_pairs = [0, 0]  # right, total

        def _set_signature_columns_if_needed(self) -> None:
            if self._signature_columns is None:
                self._signature_columns = ["chosen_ids", "rejected_ids", "margin", "weight"]

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            weight = inputs.pop("weight", None)
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
            chosen, rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
            if weight is not None:
                loss = pairwise_loss(chosen, rejected, weight)
            if not model.training:
                with torch.no_grad():
                    counts = torch.tensor(
                        [(chosen > rejected).sum().item(), chosen.numel()], device=chosen.device
                    )
                    counts = self.accelerator.gather_for_metrics(counts.unsqueeze(0)).sum(dim=0)
                self._eval_pairs[0] += int(counts[0])
                self._eval_pairs[1] += int(counts[1])
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            right, total = self._eval_pairs
            if not self.model.training and total:
                self._metrics["eval"]["accuracy"] = [right / total]  # TRL's log averages this list
                self._eval_pairs = [0, 0]
            super().log(logs, start_time)

    return WeightedRewardTrainer
