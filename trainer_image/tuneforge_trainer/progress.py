"""Turns the Trainer's logs into progress lines (stdout) and metrics events (API)."""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tuneforge_trainer.events import EventReporter


class ProgressCallback(TrainerCallback):
    """Emits one metrics event per logged step: loss, learning rate, throughput and ETA.

    Trained tokens are the non-padding input tokens the Trainer counted
    (``include_num_input_tokens_seen="non_padding"``).
    """

    def __init__(self, reporter: EventReporter | None) -> None:
        self.reporter = reporter
        self.losses: list[float] = []
        self._start = 0.0
        self._last_time = 0.0
        self._last_tokens = 0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._start = self._last_time = time.monotonic()
        self._last_tokens = state.num_input_tokens_seen

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not logs or "loss" not in logs:  # the end-of-training summary has train_loss instead
            return
        now = time.monotonic()
        tokens = int(state.num_input_tokens_seen)
        window = max(now - self._last_time, 1e-9)
        tokens_per_second = (tokens - self._last_tokens) / window
        self._last_time, self._last_tokens = now, tokens
        step, total = state.global_step, state.max_steps
        elapsed = now - self._start
        eta = elapsed / step * (total - step) if step else None
        loss = float(logs["loss"])
        self.losses.append(loss)
        data = {
            "step": step,
            "total_steps": total,
            "train_loss": loss,
            "learning_rate": float(logs.get("learning_rate", 0.0)),
            "tokens_per_second": round(tokens_per_second, 1),
            "eta_seconds": round(eta, 1) if eta is not None else None,
            "trained_tokens": tokens,
            "epoch": round(float(logs.get("epoch", state.epoch or 0.0)), 4),
        }
        text = f"step {step}/{total}: loss={loss:.2f}"
        print(
            f"step {step}/{total}: loss={loss:.4f} lr={data['learning_rate']:.3g} "
            f"tok/s={data['tokens_per_second']:.0f}",
            flush=True,
        )
        if self.reporter is not None:
            self.reporter.metrics(text, data)
