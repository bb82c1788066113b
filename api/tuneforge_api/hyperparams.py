"""Resolve "auto" hyperparameters from the dataset size, following OpenAI's published rules."""

from __future__ import annotations

import math

from tuneforge.types import Hyperparameters, MethodType

MIN_TARGET_EXAMPLES = 100
MAX_TARGET_EXAMPLES = 25_000
DEFAULT_EPOCHS = 3


def resolve(hp: Hyperparameters, n_examples: int, method: MethodType) -> Hyperparameters:
    n = max(1, n_examples)
    epochs = hp.n_epochs
    if epochs == "auto":
        epochs = DEFAULT_EPOCHS
        if n * epochs < MIN_TARGET_EXAMPLES:
            epochs = min(25, math.ceil(MIN_TARGET_EXAMPLES / n))
        elif n * epochs > MAX_TARGET_EXAMPLES:
            epochs = max(1, MAX_TARGET_EXAMPLES // n)
    batch = hp.batch_size
    if batch == "auto":
        batch = max(1, min(256, round(n * 0.002)))
    lr = hp.learning_rate_multiplier
    if lr == "auto":
        lr = 1.0
    beta = hp.beta
    if method == MethodType.dpo and beta in (None, "auto"):
        beta = 0.1
    return Hyperparameters(
        n_epochs=epochs,
        batch_size=batch,
        learning_rate_multiplier=lr,
        beta=beta,
        eval_every=hp.eval_every,
        checkpoint_every=hp.checkpoint_every,
    )
