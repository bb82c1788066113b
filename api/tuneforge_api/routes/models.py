"""/v1/models: base models, plus this project's finished adapters as ``ft:`` models."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from tuneforge.types import JobStatus, Model, Page
from tuneforge_api.db.tables import JobRow
from tuneforge_api.deps import PrincipalDep, ServicesDep, SessionDep
from tuneforge_api.errors import not_found

router = APIRouter(prefix="/v1/models", tags=["models"])


async def _all_models(principal: PrincipalDep, session: SessionDep, services: ServicesDep) -> list[Model]:
    models = [Model(id=name, created=0, owned_by="tuneforge") for name in services.base_models()]
    rows = await session.execute(
        select(JobRow.fine_tuned_model, JobRow.finished_at)
        .where(JobRow.project_id == principal.project_id, JobRow.status == JobStatus.succeeded.value)
        .order_by(JobRow.seq.desc())
    )
    models += [Model(id=name, created=ts or 0, owned_by=principal.project_id) for name, ts in rows if name]
    return models


@router.get("", response_model=Page[Model])
async def list_models(principal: PrincipalDep, session: SessionDep, services: ServicesDep) -> Page[Model]:
    return Page[Model](data=await _all_models(principal, session, services))


@router.get("/{model_id:path}", response_model=Model)
async def get_model(
    model_id: str, principal: PrincipalDep, session: SessionDep, services: ServicesDep
) -> Model:
    for model in await _all_models(principal, session, services):
        if model.id == model_id:
            return model
    raise not_found("model", model_id, "model")
