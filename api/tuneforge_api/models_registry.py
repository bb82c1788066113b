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
