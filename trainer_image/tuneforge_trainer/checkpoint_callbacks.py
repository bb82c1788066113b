"""Trainer callbacks for checkpoints: upload each one as the Trainer writes it; save at epoch ends too."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tuneforge.storage import Storage
from tuneforge.types import JobSpec
from tuneforge_trainer.checkpoint_store import upload_checkpoint
from tuneforge_trainer.events import EventReporter
from tuneforge_trainer.progress import ProgressCallback


class CheckpointUploader(TrainerCallback):
    """After the Trainer writes ``checkpoint-{step}``, rank 0 uploads it and posts a metrics event."""

    def __init__(
        self, storage: Storage, spec: JobSpec, reporter: EventReporter | None, progress: ProgressCallback
    ) -> None:
        self.storage = storage
        self.spec = spec
        self.reporter = reporter
        self.progress = progress
        self.uploaded: list[int] = []

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        _barrier()  # every rank's DeepSpeed shard must be on disk before rank 0 uploads the folder
        if not state.is_world_process_zero:
            return
        step = state.global_step
        folder = Path(args.output_dir) / f"checkpoint-{step}"
        metrics = {"step": step, **self.progress.metrics_at(state)}
        upload_checkpoint(self.storage, self.spec, folder, step=step, metrics=metrics)
        self.uploaded.append(step)
        print(f"[tuneforge-trainer] checkpoint step {step} uploaded", flush=True)
        if self.reporter is not None:
            self.reporter.metrics(
                f"checkpoint saved at step {step}", {"checkpoint": {"step": step}, "step": step}
            )


class EpochEndCheckpoint(TrainerCallback):
    """With ``checkpoint_every`` (save_strategy="steps"), also checkpoint at each epoch end."""

    def __init__(self) -> None:
        self._saved_step = -1

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._saved_step = state.global_step

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # The last step of the run (or a step that hit checkpoint_every) was saved already.
        if state.global_step != self._saved_step:
            control.should_save = True


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
