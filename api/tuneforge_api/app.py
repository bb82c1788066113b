"""The app factory: ``create_app(settings)`` wires services, routes and error handlers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from tuneforge_api.bootstrap import ensure_default_project
from tuneforge_api.db.engine import migrate
from tuneforge_api.errors import ERROR_RESPONSES, install_handlers
from tuneforge_api.limits import BodySizeLimit
from tuneforge_api.rate_limit import RateLimiter, enforce_rate_limit
from tuneforge_api.request_id import RequestId
from tuneforge_api.routes import admin, files, health, internal, jobs, models, validate, webhooks
from tuneforge_api.routes import feedback as feedback_routes
from tuneforge_api.services import Services
from tuneforge_api.settings import Settings, load_settings
from tuneforge_api.ui import install as install_ui

# Libraries that log SQL parameters (webhook secrets) or signed S3 requests at DEBUG: held at
# INFO, so that turning the service's logging up to DEBUG cannot put a secret in a log.
SECRET_LOGGERS = ("aiosqlite", "asyncpg", "botocore", "boto3", "s3transfer", "urllib3")


def quiet_secret_loggers() -> None:
    for name in SECRET_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(max(logger.level, logging.INFO))


def create_app(
    settings: Settings | None = None, *, run_migrations: bool = True, services: Services | None = None
) -> FastAPI:
    """``services`` lets `tuneforge up` share one engine between the API and the scheduler;
    the app then leaves closing them to its owner."""
    settings = settings or load_settings(Settings)
    quiet_secret_loggers()
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
        await app.state.rate_limiter.close()
        if owned:
            await services.close()

    app = FastAPI(
        title="Tuneforge",
        version="0.1.0",
        lifespan=lifespan,
        dependencies=[Depends(enforce_rate_limit)],  # per-project request rate, on every route
        responses=ERROR_RESPONSES,  # the error envelope, documented on every operation
    )
    app.state.services = services
    app.state.rate_limiter = RateLimiter.from_settings(settings)
    install_handlers(app)
    for module in (files, jobs, models, admin, internal, health, webhooks, validate):
        app.include_router(module.router)
    app.include_router(feedback_routes.router)  # human-feedback sessions
    install_ui(app)  # the web console: /ui pages and static files (docs/console.md)
    app.add_middleware(
        BodySizeLimit,
        upload_limit=settings.max_upload_bytes,
        idle_timeout_s=settings.body_idle_timeout_s,
        min_bytes_per_s=settings.body_min_bytes_per_s,
    )
    app.add_middleware(RequestId)  # outermost: even a 413 from the size limit carries an id
    return app
