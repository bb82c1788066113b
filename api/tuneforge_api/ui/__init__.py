"""The web console: job pages and the ranking page, served by the API (``/ui``).

Pages are small HTML shells; their scripts (``static/``) call the JSON API with the console's
session cookie, which ``deps.get_principal`` accepts in place of a Bearer key. See
``docs/console.md`` for the cookie, CSRF and Content-Security-Policy design.
"""

from __future__ import annotations

from fastapi import FastAPI


def install(app: FastAPI) -> None:
    """Mount the console's routes and static files, and its security headers on every /ui response."""
    from starlette.staticfiles import StaticFiles

    from tuneforge_api.ui.headers import SecurityHeaders
    from tuneforge_api.ui.routes import STATIC_DIR, router

    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC_DIR), name="ui-static")
    app.add_middleware(SecurityHeaders)
