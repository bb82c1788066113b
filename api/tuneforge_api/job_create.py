"""Checks and defaults for a new job: everything that can fail does so here, with a 4xx,
before any row is written or any GPU is asked for."""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.concurrency import run_in_threadpool

from tuneforge.storage import MANIFEST, adapter_prefix, checkpoint_prefix
from tuneforge.types import Job, JobCreate, JobStatus, LoraConfigSpec, Method, MethodType, Resources
from tuneforge_api import hyperparams, quotas
from tuneforge_api.checkpoints import parse_checkpoint_id
from tuneforge_api.errors import ApiError
from tuneforge_api.models_registry import base_of, ft_job_id
from tuneforge_api.services import Services
from tuneforge_api.store import files, jobs
from tuneforge_api.store.files import FileFacts
from tuneforge_api.store.ids import new_id, now
from tuneforge_api.store.projects import Principal

# Methods the trainer implements; the others are refused at create time, not in the pod.
SUPPORTED_METHODS = {MethodType.supervised, MethodType.reward_model, MethodType.dpo, MethodType.rlhf}
FORMATS_BY_METHOD = {
    MethodType.supervised: {"chat", "prompt_completion"},
    # K-way rankings are expanded into weighted pairs by the trainer.
    MethodType.reward_model: {"preference", "rankings"},
    MethodType.dpo: {"preference"},
    MethodType.rlhf: {"prompts"},
    MethodType.sample: {"prompts"},  # feedback sessions only (create_sample_job)
}


async def _usable_file(
    session: AsyncSession, principal: Principal, file_id: str, param: str, method: MethodType
) -> FileFacts:
    # hold: a share lock on the file until the job commits, so a concurrent delete waits and sees it.
    row = await files.facts(session, principal.project_id, file_id, hold=True)
    if row is None:
        raise ApiError(400, "file_not_found", f"No file found with id {file_id!r}.", param=param)
    # A file still "uploaded" is being validated in the background: the job waits in
    # validating_files, and the scheduler checks the file once validation is done.
    if row.purpose != "fine-tune" or row.status == "error":
        detail = f": {row.status_details}" if row.status_details else "."
        raise ApiError(
            400, "invalid_file", f"File {file_id!r} is not a valid fine-tune file{detail}", param=param
        )
    if row.status == "processed" and row.data_format not in FORMATS_BY_METHOD.get(method, set()):
        raise ApiError(
            400,
            "invalid_file_format",
            f"File {file_id!r} holds {row.data_format} records, which a {method.value} job cannot use.",
            param=param,
        )
    return row


async def _init_adapter_key(
    session: AsyncSession, services: Services, principal: Principal, body: JobCreate
) -> str | None:
    """The storage prefix of ``from_checkpoint``: a complete checkpoint of a finished job of
    this project, on the same base model."""
    if body.from_checkpoint is None:
        return None
    parsed = parse_checkpoint_id(body.from_checkpoint)
    source = await jobs.get_row(session, principal.project_id, parsed[0]) if parsed else None
    prefix = checkpoint_prefix(principal.project_id, source.id, parsed[1]) if source and parsed else ""
    if source is None or not await run_in_threadpool(services.storage.exists, prefix + MANIFEST):
        raise ApiError(
            400, "checkpoint_not_found", f"No checkpoint {body.from_checkpoint!r}.", param="from_checkpoint"
        )
    if not JobStatus(source.status).is_finished():
        raise ApiError(
            400, "checkpoint_job_running", f"Job {source.id} has not finished yet.", param="from_checkpoint"
        )
    if _is_full(source):
        raise ApiError(
            400,
            "invalid_checkpoint",
            f"Job {source.id} fine-tuned every weight: its checkpoints hold no adapter to start from.",
            param="from_checkpoint",
        )
    if base_of(source.model) != base_of(body.model):
        raise ApiError(
            400,
            "checkpoint_model_mismatch",
            f"The checkpoint was trained on {source.model}, not {body.model}.",
            param="from_checkpoint",
        )
    return prefix


async def _ft_model_adapter(session: AsyncSession, principal: Principal, model: str) -> str:
    """A job may start from a fine-tuned model of this project: its adapter starts the LoRA."""
    source = await jobs.get_row(session, principal.project_id, ft_job_id(model) or "")
    if source is None or source.status != JobStatus.succeeded.value or source.fine_tuned_model != model:
        raise ApiError(400, "model_not_found", f"No succeeded fine-tuned model {model!r}.", param="model")
    if _is_full(source):
        raise ApiError(
            400,
            "invalid_model",
            f"{model!r} is fully fine-tuned: a job can start only from a LoRA one.",
            param="model",
        )
    return adapter_prefix(principal.project_id, source.id)


async def _check_reward_model(session: AsyncSession, principal: Principal, job_id: str, base: str) -> None:
    param = "method.rlhf.reward_model"
    rm = await jobs.get_row(session, principal.project_id, job_id)
    if (
        rm is None
        or rm.status != JobStatus.succeeded.value
        or (rm.method or {}).get("type") != "reward_model"
    ):
        raise ApiError(
            400, "invalid_reward_model", f"{job_id!r} is not a succeeded reward_model job.", param=param
        )
    if _is_full(rm):
        raise ApiError(
            400,
            "invalid_reward_model",
            f"{job_id!r} fine-tuned every weight; PPO shares one base and needs a LoRA reward model.",
            param=param,
        )
    if base_of(rm.model) != base:
        raise ApiError(
            400,
            "reward_model_base_mismatch",
            f"The reward model was trained on {base_of(rm.model)}, the policy is on {base}.",
            param=param,
        )


SFT_ONLY_HYPERPARAMETERS = ("train_on_inputs", "packing", "max_seq_length")


def _check_trainer_options(method: Method, body: JobCreate) -> None:
    """Combinations the trainer cannot run fail here, not in the pod."""
    hp = method.params.hyperparameters
    if method.type != MethodType.supervised:
        for name in SFT_ONLY_HYPERPARAMETERS:
            if getattr(hp, name) is not None:
                raise ApiError(
                    400,
                    "invalid_hyperparameters",
                    f"{name} applies to supervised jobs only.",
                    param=f"method.{method.type.value}.hyperparameters.{name}",
                )
    if getattr(method.params, "adapter", None) == "full":
        param = f"method.{method.type.value}.adapter"
        if body.quantization is not None:
            raise ApiError(
                400,
                "invalid_adapter",
                f"Full fine-tuning trains every weight, so the base cannot be quantized "
                f"({body.quantization}); use adapter 'lora' for QLoRA, or no quantization.",
                param=param,
            )
        if body.from_checkpoint is not None or ft_job_id(body.model):
            raise ApiError(
                400,
                "invalid_adapter",
                "Full fine-tuning starts from a base model, not from a fine-tuned model or a checkpoint.",
                param=param,
            )
    stage = body.resources.zero_stage
    if stage is not None and body.resources.gpus * body.resources.nodes < 2:
        raise ApiError(
            400,
            "invalid_resources",
            f"ZeRO stage {stage} shards across GPUs: it needs resources.gpus (x nodes) of at least 2.",
            param="resources.zero_stage",
        )


def _is_full(row: Any) -> bool:
    """A job that fine-tuned every weight publishes a model folder, not an adapter."""
    method = row.method or {}
    return ((method.get(method.get("type", "")) or {}).get("adapter")) == "full"


async def create_job(session: AsyncSession, services: Services, principal: Principal, body: JobCreate) -> Job:
    try:
        method = body.resolved_method()
    except ValueError as exc:
        raise ApiError(400, "invalid_hyperparameters", str(exc), param="hyperparameters") from exc
    if method.type not in SUPPORTED_METHODS:
        raise ApiError(
            400,
            "unsupported_method",
            f"method {method.type.value!r} is not available yet.",
            param="method.type",
        )
    if method.type == MethodType.rlhf and method.rlhf is None:
        raise ApiError(
            400,
            "invalid_method",
            "An rlhf job needs method.rlhf with an algorithm and a "
            "reward_model (or, for grpo/rloo, a reward_function).",
            param="method.rlhf",
        )
    if base_of(body.model) not in services.base_models():
        raise ApiError(
            400, "model_not_found", f"Unknown base model {body.model!r}; see GET /v1/models.", param="model"
        )
    if body.resources.nodes > 1 and services.settings.executor != "kubernetes":
        raise ApiError(
            400, "invalid_resources", "Several nodes need the kubernetes executor.", param="resources.nodes"
        )
    _check_trainer_options(method, body)
    if method.type == MethodType.rlhf and method.rlhf and method.rlhf.reward_model:
        await _check_reward_model(session, principal, method.rlhf.reward_model, base_of(body.model))
    training = await _usable_file(session, principal, body.training_file, "training_file", method.type)
    if body.validation_file is not None:
        await _usable_file(session, principal, body.validation_file, "validation_file", method.type)

    init_adapter_key = await _init_adapter_key(session, services, principal, body)
    if ft_job_id(body.model):
        if init_adapter_key is not None:
            raise ApiError(
                400,
                "invalid_request",
                "Give an ft: model or from_checkpoint, not both.",
                param="from_checkpoint",
            )
        init_adapter_key = await _ft_model_adapter(session, principal, body.model)
    await quotas.check_active_jobs(session, services.settings, principal.project_id)
    hp = method.params.hyperparameters
    # Before validation there is no size yet: "auto" stays, and the scheduler resolves it.
    resolved = (
        hyperparams.resolve(hp, training.n_examples, method.type) if training.status == "processed" else hp
    )
    values = _new_job_row(
        services,
        principal,
        model=body.model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        method=method.with_hyperparameters(resolved),
        lora=body.lora,
        quantization=body.quantization,
        resources=body.resources,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        suffix=body.suffix,
        metadata=body.metadata,
        init_adapter_key=init_adapter_key,
    )
    job = await jobs.insert(session, values)
    await jobs.add_event(session, job.id, f"Created fine-tuning job {job.id}")
    return job


def _new_job_row(
    services: Services,
    principal: Principal,
    *,
    model: str,
    training_file: str,
    validation_file: str | None,
    method: Method,
    lora: LoraConfigSpec,
    quantization: str | None,
    resources: Resources,
    seed: int,
    suffix: str | None,
    metadata: dict[str, str] | None,
    init_adapter_key: str | None,
) -> dict[str, Any]:
    """The row of a job that has just been created: waiting for its files, attempt 0."""
    ts = now()
    return dict(
        id=new_id("ftjob"),
        project_id=principal.project_id,
        created_at=ts,
        updated_at=ts,
        model=model,
        status=JobStatus.validating_files.value,
        training_file=training_file,
        validation_file=validation_file,
        method=method.model_dump(mode="json", exclude_none=True),
        lora=lora.model_dump(mode="json"),
        quantization=quantization,
        resources=resources.model_dump(mode="json"),
        seed=seed,
        suffix=suffix,
        metadata_=metadata,
        attempt=0,
        max_attempts=services.settings.max_attempts,
        cancel_requested=False,
        init_adapter_key=init_adapter_key,
    )


async def create_sample_job(
    session: AsyncSession,
    services: Services,
    principal: Principal,
    *,
    model: str,
    prompts_file: str,
    method: Method,
    seed: int,
    resources: Resources,
) -> Job:
    """A feedback session's generation job: K answers per prompt, run by the executor like
    training (retries, cancel, reconcile and events come with the job lifecycle)."""
    if base_of(model) not in services.base_models():
        raise ApiError(400, "model_not_found", f"Unknown model {model!r}; see GET /v1/models.", param="model")
    if resources.nodes > 1 or resources.gpus > 1:
        raise ApiError(
            400, "invalid_resources", "Generation runs on one node with at most one GPU.", param="resources"
        )
    await _usable_file(session, principal, prompts_file, "prompts_file", MethodType.sample)
    init_adapter_key = None
    if ft_job_id(model):
        init_adapter_key = await _ft_model_adapter(session, principal, model)
        source = await jobs.get_row(session, principal.project_id, ft_job_id(model) or "")
        if source is not None and (source.method or {}).get("type") == MethodType.reward_model.value:
            raise ApiError(
                400, "invalid_model", "A reward model scores answers; it cannot write them.", param="model"
            )
    await quotas.check_active_jobs(session, services.settings, principal.project_id)
    values = _new_job_row(
        services,
        principal,
        model=model,
        training_file=prompts_file,
        validation_file=None,
        method=method,
        lora=LoraConfigSpec(),
        quantization=None,
        resources=resources,
        seed=seed,
        suffix=None,
        metadata=None,
        init_adapter_key=init_adapter_key,
    )
    job = await jobs.insert(session, values)
    await jobs.add_event(session, job.id, f"Created sample job {job.id} for a feedback session")
    return job
