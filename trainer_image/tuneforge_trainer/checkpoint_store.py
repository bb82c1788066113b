"""Resumable checkpoints in storage: upload a folder the HF Trainer wrote, manifest last; download to resume.

A checkpoint is ``checkpoint_prefix(project, job, step)`` holding the Trainer's folder
(adapter, optimizer.pt, scheduler.pt, rng_state*.pth, trainer_state.json, DeepSpeed shards
when distributed) and then ``manifest.json``. The manifest is written last, so a checkpoint
without one does not exist (``complete_checkpoint_steps``) and a reader never resumes from a
half-uploaded folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneforge.storage import MANIFEST, Storage, checkpoint_prefix, put_dir
from tuneforge.types import JobSpec
from tuneforge_trainer.publish import sha256_file

CHECKPOINT_MANIFEST_VERSION = 1


def build_checkpoint_manifest(
    folder: Path, *, step: int, attempt: int, metrics: dict[str, Any], created_at: int | None = None
) -> dict[str, Any]:
    """``{step, files: {relative name: sha256}, metrics, created_at, attempt}`` for one local folder."""
    files = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    return {
        "manifest_version": CHECKPOINT_MANIFEST_VERSION,
        "step": step,
        "files": files,
        "metrics": metrics,
        "created_at": int(time.time()) if created_at is None else created_at,
        "attempt": attempt,
    }


def upload_checkpoint(
    storage: Storage, spec: JobSpec, folder: Path, *, step: int, metrics: dict[str, Any]
) -> dict[str, Any]:
    """Upload ``folder`` as the checkpoint of ``step``, manifest last; returns the manifest."""
    prefix = checkpoint_prefix(spec.project_id, spec.job_id, step)
    manifest = build_checkpoint_manifest(folder, step=step, attempt=spec.attempt, metrics=metrics)
    storage.delete_prefix(prefix)  # debris of an attempt that died mid-upload
    put_dir(storage, folder, prefix, skip={MANIFEST})
    storage.put_bytes(prefix + MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))
    return manifest


class CheckpointError(Exception):
    """A checkpoint in storage is missing its manifest or does not match it."""


def download_checkpoint(
    storage: Storage, prefix: str, dest: Path, *, only: Callable[[str], bool] | None = None
) -> dict[str, Any]:
    """Download a complete checkpoint (or its files that ``only`` accepts) into ``dest``, checked
    against the manifest; returns the manifest."""
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    try:
        manifest = json.loads(storage.get_bytes(prefix + MANIFEST))
    except FileNotFoundError:
        raise CheckpointError(f"{prefix} has no manifest, so it is not a complete checkpoint") from None
    dest.mkdir(parents=True, exist_ok=True)
    for name, digest in manifest["files"].items():
        if only is not None and not only(name):
            continue
        path = dest / name
        try:
            storage.get_file(prefix + name, path)
        except FileNotFoundError:
            raise CheckpointError(f"{prefix}{name} is listed in the manifest but missing") from None
        if sha256_file(path) != digest:
            raise CheckpointError(f"{prefix}{name} does not match its manifest checksum")
    return manifest
