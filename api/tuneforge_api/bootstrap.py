"""First start: the default project and its admin key."""

from __future__ import annotations

import os
from pathlib import Path

from tuneforge_api.services import Services
from tuneforge_api.store import projects

CREDENTIALS_FILE = "credentials"


async def ensure_default_project(services: Services) -> str | None:
    """Create the default project and an admin key once. Returns a generated key (to print
    once) or None when keys existed or the key came from TUNEFORGE_API_KEY."""
    async with services.sessions() as session:
        if await projects.has_any_key(session):
            given = services.settings.api_key
            if given is not None and await projects.authenticate(session, given.get_secret_value()) is None:
                # An operator-set key that is not stored yet (say, after a rotation): add it.
                project = await projects.get_project_by_name(session, projects.DEFAULT_PROJECT)
                if project is not None:
                    await projects.create_key(
                        session, project.id, name="admin", role="admin", secret=given.get_secret_value()
                    )
                    await session.commit()
            return None
        project = await projects.get_project_by_name(session, projects.DEFAULT_PROJECT)
        if project is None:
            project = await projects.create_project(session, projects.DEFAULT_PROJECT)
        given = services.settings.api_key
        key = await projects.create_key(
            session,
            project.id,
            name="admin",
            role="admin",
            secret=given.get_secret_value() if given else None,
        )
        await session.commit()
    if given is not None:
        return None
    write_credentials(services.settings.home, key.key or "")
    return key.key


def write_credentials(home: Path, key: str) -> Path:
    """Write the key with mode 0600 from the first byte (no window where others can read it)."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / CREDENTIALS_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"TUNEFORGE_API_KEY={key}\n")
    os.chmod(path, 0o600)
    return path
