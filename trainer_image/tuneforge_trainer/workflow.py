"""One attempt of a job, step by step: load and check the data, fetch checkpoints, train, publish.

``__main__`` drives these steps and turns failures into exit codes; the launcher of a
multi-process run does the first two once and its workers do the rest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.storage import Storage
from tuneforge.types import JobSpec, MethodType
from tuneforge_trainer import launch
from tuneforge_trainer.checkpoint_store import CheckpointError, download_checkpoint
from tuneforge_trainer.config_mapping import on_cpu, resolve_hyperparameters
from tuneforge_trainer.data import SFTData, load_sft_file
from tuneforge_trainer.deepspeed_mapping import deepspeed_config
from tuneforge_trainer.errors import ConfigError
from tuneforge_trainer.events import EventReporter
from tuneforge_trainer.preference_data import PreferenceData, load_preference_file
from tuneforge_trainer.rlhf.prompts import PromptData, load_prompt_file
from tuneforge_trainer.training import Resume, RunContext

RESUME_DIR, RESUME_MANIFEST, INIT_ADAPTER_DIR = "resume", "resume-manifest.json", "init_adapter"


def log(text: str) -> None:
    print(f"[tuneforge-trainer] {text}", flush=True)


@dataclass
class Inputs:
    """The validated training file and, when the job has one, the validation file."""

    train: SFTData | PreferenceData | PromptData
    eval: SFTData | PreferenceData | PromptData | None = None

    def describe(self) -> str:
        train = self.train
        if isinstance(train, PreferenceData) and len(train) != train.n_examples:
            return f"{train.n_examples} examples ({len(train)} pairs)"
        return f"{len(train)} examples"


def load_inputs(spec: JobSpec, storage: Storage) -> Inputs:
    """Download and validate the files; DataError (exit 42) lists each bad line."""

    def load(key: str, param: str) -> SFTData | PreferenceData | PromptData:
        if spec.method.type == MethodType.supervised:
            return load_sft_file(storage, key, param)
        if spec.method.type == MethodType.rlhf:  # prompts only: the policy writes the answers
            return load_prompt_file(storage, key, param)
        if spec.method.type == MethodType.sample:  # prompts to answer for a feedback session
            return load_prompt_file(storage, key, param)
        # K-way rankings train a reward model; DPO takes pairs.
        return load_preference_file(
            storage, key, allow_rankings=spec.method.type == MethodType.reward_model, param=param
        )

    if spec.method.type == MethodType.rlhf and spec.method.rlhf is None:
        message = "method.rlhf is required: an algorithm and a reward"
        raise ConfigError("missing_rlhf_params", message, "method.rlhf")
    train = load(spec.training_file_key, "training_file")
    evaluation = load(spec.validation_file_key, "validation_file") if spec.validation_file_key else None
    return Inputs(train, evaluation)


def prepare_run(
    spec: JobSpec,
    storage: Storage,
    reporter: EventReporter,
    base_model_dir: Path,
    work_dir: Path,
    *,
    prepared: bool = False,
) -> RunContext:
    """Fetch the checkpoints the spec names into ``work_dir`` (unless ``prepared``); the run's context."""
    if not prepared:
        _download_checkpoints(spec, storage, reporter, work_dir)
    resume = None
    if (work_dir / RESUME_MANIFEST).is_file():
        manifest = json.loads((work_dir / RESUME_MANIFEST).read_text())
        resume = Resume(work_dir / RESUME_DIR, int(manifest["step"]), manifest)
    init_dir = work_dir / INIT_ADAPTER_DIR
    distributed = launch.is_worker()
    zero_stage = launch.zero_stage(spec) if distributed else None
    return RunContext(
        spec=spec,
        base_model_dir=base_model_dir,
        work_dir=work_dir,
        reporter=reporter,
        storage=storage,
        resume=resume,
        init_adapter_dir=init_dir if init_dir.is_dir() else None,
        deepspeed=deepspeed_config(spec, zero_stage=zero_stage) if zero_stage else None,
        distributed=distributed,
        zero_stage=zero_stage,
    )


def _download_checkpoints(spec: JobSpec, storage: Storage, reporter: EventReporter, work_dir: Path) -> None:
    if spec.resume_from_key:
        try:
            manifest = download_checkpoint(storage, spec.resume_from_key, work_dir / RESUME_DIR)
        except CheckpointError as exc:
            # Retrying cannot repair the checkpoint; starting over still finishes the job.
            log(f"cannot resume: {exc}")
            reporter.message(f"checkpoint unusable, training from the start: {exc}", level="warn")
        else:
            (work_dir / RESUME_MANIFEST).write_text(json.dumps(manifest))
    if spec.init_adapter_key:
        try:
            download_checkpoint(
                storage,
                spec.init_adapter_key,
                work_dir / INIT_ADAPTER_DIR,
                only=lambda n: n.startswith("adapter_"),
            )
        except CheckpointError as exc:
            raise ConfigError("checkpoint_not_found", str(exc), "from_checkpoint") from None


def check_deepspeed(spec: JobSpec, inputs: Inputs) -> None:
    """Validate the generated DeepSpeed config with DeepSpeed's own config class, before any worker starts."""
    try:
        from tuneforge_trainer.deepspeed_mapping import validate_deepspeed_config

        hp = resolve_hyperparameters(spec.method.params.hyperparameters, len(inputs.train))
        config = deepspeed_config(spec, zero_stage=launch.zero_stage(spec))
        validate_deepspeed_config(config, micro_batch_size=hp.batch_size, bf16=not on_cpu(spec))
    except ImportError:
        raise ConfigError(
            "deepspeed_unavailable",
            "this trainer image has no DeepSpeed for multi-GPU runs",
            "resources.gpus",
        ) from None
    except ValueError as exc:
        raise ConfigError("invalid_deepspeed_config", str(exc), "resources") from None


def train_and_publish(ctx: RunContext, inputs: Inputs, storage: Storage) -> dict[str, Any]:
    """Train with the job's method; rank 0 then publishes the adapter with its manifest."""
    from tuneforge_trainer.publish import publish_adapter

    method = ctx.spec.method.type
    if method == MethodType.sample:  # answers for a feedback session: no adapter to publish
        from tuneforge_trainer.sample import generate_and_publish

        return generate_and_publish(ctx, inputs.train, storage)  # type: ignore[arg-type]
    if method == MethodType.supervised:
        from tuneforge_trainer.sft import train_sft

        metrics = train_sft(ctx, inputs.train, inputs.eval)  # type: ignore[arg-type]
    elif method == MethodType.rlhf:
        from tuneforge_trainer.rlhf.train import train_rlhf

        metrics = train_rlhf(ctx, inputs.train)  # type: ignore[arg-type]
    elif method == MethodType.reward_model:
        from tuneforge_trainer.reward_model import train_reward_model

        metrics = train_reward_model(ctx, inputs.train, inputs.eval)  # type: ignore[arg-type]
    else:
        from tuneforge_trainer.dpo import train_dpo

        metrics = train_dpo(ctx, inputs.train, inputs.eval)  # type: ignore[arg-type]
    if launch.rank() == 0:
        log(f"trained: {json.dumps(metrics)}")
        publish_adapter(storage, ctx.spec, ctx.adapter_dir, metrics)
    return metrics
