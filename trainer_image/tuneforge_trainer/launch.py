"""Several processes per node: the entrypoint re-launches itself under ``torchrun``.

``resources.gpus > 1`` (or ``TUNEFORGE_TRAINER_NPROC=N``, which tests use to run 2 processes
on a CPU) makes the first process a launcher: it validates the data and the DeepSpeed config,
downloads any checkpoint once into a shared work folder, then runs
``torchrun --standalone --nproc_per_node=N -m tuneforge_trainer`` and waits. The workers train
with DeepSpeed; only rank 0 uploads and posts events.

torchrun reports any worker failure as exit 1, which would turn "bad data" (42) into
"retry". So each worker writes its exit code to a file, and the launcher returns 42 when one
of them did.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tuneforge.types import JobSpec
from tuneforge_trainer.errors import EXIT_NON_RETRIABLE, EXIT_OK, EXIT_RETRIABLE

NPROC_ENV = "TUNEFORGE_TRAINER_NPROC"
WORK_DIR_ENV = "TUNEFORGE_TRAINER_WORK_DIR"
EXIT_DIR_ENV = "TUNEFORGE_TRAINER_EXIT_DIR"
STOP_GRACE_SECONDS = 30


def requested_processes(spec: JobSpec) -> int:
    if override := os.environ.get(NPROC_ENV):
        return max(1, int(override))
    return spec.resources.gpus if spec.resources.gpus > 1 else 1


def zero_stage(spec: JobSpec) -> int:
    """The DeepSpeed ZeRO stage of a multi-process run: ``resources.zero_stage``, else 2."""
    return spec.resources.zero_stage or 2


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_worker() -> bool:
    """True inside a process that torchrun started (ours, or a multi-node executor's)."""
    return "LOCAL_RANK" in os.environ and world_size() > 1


def shared_work_dir() -> Path | None:
    """The folder the launcher prepared (data checked, checkpoints downloaded), if any."""
    value = os.environ.get(WORK_DIR_ENV)
    return Path(value) if value else None


def record_exit_code(code: int) -> None:
    """Called by each worker as it exits, for the launcher to read."""
    folder = os.environ.get(EXIT_DIR_ENV)
    if folder and is_worker():
        Path(folder, f"rank-{rank()}").write_text(str(code))


def run_workers(spec_path: Path, nproc: int, work_dir: Path) -> int:
    """Run ``nproc`` workers under torchrun on this node; returns the job's exit code."""
    with tempfile.TemporaryDirectory(prefix="tuneforge-exit-") as exit_dir:
        env = dict(os.environ)
        env.update({WORK_DIR_ENV: str(work_dir), EXIT_DIR_ENV: exit_dir})
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # a private rendezvous on a free port: several jobs may share a node
            f"--nproc_per_node={nproc}",
            "-m",
            "tuneforge_trainer",
            "--spec",
            str(spec_path),
        ]
        print(
            f"[tuneforge-trainer] launching {nproc} processes: torchrun --nproc_per_node={nproc}", flush=True
        )
        proc = subprocess.Popen(command, env=env)
        try:
            returncode = proc.wait()
        finally:
            _stop(proc)
        codes = [int(p.read_text() or EXIT_RETRIABLE) for p in Path(exit_dir).glob("rank-*")]
    return job_exit_code(returncode, codes)


def job_exit_code(torchrun_returncode: int, worker_codes: list[int]) -> int:
    """42 if any worker failed for good; else torchrun's verdict (a signal counts as retriable)."""
    if EXIT_NON_RETRIABLE in worker_codes:
        return EXIT_NON_RETRIABLE
    if torchrun_returncode == 0:
        return EXIT_OK
    return torchrun_returncode if torchrun_returncode > 0 else EXIT_RETRIABLE


def _stop(proc: subprocess.Popen[bytes]) -> None:
    # We get here early only when the launcher itself is stopped (SIGTERM): pass it on, so the
    # workers' own handlers run, then insist.
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
