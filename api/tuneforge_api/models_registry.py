"""Base models that jobs may name: the built-in tiny model plus local HF-format folders."""

from __future__ import annotations

from pathlib import Path

from tuneforge.types import TINY_MODEL_ID


def base_models(models_dir: Path | None) -> dict[str, Path | None]:
    """Model id -> local folder (None: built by the trainer on first use).

    A folder ``org--name`` under ``models_dir`` is the model ``org/name``.
    """
    found: dict[str, Path | None] = {TINY_MODEL_ID: None}
    if models_dir and models_dir.is_dir():
        for folder in sorted(models_dir.iterdir()):
            # Dot-folders are temp or hidden (a model being built or copied in): never serve them.
            if not folder.name.startswith(".") and (folder / "config.json").is_file():
                found[folder.name.replace("--", "/")] = folder.resolve()
    return found


def base_of(model: str) -> str:
    """The base model under a model name: ``ft:<base>:<project>:<suffix>:<job>`` -> ``<base>``."""
    return model[3:].rsplit(":", 3)[0] if model.startswith("ft:") else model


def ft_job_id(model: str) -> str | None:
    """The job that produced an ``ft:`` model, or None for a base model."""
    return model.rsplit(":", 1)[-1] if model.startswith("ft:") and model.count(":") >= 4 else None
