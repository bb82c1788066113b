"""Job lifecycle: the short, idempotent steps that move a job through its states.

Every step re-reads the job from the DB and changes it with a compare-and-set, so a
step that runs twice, late or beside another (arq delivers at least once) does no harm.

    validating_files --submit--> queued --submit--> running --finalize--> succeeded | failed
            \\                       \\                 |  \\-- retriable exit --> queued (next attempt)
             `-------- cancel -------`----------------'---> cancelled
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field

from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from tuneforge.storage import (
    MANIFEST,
    adapter_prefix,
    checkpoint_prefix,
    complete_checkpoint_steps,
    file_key,
    job_prefix,
)
from tuneforge.types import JobSpec, JobStatus, LoraConfigSpec, Method, Resources
from tuneforge_api.db.tables import JobRow
from tuneforge_api.feedback.ingest import samples_prefix, settle_for_job
from tuneforge_api.models_registry import base_of
from tuneforge_api.services import Services
from tuneforge_api.store import jobs
from tuneforge_api.store.ids import hash_secret, new_secret
from tuneforge_scheduler.executors import Executor, RunState, RunStatus, run_name

log = logging.getLogger("tuneforge.scheduler")

EXIT_OK = 0
EXIT_NON_RETRIABLE = 42


@dataclass
class Scheduler:
    services: Services
    executor: Executor
    # One scheduler process owns the local capacity check; Kueue does it on Kubernetes.
    _capacity_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Why each running job is not progressing, as last reported (quota, scheduling, image pull).
    _last_detail: dict[str, str] = field(default_factory=dict)
    # Jobs whose attempt this process is starting: until the run is recorded, reconcile must
    # not take it for a lost one (a relaunch would replace the token the trainer was given).
    _launching: set[str] = field(default_factory=set)

    async def submit(self, job_id: str) -> None:
        async with self.services.sessions() as session:
            row = await jobs.get_row_any_project(session, job_id)
            if row is None or JobStatus(row.status).is_finished():
                return
            if row.cancel_requested:
                await self._mark_cancelled(row)
                return
            if row.status == JobStatus.validating_files.value:
                await self._validate_files(session, row)
                await session.commit()
                await session.refresh(row)
            if row.status == JobStatus.queued.value:
                self._launching.add(row.id)
                try:
                    await self._start_attempt(session, row)
                finally:
                    self._launching.discard(row.id)

    async def _validate_files(self, session, row: JobRow) -> None:
        """Queue the job once its files are validated; fail it on a bad or missing file. While a
        file is still being validated the job stays ``validating_files`` and reconcile asks again."""
        from tuneforge_api.validation.job_files import check_job_files

        verdict = await check_job_files(session, self.services.storage, row)
        if verdict.wait:
            return
        if verdict.error is not None:
            if await jobs.transition(
                session, row.id, (JobStatus.validating_files,), JobStatus.failed, error=verdict.error
            ):
                await jobs.add_event(session, row.id, verdict.error["message"], level="error")
            return
        if verdict.method is not None:
            await jobs.update_fields(session, row.id, method=verdict.method)
        if await jobs.transition(session, row.id, (JobStatus.validating_files,), JobStatus.queued):
            await jobs.add_event(session, row.id, "Files validated; job queued")

    async def _start_attempt(self, session, row: JobRow) -> None:
        async with self._capacity_lock:
            running = await session.scalar(
                select(func.count()).select_from(JobRow).where(JobRow.status == JobStatus.running.value)
            )
            if running >= self.executor.max_concurrent:
                return  # stays queued; the reconcile loop tries again
            attempt = row.attempt + 1
            token = new_secret("tfjob")
            # Commit "running" before launching: a crash in between leaves a run that is
            # "missing", which reconcile relaunches; the other order could leave an orphan.
            if not await jobs.transition(
                session,
                row.id,
                (JobStatus.queued,),
                JobStatus.running,
                attempt=attempt,
                token_hash=hash_secret(token),
            ):
                return
            await jobs.add_event(session, row.id, f"Attempt {attempt} started", data={"attempt": attempt})
            await session.commit()
        await session.refresh(row)
        await self._launch(row, token)

    async def _launch(self, row: JobRow, token: str) -> None:
        steps = await run_in_threadpool(
            complete_checkpoint_steps, self.services.storage, row.project_id, row.id
        )
        resume = checkpoint_prefix(row.project_id, row.id, steps[-1]) if steps and row.attempt > 1 else None
        spec = self.build_spec(row, resume_from_key=resume)
        env = {"TUNEFORGE_JOB_TOKEN": token, "TUNEFORGE_HOME": str(self.services.settings.home)}
        await run_in_threadpool(self.executor.submit, run_name(row.id, row.attempt), spec, env)

    def build_spec(self, row: JobRow, *, resume_from_key: str | None = None) -> JobSpec:
        base = base_of(row.model)
        path = self.services.base_models().get(base)
        method = Method.model_validate(row.method)
        reward_job = method.rlhf.reward_model if method.rlhf else None
        return JobSpec(
            job_id=row.id,
            project_id=row.project_id,
            attempt=row.attempt,
            base_model=base,
            base_model_path=str(path) if path else None,
            method=method,
            lora=LoraConfigSpec.model_validate(row.lora),
            quantization=row.quantization,  # type: ignore[arg-type]
            resources=Resources.model_validate(row.resources),
            seed=row.seed,
            training_file_key=file_key(row.project_id, row.training_file),
            validation_file_key=file_key(row.project_id, row.validation_file)
            if row.validation_file
            else None,
            storage_uri=self.services.storage.uri,
            api_base_url=self.services.settings.public_url,
            resume_from_key=resume_from_key,
            init_adapter_key=row.init_adapter_key,
            reward_model_key=adapter_prefix(row.project_id, reward_job) if reward_job else None,
            samples_prefix=_output_prefix(row) if _is_sample(row) else None,
        )

    async def cancel(self, job_id: str) -> None:
        async with self.services.sessions() as session:
            row = await jobs.get_row_any_project(session, job_id)
        if row is None:
            return
        if row.attempt:
            # Stop the process first, so nothing writes to storage after we clean it.
            await run_in_threadpool(self.executor.cancel, run_name(row.id, row.attempt))
        if row.status == JobStatus.running.value and row.cancel_requested:
            await self._mark_cancelled(row)

    async def _mark_cancelled(self, row: JobRow) -> None:
        async with self.services.sessions() as session:
            if await jobs.transition(
                session,
                row.id,
                (JobStatus.validating_files, JobStatus.queued, JobStatus.running),
                JobStatus.cancelled,
            ):
                await jobs.add_event(session, row.id, "Job cancelled")
                await session.commit()
                # Nothing of a cancelled job is published, even a finished upload.
                await run_in_threadpool(self.services.storage.delete_prefix, _output_prefix(row))
        await self._settle_feedback(row)

    async def finalize(self, row: JobRow, status: RunStatus) -> None:
        """Record how an attempt ended: success, a clear failure, or a retry."""
        if row.cancel_requested:
            await self.cancel(row.id)
            return
        if status.state == RunState.missing:
            await self._relaunch(row)
            return
        storage = self.services.storage
        prefix = job_prefix(row.project_id, row.id)
        if status.exit_code == EXIT_OK:
            manifest = await run_in_threadpool(_read_json, storage, _output_prefix(row) + MANIFEST)
            if manifest is not None:
                await self._succeed(row, manifest)
                await self._release(row)
                return
            published = "samples" if _is_sample(row) else "an adapter"
            status = RunStatus(RunState.exited, -1, f"the trainer exited 0 without publishing {published}")
        if status.exit_code == EXIT_NON_RETRIABLE:
            error = await run_in_threadpool(_read_json, storage, prefix + "error.json") or {}
            await self._fail(
                row,
                {
                    "code": str(error.get("code") or "training_failed"),
                    "message": str(error.get("message") or status.detail or "The trainer rejected the job."),
                    "param": error.get("param"),
                },
            )
            await self._release(row)
            return
        await self._retry_or_fail(row, status)
        await self._release(row)

    async def _release(self, row: JobRow) -> None:
        """The attempt's end is recorded: an executor that keeps runs listed may let this one go."""
        release = getattr(self.executor, "release", None)
        if release is not None:
            await run_in_threadpool(release, run_name(row.id, row.attempt))

    async def _succeed(self, row: JobRow, manifest: dict) -> None:
        metrics = manifest.get("metrics") or {}
        suffix = row.suffix or ""
        # A sample job (feedback session) publishes answers, not a model.
        fine_tuned = None if _is_sample(row) else f"ft:{row.model}:{row.project_id}:{suffix}:{row.id}"
        async with self.services.sessions() as session:
            if await jobs.transition(
                session,
                row.id,
                (JobStatus.running,),
                JobStatus.succeeded,
                fine_tuned_model=fine_tuned,
                trained_tokens=metrics.get("trained_tokens"),
                estimated_finish=None,
            ):
                await jobs.add_event(session, row.id, "The job has successfully completed", data=metrics)
                await session.commit()
        await self._settle_feedback(row)

    async def _fail(self, row: JobRow, error: dict) -> None:
        async with self.services.sessions() as session:
            if await jobs.transition(
                session, row.id, (JobStatus.running,), JobStatus.failed, error=error, estimated_finish=None
            ):
                await jobs.add_event(
                    session,
                    row.id,
                    f"Job failed: {error['message']}",
                    level="error",
                    data={"code": error["code"]},
                )
                await session.commit()
        await self._settle_feedback(row)

    async def _settle_feedback(self, row: JobRow) -> None:
        """A feedback session's sample job ended: ingest its samples, or pass on its outcome.
        Best effort: reading the session settles it too."""
        if not _is_sample(row):
            return
        try:
            await settle_for_job(self.services, row.id)
        except Exception:
            log.exception("settling the feedback session of %s failed", row.id)

    async def _retry_or_fail(self, row: JobRow, status: RunStatus) -> None:
        if status.interrupted:
            await self._resume_interrupted(row)
            return
        what = f"exit code {status.exit_code}" if status.exit_code is not None else status.detail
        if row.attempt >= row.max_attempts:
            await self._fail(
                row,
                {
                    "code": "training_failed",
                    "param": None,
                    "message": f"The trainer failed {row.attempt} times; last: {what}.",
                },
            )
            return
        async with self.services.sessions() as session:
            if await jobs.transition(
                session, row.id, (JobStatus.running,), JobStatus.queued, token_hash=None
            ):
                await jobs.add_event(
                    session,
                    row.id,
                    f"Attempt {row.attempt} failed ({what}); retrying",
                    level="warn",
                    data={"attempt": row.attempt, "exit_code": status.exit_code},
                )
                await session.commit()
        await self.submit(row.id)

    async def _report_detail(self, row: JobRow, detail: str) -> None:
        """An event each time the executor's account of a running attempt changes. After a
        scheduler restart the current one is posted once more, which is harmless."""
        self._last_detail[row.id] = detail
        if not detail:
            return
        level = "info" if detail.startswith("Waiting for quota") else "warn"
        async with self.services.sessions() as session:
            await jobs.add_event(session, row.id, detail, level=level, data={"attempt": row.attempt})
            await session.commit()

    async def _resume_interrupted(self, row: JobRow) -> None:
        """The service stopped this attempt: run another one, without charging a failure
        (the attempt budget grows by one, so only real failures use it up)."""
        async with self.services.sessions() as session:
            if await jobs.transition(
                session,
                row.id,
                (JobStatus.running,),
                JobStatus.queued,
                token_hash=None,
                max_attempts=row.max_attempts + 1,
            ):
                await jobs.add_event(
                    session,
                    row.id,
                    f"The service stopped during attempt {row.attempt}; resuming",
                    data={"attempt": row.attempt},
                )
                await session.commit()
        await self.submit(row.id)

    async def _relaunch(self, row: JobRow) -> None:
        """The attempt was recorded but never started (a crash between commit and launch)."""
        token = new_secret("tfjob")
        async with self.services.sessions() as session:
            await jobs.update_fields(session, row.id, token_hash=hash_secret(token))
            await session.commit()
        await self._launch(row, token)

    async def reconcile(self) -> None:
        """Compare the DB with the executor and repair differences. Costs O(active jobs)."""
        async with self.services.sessions() as session:
            active = await jobs.active_rows(session)
        refresh = getattr(self.executor, "refresh", None)  # one LIST per pass instead of one GET per job
        if refresh is not None and any(row.status == JobStatus.running.value for row in active):
            try:
                await run_in_threadpool(refresh)
            except Exception:  # status() falls back to asking about each run
                log.exception("executor refresh failed")
        for row in active:
            try:
                if row.status != JobStatus.running.value:
                    await self.submit(row.id)
                    continue
                status = await run_in_threadpool(self.executor.status, run_name(row.id, row.attempt))
                if row.cancel_requested:
                    await self.cancel(row.id)
                elif status.state != RunState.running and row.id not in self._launching:
                    self._last_detail.pop(row.id, None)
                    await self.finalize(row, status)
                elif status.detail != self._last_detail.get(row.id, ""):
                    await self._report_detail(row, status.detail)
            except Exception:  # one bad job must not stop the pass for the others
                log.exception("reconcile failed for %s", row.id)
        try:
            await self._reap_orphans(active)
        except Exception:
            log.exception("orphan sweep failed")

    async def _reap_orphans(self, active: list[JobRow]) -> None:
        """Runs the executor still has that no running attempt owns (their job is gone, finished or
        on another attempt): checked against the DB, deleted by the executor after a grace period."""
        candidates = getattr(self.executor, "orphan_candidates", None)
        if candidates is None:
            return
        from tuneforge_scheduler.k8s.orphans import orphan_reasons

        expected = {run_name(r.id, r.attempt) for r in active if r.status == JobStatus.running.value}
        found = await run_in_threadpool(candidates, expected)
        reasons: dict[str, str] = {}
        if found:
            async with self.services.sessions() as session:  # fresh rows: this pass may have moved them
                reasons = await orphan_reasons(session, found)
        await run_in_threadpool(self.executor.reap_orphans, reasons)  # type: ignore[attr-defined]


def _is_sample(row: JobRow) -> bool:
    return (row.method or {}).get("type") == "sample"


def _output_prefix(row: JobRow) -> str:
    """Where the trainer publishes: a sample job's samples, else the adapter; manifest last."""
    if _is_sample(row):
        return samples_prefix(row.project_id, row.id)
    return adapter_prefix(row.project_id, row.id)


def _read_json(storage, key: str) -> dict | None:
    try:
        return json.loads(storage.get_bytes(key))
    except (FileNotFoundError, KeyError, ValueError):
        return None
