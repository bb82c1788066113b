"""Checkpoints are read from storage: a folder counts once its manifest exists, so storage
is the only record that cannot disagree with what a resume would load."""

from __future__ import annotations

import json
import re

from tuneforge.storage import MANIFEST, Storage, checkpoint_prefix, complete_checkpoint_steps
from tuneforge.types import Checkpoint
from tuneforge_api.db.tables import JobRow

_ID = re.compile(r"^ftckpt-([0-9a-f]+)-(\d+)$")


def checkpoint_id(job_id: str, step: int) -> str:
    return f"ftckpt-{job_id.removeprefix('ftjob-')}-{step}"


def parse_checkpoint_id(value: str) -> tuple[str, int] | None:
    """(job id, step) of a checkpoint id, or None when it is not one."""
    match = _ID.match(value)
    return (f"ftjob-{match[1]}", int(match[2])) if match else None


def list_checkpoints(storage: Storage, row: JobRow) -> list[Checkpoint]:
    """The job's complete checkpoints, newest first."""
    found = []
    for step in reversed(complete_checkpoint_steps(storage, row.project_id, row.id)):
        try:
            manifest = json.loads(
                storage.get_bytes(checkpoint_prefix(row.project_id, row.id, step) + MANIFEST)
            )
        except (FileNotFoundError, ValueError):
            continue
        base = row.fine_tuned_model or f"ft:{row.model}:{row.project_id}:{row.suffix or ''}:{row.id}"
        found.append(
            Checkpoint(
                id=checkpoint_id(row.id, step),
                created_at=int(manifest.get("created_at") or row.created_at),
                fine_tuned_model_checkpoint=f"{base}:ckpt-step-{step}",
                fine_tuning_job_id=row.id,
                step_number=step,
                metrics=manifest.get("metrics") or {},
            )
        )
    return found
