"""Whether a job's files let it start; the scheduler asks this while the job is ``validating_files``.

A file still being validated keeps the job waiting (the reconcile loop asks again); a file in
``error`` fails the job with ``invalid_training_file`` (or ``invalid_validation_file``) and its
first problems; a processed file of the wrong format for the method fails it too. Hyperparameters
left ``"auto"`` at create time (the dataset size was not known yet) are resolved here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.concurrency import run_in_threadpool

from tuneforge.storage import Storage, file_key
from tuneforge.types import Method
from tuneforge_api import hyperparams
from tuneforge_api.db.tables import FileRow, JobRow
from tuneforge_api.store import files

SHOWN_PROBLEMS = 5


@dataclass(frozen=True)
class Verdict:
    wait: bool = False
    error: dict[str, Any] | None = None
    method: dict[str, Any] | None = None  # the job's method with "auto" resolved, when it changed


def _problems(row: FileRow) -> str:
    report = row.validation or {}
    shown = [
        f"line {p['line']}: {p['message']} [{p['code']}]"
        if p.get("line")
        else f"{p['message']} [{p['code']}]"
        for p in report.get("problems", [])[:SHOWN_PROBLEMS]
    ]
    more = report.get("n_problems", len(shown)) - len(shown)
    return "; ".join(shown) + (f"; and {more} more problems" if more > 0 else "") or (
        row.status_details or ""
    )


async def check_job_files(session: AsyncSession, storage: Storage, job: JobRow) -> Verdict:
    from tuneforge_api.job_create import FORMATS_BY_METHOD  # job_create imports much; keep this module light

    method = Method.model_validate(job.method)
    training: FileRow | None = None
    for param, file_id in (("training_file", job.training_file), ("validation_file", job.validation_file)):
        if file_id is None:
            continue
        row = await files.get_row(session, job.project_id, file_id)
        if row is None or not await run_in_threadpool(storage.exists, file_key(job.project_id, file_id)):
            return Verdict(
                error={
                    "code": "file_not_found",
                    "message": f"File {file_id} is gone from storage.",
                    "param": param,
                }
            )
        if row.status == "uploaded":
            return Verdict(wait=True)
        what = param.replace("_", " ")
        if row.status == "error":
            message = f"The {what} {file_id} is not a valid dataset: {_problems(row)}"
            return Verdict(error={"code": f"invalid_{param}", "message": message, "param": param})
        if row.data_format not in FORMATS_BY_METHOD.get(method.type, set()):
            job_kind = method.type.value
            message = (
                f"The {what} {file_id} holds {row.data_format} records, which a {job_kind} job cannot use."
            )
            return Verdict(error={"code": "invalid_file_format", "message": message, "param": param})
        if param == "training_file":
            training = row
    hp = method.params.hyperparameters
    if training is not None and "auto" in (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier):
        resolved = hyperparams.resolve(hp, training.n_examples, method.type)
        return Verdict(
            method=method.with_hyperparameters(resolved).model_dump(mode="json", exclude_none=True)
        )
    return Verdict()
