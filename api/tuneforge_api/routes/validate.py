"""POST /v1/fine_tuning/jobs/validate: a dry run of job creation. It creates nothing.

It takes the body of ``POST /v1/fine_tuning/jobs`` and answers what creating the job would do:
the same 4xx for the same mistakes (so another project's file is "not found", as on create),
else the files' validation reports, token statistics with the job's model's tokenizer, the
resolved hyperparameters, the trained tokens, and an estimated training time.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from tuneforge.types import DryRunFile, FileValidation, Job, JobCreate, JobValidation
from tuneforge_api.db.tables import FileRow
from tuneforge_api.deps import PrincipalDep, ServicesDep, SessionDep, release
from tuneforge_api.errors import ApiError
from tuneforge_api.job_create import create_job
from tuneforge_api.services import Services
from tuneforge_api.store import files
from tuneforge_api.store.projects import Principal
from tuneforge_api.validation import throughput
from tuneforge_api.validation.dry_run import model_stats
from tuneforge_api.validation.service import ValidationSettings

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])


async def checked_job(session: SessionDep, services: Services, principal: Principal, body: JobCreate) -> Job:
    """Every create-time check, and the job that create would make, by running ``create_job`` in
    a transaction that is then rolled back: the checks cannot drift apart from create's.
    (A ``check_job`` split out of ``create_job`` would make the rollback unnecessary.)"""
    try:
        job = await create_job(session, services, principal, body)
    except ApiError as exc:
        await session.rollback()
        raise await _explained(session, principal, body, exc) from None
    await session.rollback()
    return job


async def _explained(session: SessionDep, principal: Principal, body: JobCreate, exc: ApiError) -> ApiError:
    """Create's "not a processed file" error, with what validation found in that file."""
    if exc.code != "invalid_file" or exc.param not in ("training_file", "validation_file"):
        return exc
    row = await files.get_row(session, principal.project_id, getattr(body, exc.param))
    if row is None or row.status == "processed":
        return exc
    detail = "it is still being validated" if row.status == "uploaded" else row.status_details
    return ApiError(exc.status, exc.code, f"{exc.message} ({detail})", param=exc.param)


@router.post("/validate", response_model=JobValidation)
async def validate_job(
    body: JobCreate, request: Request, principal: PrincipalDep, session: SessionDep, services: ServicesDep
) -> JobValidation:
    job = await checked_job(session, services, principal, body)
    rows = [await files.get_row_with_profile(session, principal.project_id, body.training_file)]
    if body.validation_file is not None:
        rows.append(await files.get_row_with_profile(session, principal.project_id, body.validation_file))
    await release(session)  # reading and tokenizing the files can take a while

    settings: ValidationSettings = (
        getattr(request.app.state, "validation_settings", None) or ValidationSettings()
    )
    reports = []
    for row in rows:
        assert row is not None  # create_job found it
        stats = None
        if row.status == "processed":
            stats = await run_in_threadpool(model_stats, services, settings, row, body.model)
        reports.append(_dry_run_file(row, stats))

    training = reports[0]
    n_epochs = job.hyperparameters.get("n_epochs")
    stats = training.model_stats or {}
    epochs = n_epochs if isinstance(n_epochs, int) else None
    # The job's trained_tokens counts every non-padding token it trains on (TRL's
    # num_input_tokens_seen, as OpenAI bills), so the estimate does too.
    processed = epochs * stats["total_tokens"] if epochs and "total_tokens" in stats else None
    klass = throughput.size_class(body.model, services.base_models().get(body.model))
    estimate = throughput.estimate(processed, klass, body.resources.gpus, body.resources.nodes)
    return JobValidation(
        model=body.model,
        method=body.resolved_method().type,
        ready=all(r.status == "processed" for r in reports),
        training_file=training,
        validation_file=reports[1] if len(reports) > 1 else None,
        hyperparameters=job.hyperparameters,
        estimated_trained_tokens=processed,
        estimate=estimate,
    )


def _dry_run_file(row: FileRow, stats: dict | None) -> DryRunFile:
    return DryRunFile(
        id=row.id,
        status=row.status,  # type: ignore[arg-type]
        validation=FileValidation.model_validate(row.validation) if row.validation else None,
        model_stats=stats,
    )
