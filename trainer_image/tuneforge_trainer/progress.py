"""Turns the Trainer's logs into progress lines (stdout) and metrics events (API).

Training steps become ``train_*`` metrics, evaluations on the validation file ``valid_*``
metrics, named as OpenAI's fine-tuning events and checkpoints name them. Only the main
process (rank 0) prints and posts.
"""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tuneforge_trainer.events import EventReporter

# Extra per-step training metrics, from the names the TRL trainers log.
TRAIN_EXTRAS = {
    "mean_token_accuracy": "train_mean_token_accuracy",  # SFTTrainer
    "accuracy": "train_accuracy",  # RewardTrainer: fraction of pairs ranked right
    "margin": "train_reward_margin",  # RewardTrainer: mean r(chosen) - r(rejected)
    "rewards/accuracies": "train_accuracy",  # DPOTrainer, implicit reward
    "rewards/margins": "train_reward_margin",  # DPOTrainer
}
EVAL_METRICS = {
    "eval_loss": "valid_loss",
    "eval_mean_token_accuracy": "valid_mean_token_accuracy",
    "eval_accuracy": "valid_accuracy",
    "eval_margin": "valid_reward_margin",
    "eval_rewards/accuracies": "valid_accuracy",
    "eval_rewards/margins": "valid_reward_margin",
}


def eval_metrics(logs: dict[str, float]) -> dict[str, float]:
    """The ``valid_*`` metrics of one evaluation's logs."""
    return {ours: float(logs[theirs]) for theirs, ours in EVAL_METRICS.items() if theirs in logs}


def train_extras(logs: dict[str, float]) -> dict[str, float]:
    return {ours: float(logs[theirs]) for theirs, ours in TRAIN_EXTRAS.items() if theirs in logs}


class ProgressCallback(TrainerCallback):
    """Emits one metrics event per logged step (loss, learning rate, throughput, ETA) and per evaluation.

    Trained tokens are the non-padding input tokens the Trainer counted
    (``include_num_input_tokens_seen="non_padding"``); the count lives in the Trainer state,
    so a resumed run continues it rather than counting again.
    """

    def __init__(self, reporter: EventReporter | None) -> None:
        self.reporter = reporter
        self.losses: list[float] = []
        self.last_train: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self.last_eval_step: int | None = None
        self.evals: list[dict[str, float]] = []
        self._start = 0.0
        self._start_step = 0
        self._last_time = 0.0
        self._last_tokens = 0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._start = self._last_time = time.monotonic()
        self._start_step = state.global_step  # > 0 when resuming: the ETA counts this attempt's pace
        self._last_tokens = state.num_input_tokens_seen

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs:
            return
        if "eval_loss" in logs:
            self._on_eval(state, logs)
        elif "loss" in logs:  # the end-of-training summary has train_loss instead
            self._on_step(state, logs)

    def _on_step(self, state: TrainerState, logs: dict[str, float]) -> None:
        now = time.monotonic()
        tokens = int(state.num_input_tokens_seen)
        window = max(now - self._last_time, 1e-9)
        tokens_per_second = (tokens - self._last_tokens) / window
        self._last_time, self._last_tokens = now, tokens
        step, total = state.global_step, state.max_steps
        done = step - self._start_step
        eta = (now - self._start) / done * (total - step) if done > 0 else None
        loss = float(logs["loss"])
        self.losses.append(loss)
        data: dict[str, Any] = {
            "step": step,
            "total_steps": total,
            "train_loss": loss,
            "learning_rate": float(logs.get("learning_rate", 0.0)),
            "tokens_per_second": round(tokens_per_second, 1),
            "eta_seconds": round(eta, 1) if eta is not None else None,
            "trained_tokens": tokens,
            "epoch": round(float(logs.get("epoch", state.epoch or 0.0)), 4),
            **train_extras(logs),
        }
        self.last_train = {k: v for k, v in data.items() if k.startswith("train_")}
        if not state.is_world_process_zero:
            return
        extras = "".join(f" {k[6:]}={v:.3f}" for k, v in train_extras(logs).items())
        print(
            f"step {step}/{total}: loss={loss:.4f} lr={data['learning_rate']:.3g} "
            f"tok/s={data['tokens_per_second']:.0f}{extras}",
            flush=True,
        )
        if self.reporter is not None:
            self.reporter.metrics(f"step {step}/{total}: loss={loss:.2f}", data)

    def _on_eval(self, state: TrainerState, logs: dict[str, float]) -> None:
        metrics = eval_metrics(logs)
        self.last_eval, self.last_eval_step = metrics, state.global_step
        self.evals.append({"step": state.global_step, **metrics})
        if not state.is_world_process_zero:
            return
        shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        print(f"eval at step {state.global_step}: {shown}", flush=True)
        if self.reporter is not None:
            self.reporter.metrics(
                f"step {state.global_step}: valid_loss={metrics.get('valid_loss', float('nan')):.2f}",
                {"step": state.global_step, **metrics},
            )

    def metrics_at(self, state: TrainerState) -> dict[str, Any]:
        """What a checkpoint records: the latest train and eval metrics and the tokens so far."""
        return {**self.last_train, "trained_tokens": int(state.num_input_tokens_seen), **self.last_eval}
