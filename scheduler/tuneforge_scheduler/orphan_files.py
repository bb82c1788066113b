"""Remove file objects that no file row owns.

An upload stores its object, then commits its row; an API killed between the two leaves an
object nobody can see or delete through the API (a file delete that commits, then dies before
removing the object, leaves the same). Such an object is removed once it is older than
``older_than``: a live upload's object sits without its row only for the moment between the
store and the commit (on ``s3://``, from the start of its multipart upload), so the age must
exceed that moment, and any clock difference between the API and the storage.

The listing (``tuneforge.storage_sweep.list_file_objects``) walks storage, a page at a time,
and each page's file ids are looked up in one query: memory and query size stay bounded,
whatever the number of files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import select

from tuneforge.storage import file_key
from tuneforge.storage_sweep import StoredFile, list_file_objects
from tuneforge_api.db.tables import FileRow
from tuneforge_api.services import Services

log = logging.getLogger("tuneforge.scheduler.orphan_files")

BATCH = 500  # file ids per lookup: well under any database's limit on bound parameters


@dataclass
class OrphanSweep:
    """What one sweep removed (keys) and what it left."""

    removed: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    owned: int = 0  # old enough, but their file row exists
    young: int = 0  # too young to tell from an upload about to commit: not looked up

    @property
    def count(self) -> int:
        return len(self.removed)


async def remove_orphan_files(
    services: Services,
    older_than: timedelta,
    *,
    now: datetime | None = None,
    batch_size: int = BATCH,
) -> OrphanSweep:
    """Delete every ``projects/<p>/files/<id>`` object without a file row for (p, id) that is at
    least ``older_than`` old (by the storage's clock, or ``now`` when given)."""
    if older_than < timedelta(0):
        raise ValueError("older_than must not be negative")
    storage = services.storage
    pages = list_file_objects(storage, now=now, page_size=batch_size)
    result = OrphanSweep()
    try:
        # The listing does blocking I/O: each page is fetched on a thread.
        while (page := await asyncio.to_thread(next, pages, None)) is not None:
            stale = [obj for obj in page if obj.age >= older_than]
            result.young += len(page) - len(stale)
            if not stale:
                continue
            owned = await _owned(services, stale)
            for obj in stale:
                if (obj.project_id, obj.file_id) in owned:
                    result.owned += 1
                else:
                    await _remove(services, obj, result)
    finally:
        # A cancelled sweep (the cron's timeout) may leave a next() running on its thread; a
        # running generator cannot be closed, and is collected when that call returns.
        with contextlib.suppress(ValueError):
            pages.close()
    return result


async def _owned(services: Services, objects: list[StoredFile]) -> set[tuple[str, str]]:
    """(project, file) of the objects that have their row. Ids are unique across projects; the
    project must match as well, else the object is not where that file's object lives."""
    async with services.sessions() as session:
        rows = await session.execute(
            select(FileRow.project_id, FileRow.id).where(FileRow.id.in_([o.file_id for o in objects]))
        )
        return {(project_id, file_id) for project_id, file_id in rows.all()}


async def _remove(services: Services, obj: StoredFile, result: OrphanSweep) -> None:
    # The listing yields only file objects; this guards the one line here that deletes.
    if obj.key != file_key(obj.project_id, obj.file_id):
        raise RuntimeError(f"refusing to delete {obj.key!r}: not a file object")
    await asyncio.to_thread(services.storage.delete, obj.key)
    result.removed.append(obj.key)
    result.bytes_freed += obj.size
    log.info(
        "removed orphan file object %s (%d bytes, no file row, %d s old)",
        obj.key,
        obj.size,
        int(obj.age.total_seconds()),
    )
