"""Projects and file rows as the API commits them, for tests of what the scheduler does with files."""

from __future__ import annotations

from tuneforge_api.db.tables import FileRow
from tuneforge_api.services import Services
from tuneforge_api.store import projects
from tuneforge_api.store.ids import new_id, now


async def new_project(services: Services) -> str:
    async with services.sessions() as session:
        project = await projects.create_project(session, new_id("name"))
        await session.commit()
    return project.id


async def add_file_row(services: Services, project_id: str) -> str:
    """A committed file row, as an upload makes it; its id, for its object's key."""
    file_id = new_id("file")
    row = FileRow(
        id=file_id,
        project_id=project_id,
        filename="train.jsonl",
        purpose="fine-tune",
        bytes=5,
        created_at=now(),
        status="processed",
    )
    async with services.sessions() as session:
        session.add(row)
        await session.commit()
    return file_id
