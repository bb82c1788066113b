"""Tuneforge trainer: ``python -m tuneforge_trainer --spec spec.json``.

Modules, in the order a run meets them:

- ``__main__``: the CLI, exit codes, error reporting; ``workflow``: the steps of one attempt;
  ``launch``: re-launch under torchrun for several processes.
- ``config_mapping`` and ``deepspeed_mapping``: pure JobSpec -> library kwargs (no torch).
- ``data`` (SFT) and ``preference_data`` (reward_model, dpo): load and validate the files.
- ``modeling``: tokenizer, base model, LoRA; ``training``: what every method shares (fit).
- One module per method: ``sft``, ``reward_model``, ``dpo``.
- ``progress`` (metrics events), ``checkpoint_callbacks`` / ``checkpoint_store`` (resumable
  checkpoints in storage), ``publish`` (adapter + manifest), ``events``, ``tiny_model``.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
