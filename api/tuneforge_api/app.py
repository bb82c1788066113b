"""The app factory: ``create_app(settings)`` wires services, routes and error handlers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from tuneforge_api.bootstrap import ensure_default_project
from tuneforge_api.db.engine import migrate
from tuneforge_api.errors import install_handlers
from tuneforge_api.limits import BodySizeLimit
from tuneforge_api.request_id import RequestId
from tuneforge_api.routes import admin, files, health, internal, jobs, models, validate, webhooks
from tuneforge_api.services import Services
from tuneforge_api.settings import Settings


def create_app(
    settings: Settings | None = None, *, run_migrations: bool = True, services: Services | None = None
) -> FastAPI:
    """``services`` lets `tuneforge up` share one engine between the API and the scheduler;
    the app then leaves closing them to its owner."""
    settings = settings or Settings()
    owned = services is None
    services = services or Services.build(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if run_migrations:
            await migrate(services.engine)
            if await ensure_default_project(services):
                # The key itself goes only to the 0600 file, never to a log.
                logging.getLogger("tuneforge.api").warning(
                    "created the default project; its admin key is in %s", settings.home / "credentials"
                )
        yield
        if owned:
            await services.close()

    app = FastAPI(title="Tuneforge", version="0.1.0", lifespan=lifespan)
    app.state.services = services
    install_handlers(app)
    for module in (files, jobs, models, admin, internal, health, webhooks, validate):
        app.include_router(module.router)
    app.add_middleware(BodySizeLimit, upload_limit=settings.max_upload_bytes)
    app.add_middleware(RequestId)  # outermost: even a 413 from the size limit carries an id
    return app
