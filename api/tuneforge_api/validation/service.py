"""Validation inside the API: the settings, the upload-time tokenizer, and the background
validation of large files.

A file up to ``sync_max_bytes`` is validated inside its upload request (a bad one is refused and
nothing is stored). A larger one is stored first, recorded as ``uploaded``, and validated by an
asyncio task of the API process; at most ``concurrency`` such validations run at once, each in a
worker thread. The DB is the record: the task moves the file from ``uploaded`` to ``processed``
or ``error`` with a compare-and-set, and on startup every file still ``uploaded`` (an API that
stopped mid-validation) is validated again, so a restart loses nothing and two API processes
validating the same file do no harm.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.concurrency import run_in_threadpool

from tuneforge.storage import file_key
from tuneforge.types import TINY_MODEL_ID
from tuneforge_api.services import Services
from tuneforge_api.store import files
from tuneforge_api.validation.report import Report
from tuneforge_api.validation.scan import Limits, validate_jsonl
from tuneforge_api.validation.tokens import TokenSample, find_tokenizer, load, models_cache

log = logging.getLogger("tuneforge.api.validation")


class ValidationSettings(BaseSettings):
    """``TUNEFORGE_VALIDATION_*``; kept apart from ``Settings`` so that this package owns them."""

    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_VALIDATION_", extra="ignore")

    sync_max_bytes: int = Field(
        8 * 1024 * 1024, ge=0, description="Files up to this size are validated inside the upload request."
    )
    concurrency: int = Field(2, ge=1, le=64, description="Background validations running at once.")
    token_sample_bytes: int = Field(
        1024 * 1024, ge=1, description="About this much text is tokenized per file; the rest is scaled."
    )
    dedupe_cap: int = Field(1_000_000, ge=0, description="Examples remembered for duplicate detection.")
    workers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="Worker processes for files of 32 MiB or more; unset: none where the C line "
        "scanner is built, else one per CPU (at most 8, none on a single CPU); 0: validate in the "
        "API process only.",
    )

    def limits(self) -> Limits:
        return Limits(dedupe_cap=self.dedupe_cap, workers=self.workers)


def token_sample(
    services: Services, settings: ValidationSettings, size: int, model: str = TINY_MODEL_ID
) -> TokenSample | None:
    """A sampler for ``model``'s tokenizer, sized to tokenize ~``token_sample_bytes`` of a file of
    ``size`` bytes; None (the bytes/4 estimate) when the tokenizer or the library is missing."""
    folder = services.base_models().get(model)
    ref = find_tokenizer(model, folder, models_cache(services.settings.home))
    tokenizer = load(ref) if ref else None
    if ref is None or tokenizer is None:
        return None
    return TokenSample(tokenizer, ref, stride=max(1, math.ceil(size / settings.token_sample_bytes)))


def summary(report: Report) -> str:
    noun = "problem" if report.n_problems == 1 else "problems"
    return f"{report.n_problems} {noun}: {report.summary()}"


def file_outcome(report: Report) -> dict[str, Any]:
    """The columns a validated file gets."""
    return {
        "status": "processed" if report.ok else "error",
        "status_details": None if report.ok else summary(report),
        "n_examples": report.n_examples,
        "data_format": report.data_format,
        "validation": report.to_json(),
        "size_profile": report.profile.to_json(),
    }


@dataclass
class BackgroundValidation:
    """The API process's background validations (see the module docstring)."""

    services: Services
    settings: ValidationSettings
    _slots: asyncio.Semaphore = field(init=False)
    _tasks: set[asyncio.Task] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.settings.concurrency)

    def start(self, project_id: str, file_id: str) -> asyncio.Task:
        task = asyncio.create_task(self._run(project_id, file_id), name=f"validate {file_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def sweep(self) -> int:
        """Validate every file left ``uploaded``, as after a restart."""
        async with self.services.sessions() as session:
            pending = await files.uploaded(session)
        for project_id, file_id in pending:
            self.start(project_id, file_id)
        return len(pending)

    async def wait(self) -> None:
        """Until no validation runs (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _run(self, project_id: str, file_id: str) -> None:
        async with self._slots:
            try:
                report = await run_in_threadpool(self._validate, project_id, file_id)
            except FileNotFoundError:
                return  # deleted meanwhile
            except Exception:
                # Left "uploaded": the next startup sweep tries again.
                log.exception("validation of %s failed", file_id)
                return
            async with self.services.sessions() as session:
                if await files.set_validated(session, project_id, file_id, **file_outcome(report)):
                    await session.commit()

    def _validate(self, project_id: str, file_id: str) -> Report:
        storage = self.services.storage
        key = file_key(project_id, file_id)
        size = storage.size(key)
        sample = token_sample(self.services, self.settings, size)
        with storage.open_read(key) as fh:
            return validate_jsonl(fh, sample=sample, limits=self.settings.limits(), size_hint=size)
