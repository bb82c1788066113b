"""Tuneforge trainer: ``python -m tuneforge_trainer --spec spec.json``.

Modules: ``config_mapping`` (pure JobSpec -> library kwargs), ``data`` (load + validate the
training file), ``tiny_model`` (the built-in base model), ``sft`` (one module per method),
``events`` / ``progress`` (reporting), ``publish`` (adapter + manifest to storage).
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
