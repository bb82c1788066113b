"""Base models that jobs may name: the built-in tiny model plus local HF-format folders."""

from __future__ import annotations

from pathlib import Path

TINY_MODEL_ID = "tuneforge/tiny-llama"


def base_models(models_dir: Path | None) -> dict[str, Path | None]:
    """Model id -> local folder (None: built by the trainer on first use).

    A folder ``org--name`` under ``models_dir`` is the model ``org/name``.
    """
    found: dict[str, Path | None] = {TINY_MODEL_ID: None}
    if models_dir and models_dir.is_dir():
        for folder in sorted(models_dir.iterdir()):
            if (folder / "config.json").is_file():
                found[folder.name.replace("--", "/")] = folder.resolve()
    return found
