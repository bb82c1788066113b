"""What every method shares around its TRL trainer: the run's context, callbacks, fit, adapter save.

Each method module (``sft``, ``reward_model``, ``dpo``) builds its config and trainer, then
hands it to ``fit``, which trains (resuming from a checkpoint when there is one), evaluates
at the end if the last step was not evaluated, saves the adapter and returns the metrics.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge.storage import Storage
from tuneforge.types import JobSpec
from tuneforge_trainer.config_mapping import ResolvedHyperparameters
from tuneforge_trainer.events import EventReporter

if TYPE_CHECKING:
    from tuneforge_trainer.acceleration import AccelerationPlan, Environment


@dataclass
class Resume:
    """A downloaded checkpoint of this job to continue from (a retried attempt)."""

    dir: Path
    step: int
    manifest: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunContext:
    """Everything a method needs besides its data."""

    spec: JobSpec
    base_model_dir: Path
    work_dir: Path
    reporter: EventReporter | None = None
    storage: Storage | None = None  # checkpoints are uploaded here when set
    resume: Resume | None = None
    init_adapter_dir: Path | None = None
    deepspeed: dict[str, Any] | None = None
    distributed: bool = False
    zero_stage: int | None = None
    environment: Environment | None = None  # the machine's facts; detected on first use when None

    @property
    def output_dir(self) -> Path:
        return self.work_dir / "trainer"

    @property
    def adapter_dir(self) -> Path:
        return self.work_dir / "adapter"

    def acceleration(self, *, batch_size: int, max_length: int) -> AccelerationPlan:
        """This run's speed features (``acceleration.plan_acceleration``), announced once by rank 0."""
        from tuneforge_trainer import acceleration as accel
        from tuneforge_trainer.config_mapping import on_cpu

        if self.environment is None:  # a CPU job needs no probing of GPUs or kernel packages
            self.environment = accel.CPU_ENVIRONMENT if on_cpu(self.spec) else accel.detect_environment()
        plan = accel.plan_acceleration(
            self.spec,
            self.environment,
            shape=accel.read_model_shape(self.base_model_dir),
            batch_tokens=accel.batch_tokens_for(self.spec, batch_size, max_length),
            zero_stage=self.zero_stage,
        )
        _announce(self, plan)
        return plan

    def model_and_lora(
        self, tokenizer: Any, acceleration: AccelerationPlan | None = None
    ) -> tuple[Any, Any, Any]:
        """``(model, peft_config, quantization)`` for this run's TRL trainer; see
        ``modeling.model_and_lora``."""
        from tuneforge_trainer.modeling import bnb_config, model_and_lora

        if self.distributed and self.zero_stage == 3:
            _init_deepspeed_comm(self.spec)
        quantization = bnb_config(self.spec, zero_stage=self.zero_stage)
        model, peft_config = model_and_lora(
            self.spec,
            self.base_model_dir,
            tokenizer,
            init_adapter_dir=self.init_adapter_dir,
            quantization=quantization,
            distributed=self.distributed,
            acceleration=acceleration,
        )
        return model, peft_config, quantization

    def config_kwargs(
        self, *, has_eval: bool, acceleration: AccelerationPlan | None = None
    ) -> dict[str, Any]:
        """The run-dependent arguments of every ``*_config_kwargs`` mapping."""
        kwargs: dict[str, Any] = {
            "output_dir": str(self.output_dir),
            "has_eval": has_eval,
            "deepspeed": self.deepspeed,
            "distributed": self.distributed,
        }
        if acceleration is not None:
            kwargs["acceleration"] = acceleration
        return kwargs


def _announce(ctx: RunContext, plan: AccelerationPlan) -> None:
    """The plan's one line, in the log and as an event, so users see which kernels ran."""
    from tuneforge_trainer import launch

    if launch.rank() != 0:
        return
    text = plan.summary()
    print(f"[tuneforge-trainer] {text}", flush=True)
    if ctx.reporter is not None:
        ctx.reporter.message(text, data=plan.as_data())


def _init_deepspeed_comm(spec: JobSpec) -> None:
    """Under ZeRO-3, ``from_pretrained`` builds the model already sharded (``deepspeed.zero.Init``),
    which sizes batches by DeepSpeed's own view of the world. On GPUs accelerate has started
    DeepSpeed's communication by then; on CPUs it starts torch.distributed alone, so DeepSpeed
    would count one process. Starting it here (it wraps an existing process group) fixes that."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if spec.resources.gpus == 0 else "nccl")


def callbacks(ctx: RunContext, progress: Any) -> list[Any]:
    from tuneforge_trainer.checkpoint_callbacks import CheckpointUploader, EpochEndCheckpoint

    found: list[Any] = [progress]
    if ctx.storage is not None:
        found.append(CheckpointUploader(ctx.storage, ctx.spec, ctx.reporter, progress))
    if ctx.spec.method.params.hyperparameters.checkpoint_every:
        found.append(EpochEndCheckpoint())
    return found


def fit(
    trainer: Any, ctx: RunContext, progress: Any, hp: ResolvedHyperparameters, *, describe: str
) -> dict[str, Any]:
    """Train, evaluate at the end if needed, save the adapter into ``ctx.adapter_dir``; return metrics."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints raw log dicts; ProgressCallback prints lines
    main = trainer.is_world_process_zero()
    if main:
        print(
            f"[tuneforge-trainer] training: {describe}, epochs={hp.n_epochs} batch_size={hp.batch_size} "
            f"lr={trainer.args.learning_rate:g} world_size={trainer.args.world_size}",
            flush=True,
        )
    resume_from = None
    if ctx.resume is not None:
        resume_from = str(ctx.resume.dir)
        if main and ctx.reporter is not None:
            ctx.reporter.message(f"resumed from step {ctx.resume.step} (attempt {ctx.spec.attempt})")
    result = trainer.train(resume_from_checkpoint=resume_from)
    state = trainer.state
    if trainer.eval_dataset is not None and progress.last_eval_step != state.global_step:
        trainer.evaluate()

    save_adapter(trainer, ctx.adapter_dir, base_model=ctx.spec.base_model)
    # The log history is part of the Trainer state, so it spans every attempt of the run.
    losses = [float(e["loss"]) for e in state.log_history if "loss" in e and "step" in e]
    return {
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "trained_tokens": int(state.num_input_tokens_seen),
        "steps": int(state.global_step),
        "train_runtime": float(result.metrics.get("train_runtime", 0.0)),
        "n_epochs": hp.n_epochs,
        "batch_size": hp.batch_size,
        "learning_rate": trainer.args.learning_rate,
        **{k: v for k, v in progress.last_train.items() if k != "train_loss"},
        **progress.last_eval,
    }


def save_adapter(trainer: Any, adapter_dir: Path, *, base_model: str) -> None:
    """Write adapter_config.json, adapter_model.safetensors and the tokenizer files (rank 0); for
    full fine-tuning, the whole model folder (config.json, model.safetensors) and the tokenizer."""
    # save_model is collective under DeepSpeed ZeRO-3 (it gathers the shards): every rank calls it.
    trainer.save_model(str(adapter_dir))
    if not trainer.is_world_process_zero():
        return
    # peft records the local folder the base came from; the public model id is what travels.
    config_path = adapter_dir / "adapter_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base_model
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # Not part of an adapter: the model card repeats local paths, training_args.bin is a pickle,
    # and "ref" is the frozen DPO reference copy of a starting adapter.
    for name in ("README.md", "training_args.bin"):
        (adapter_dir / name).unlink(missing_ok=True)
    shutil.rmtree(adapter_dir / "ref", ignore_errors=True)
