"""Entry point: ``python -m tuneforge_trainer --spec spec.json``.

Exit codes (DESIGN.md, contract 4): 0 success; 42 non-retriable (bad data, bad config,
unsupported method), after writing ``error.json`` and an error event; anything else is
retriable (a traceback goes to stderr, never into user-facing text).

Heavy imports (torch, transformers, trl) happen inside the functions that train, after the
data has been validated, so a bad file fails in about a second. With several processes
(``launch``), this process validates, prepares and runs ``torchrun``; the workers it starts
come back here and train.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from types import FrameType

from pydantic import ValidationError

from tuneforge.storage import Storage, job_prefix, open_storage
from tuneforge.types import JobSpec
from tuneforge_trainer import launch
from tuneforge_trainer.config_mapping import SUPPORTED_METHODS
from tuneforge_trainer.errors import (
    EXIT_NON_RETRIABLE,
    EXIT_OK,
    EXIT_RETRIABLE,
    ConfigError,
    NonRetriableError,
)
from tuneforge_trainer.events import EventReporter, SilentReporter
from tuneforge_trainer.tiny_model import resolve_base_model
from tuneforge_trainer.workflow import check_deepspeed, load_inputs, log, prepare_run, train_and_publish

EXIT_TERMINATED = 128 + signal.SIGTERM  # what a shell reports for SIGTERM; retriable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tuneforge-trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, type=Path, help="JobSpec as a JSON file")
    args = parser.parse_args(argv)

    _configure_environment()
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        spec = JobSpec.model_validate_json(args.spec.read_bytes())
    except (OSError, ValidationError) as exc:
        # No spec, no API or storage to report to: the log is the only channel.
        print(f"error: cannot read job spec {args.spec}: {exc}", file=sys.stderr, flush=True)
        return EXIT_NON_RETRIABLE

    # In a multi-process run only rank 0 speaks for the job.
    main_process = launch.rank() == 0
    reporter = EventReporter(spec.api_base_url, spec.job_id) if main_process else SilentReporter()
    code = EXIT_RETRIABLE
    try:
        code = _run_reporting(spec, args.spec, reporter, main_process)
        return code
    except SystemExit as exc:  # SIGTERM
        code = exc.code if isinstance(exc.code, int) else EXIT_RETRIABLE
        raise
    finally:
        reporter.close()
        launch.record_exit_code(code)


def _configure_environment() -> None:
    # Never reach for a model hub: base models are local folders or the built-in tiny model.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # Progress bars are noise in a log file; our callback prints one line per step.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # TRL 1.16 still calls transformers' renamed is_gradient_checkpointing; noise in every run's log.
    warnings.filterwarnings(
        "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
    )


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Raised as SystemExit so `finally` blocks (temp folders, torchrun children) still run, and
    # no library `except Exception` swallows it.
    print("[tuneforge-trainer] received SIGTERM, stopping", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_TERMINATED)


def _run_reporting(spec: JobSpec, spec_path: Path, reporter: EventReporter, main_process: bool) -> int:
    storage: Storage | None = None
    try:
        storage = _open_storage(spec.storage_uri)
        return run(spec, storage, reporter, spec_path=spec_path)
    except NonRetriableError as exc:
        if main_process:
            _report_failure(spec, storage, reporter, exc)
        return EXIT_NON_RETRIABLE
    except Exception as exc:  # noqa: BLE001 - any other failure is retriable by contract
        traceback.print_exc()
        # The user sees that the attempt failed and will be retried; the details stay in the log.
        reporter.message(
            f"attempt {spec.attempt} failed ({type(exc).__name__}); it will be retried", level="warn"
        )
        return EXIT_RETRIABLE


def _open_storage(uri: str) -> Storage:
    try:
        return open_storage(uri)
    except ValueError as exc:  # an unknown scheme: no retry will fix the spec
        raise ConfigError("invalid_storage_uri", str(exc), "storage_uri") from None


def run(spec: JobSpec, storage: Storage, reporter: EventReporter, *, spec_path: Path | None = None) -> int:
    worker = launch.is_worker()
    if not worker:
        log(f"job {spec.job_id} attempt {spec.attempt}: {spec.method.type.value} on {spec.base_model}")
    if spec.method.type not in SUPPORTED_METHODS:
        raise ConfigError(
            "unsupported_method", f"method {spec.method.type.value!r} is not supported yet", "method.type"
        )
    inputs = load_inputs(spec, storage)
    if not worker:
        log(f"training file ok: {inputs.describe()}")
        # The scheduler already announced the attempt; this says what the trainer found.
        reporter.message(f"Training file checked: {inputs.describe()}")
    base_model_dir = resolve_base_model(spec)

    nproc = 1 if worker else launch.requested_processes(spec)
    if nproc > 1:
        check_deepspeed(spec, inputs)  # a bad config fails here, not in every worker
    shared = launch.shared_work_dir() if worker else None
    with tempfile.TemporaryDirectory(prefix=f"tuneforge-{spec.job_id}-") as tmp:
        work_dir = shared or Path(tmp)
        # The launcher prepares once for all its workers; a worker of an outside torchrun prepares its own.
        ctx = prepare_run(spec, storage, reporter, base_model_dir, work_dir, prepared=shared is not None)
        if nproc > 1:
            assert spec_path is not None, "the launcher re-reads the spec from its file"
            return launch.run_workers(spec_path, nproc, work_dir)
        metrics = train_and_publish(ctx, inputs, storage)
    if launch.rank() == 0:
        log("adapter published")
        reporter.message(
            f"attempt {spec.attempt} succeeded: {metrics['steps']} steps, final loss "
            f"{_fmt(metrics['final_loss'])}, {metrics['trained_tokens']} trained tokens",
            data=metrics,
        )
    return EXIT_OK


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _report_failure(
    spec: JobSpec, storage: Storage | None, reporter: EventReporter, exc: NonRetriableError
) -> None:
    """error.json in storage plus an error event; either may fail without hiding the other."""
    print(f"error: {exc.code}: {exc.message}", file=sys.stderr, flush=True)
    if storage is not None:
        try:
            key = job_prefix(spec.project_id, spec.job_id) + "error.json"
            storage.put_bytes(key, json.dumps(exc.to_error(), indent=2).encode("utf-8"))
        except Exception:  # noqa: BLE001 - the error event below must still go out
            traceback.print_exc()
    reporter.message(exc.message, level="error", data={"code": exc.code, "param": exc.param})


def cli() -> None:
    """``python -m tuneforge_trainer`` and the ``tuneforge-trainer`` script."""
    try:
        code = main()
    except SystemExit as exc:  # SIGTERM, or argparse
        code = exc.code if isinstance(exc.code, int) else EXIT_RETRIABLE
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: with torch and datasets loaded it takes seconds (SIGTERM
    # must stop us promptly), and everything worth finishing was closed in main().
    os._exit(code)


if __name__ == "__main__":
    cli()
