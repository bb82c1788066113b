"""The sweep of file objects that no file row owns, with a real database (SQLite, and PostgreSQL
when it runs) and both storage backends: an orphan goes once it is older than the age, a younger
one stays, an object with its row stays whatever its age, and nothing but file objects is ever
listed or removed. Ages come from a ``now`` moved forward (or an mtime set back), never from
sleeping."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import boto3
import pytest
from sqlalchemy import event

from tests.scheduler.file_rows import add_file_row, new_project
from tuneforge.s3_storage import S3Storage
from tuneforge.storage import FileStorage, Storage, file_key
from tuneforge.storage_sweep import StoredFile, list_file_objects
from tuneforge_api.db.engine import migrate
from tuneforge_api.services import Services
from tuneforge_api.store.ids import new_id
from tuneforge_scheduler.orphan_files import remove_orphan_files
from tuneforge_scheduler.settings import SchedulerSettings

DAY = timedelta(days=1)
SECOND = timedelta(seconds=1)

# Not file objects, in every test's storage: a job's outputs, and a deeper key under files/.
NOT_FILES = ["projects/{p}/jobs/job-1/adapter/model.bin", "projects/{p}/files/nested/inner"]


@pytest.fixture(params=["file", "s3"])
def storage_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return (tmp_path / "storage").as_uri()
    return f"s3://{request.getfixturevalue('s3_bucket')}/tf"


@pytest.fixture
async def services(tmp_path: Path, database_url: str, storage_uri: str) -> AsyncIterator[Services]:
    settings = SchedulerSettings(home=tmp_path / "home", database_url=database_url, storage_uri=storage_uri)
    built = Services.build(settings)
    await migrate(built.engine)
    yield built
    await built.close()


def modified(storage: Storage, key: str) -> datetime:
    """The object's last write by the storage's clock: what its age is measured from."""
    if isinstance(storage, FileStorage):
        return datetime.fromtimestamp((storage.root / key).stat().st_mtime, timezone.utc)
    assert isinstance(storage, S3Storage)
    return boto3.client("s3").head_object(Bucket=storage.bucket, Key=storage.prefix + key)["LastModified"]


def everything(storage: Storage) -> list[str]:
    return storage.list("")


async def test_an_orphan_goes_once_stale_and_an_owned_object_never(services: Services) -> None:
    storage = services.storage
    project = await new_project(services)
    owned = file_key(project, await add_file_row(services, project))
    orphan = file_key(project, new_id("file"))  # stored, then the API died before the commit
    others = [k.format(p=project) for k in NOT_FILES]
    for key in [owned, orphan, *others]:
        storage.put_bytes(key, b"bytes")
    first, last = sorted(modified(storage, k) for k in [owned, orphan])

    young = await remove_orphan_files(services, DAY, now=first + DAY - SECOND)
    assert young.removed == [] and young.young == 2 and young.owned == 0
    assert everything(storage) == sorted([owned, orphan, *others])

    stale = await remove_orphan_files(services, DAY, now=last + DAY)
    assert stale.removed == [orphan] and stale.bytes_freed == 5
    assert stale.owned == 1 and stale.young == 0
    assert everything(storage) == sorted([owned, *others])

    years = await remove_orphan_files(services, DAY, now=last + 3650 * DAY)
    assert years.removed == [] and years.owned == 1
    assert everything(storage) == sorted([owned, *others]) and storage.get_bytes(owned) == b"bytes"


async def test_a_row_of_another_project_does_not_own_the_object(services: Services) -> None:
    """Ids are unique across projects: an object under another project's folder is not that
    file's object (a deleted project's objects have no rows at all, and go too)."""
    storage = services.storage
    mine, theirs = await new_project(services), await new_project(services)
    file_id = await add_file_row(services, theirs)
    misplaced, gone_project = file_key(mine, file_id), file_key("proj-deleted", new_id("file"))
    storage.put_bytes(file_key(theirs, file_id), b"real")
    storage.put_bytes(misplaced, b"copy")
    storage.put_bytes(gone_project, b"left")

    result = await remove_orphan_files(services, timedelta(0), now=datetime.now(timezone.utc) + DAY)

    assert sorted(result.removed) == sorted([misplaced, gone_project]) and result.owned == 1
    assert everything(storage) == [file_key(theirs, file_id)]


@pytest.mark.parametrize("storage_uri", ["file"], indirect=True)  # S3 cannot set LastModified
async def test_file_ages_are_each_objects_own(services: Services) -> None:
    """One sweep, objects of mixed ages (file://, where a test can set an mtime back)."""
    storage = services.storage
    assert isinstance(storage, FileStorage)
    project = await new_project(services)
    owned_old = file_key(project, await add_file_row(services, project))
    orphans = {hours: file_key(project, new_id("file")) for hours in (3, 1)}
    for key in [owned_old, *orphans.values()]:
        storage.put_bytes(key, b"bytes")
    for key, hours in [(owned_old, 48), *((k, h) for h, k in orphans.items())]:
        then = datetime.now(timezone.utc).timestamp() - hours * 3600
        os.utime(storage.root / key, (then, then))

    result = await remove_orphan_files(services, timedelta(hours=2))

    assert result.removed == [orphans[3]] and result.young == 1 and result.owned == 1
    assert everything(storage) == sorted([owned_old, orphans[1]])


@pytest.fixture
def file_queries(services: Services) -> Iterator[list[str]]:
    """The SQL statements that read the files table, as the engine sends them."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "FROM files" in statement:
            seen.append(statement)

    event.listen(services.engine.sync_engine, "before_cursor_execute", record)
    yield seen
    event.remove(services.engine.sync_engine, "before_cursor_execute", record)


async def test_ids_are_looked_up_a_batch_at_a_time(services: Services, file_queries: list[str]) -> None:
    storage = services.storage
    project = await new_project(services)
    owned = [file_key(project, await add_file_row(services, project)) for _ in range(2)]
    orphans = [file_key(project, new_id("file")) for _ in range(3)]
    for key in owned + orphans:
        storage.put_bytes(key, b"x")
    file_queries.clear()

    result = await remove_orphan_files(
        services, timedelta(0), now=datetime.now(timezone.utc) + DAY, batch_size=2
    )

    assert sorted(result.removed) == sorted(orphans) and result.owned == 2
    assert len(file_queries) == 3  # five objects, two ids per query
    assert everything(storage) == sorted(owned)


async def test_young_objects_cost_no_query(services: Services, file_queries: list[str]) -> None:
    project = await new_project(services)
    services.storage.put_bytes(file_key(project, new_id("file")), b"x")
    file_queries.clear()
    result = await remove_orphan_files(services, DAY)
    assert result.young == 1 and result.removed == [] and file_queries == []


async def test_a_negative_age_is_refused(services: Services) -> None:
    with pytest.raises(ValueError):
        await remove_orphan_files(services, timedelta(seconds=-1))


# --- The storage side alone ----------------------------------------------------------------------


def test_listing_yields_file_objects_only_in_pages(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "store")
    keys = [file_key("p1", f"file-{i}") for i in range(5)] + [file_key("p2", "file-x")]
    for key in keys + [k.format(p="p1") for k in NOT_FILES] + ["elsewhere/projects/p/files/f"]:
        storage.put_bytes(key, b"x")
    (storage.root / "projects" / "p1" / "files" / "link").symlink_to(storage.root / keys[0])
    (storage.root / "projects" / "p3").mkdir()  # a project folder without files/

    pages = list(list_file_objects(storage, page_size=2))

    assert all(0 < len(page) <= 2 and len({o.project_id for o in page}) == 1 for page in pages)
    found = [o for page in pages for o in page]
    assert sorted(o.key for o in found) == sorted(keys)
    assert all(o.key == file_key(o.project_id, o.file_id) and o.size == 1 for o in found)


def test_listing_an_empty_storage_yields_nothing(tmp_path: Path) -> None:
    assert list(list_file_objects(FileStorage(tmp_path / "store"))) == []


def test_listing_refuses_what_it_cannot_judge(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "store")
    with pytest.raises(ValueError):
        list_file_objects(storage, now=datetime(2030, 1, 1))  # naive: which zone?
    with pytest.raises(ValueError):
        list_file_objects(storage, page_size=0)
    with pytest.raises(TypeError):
        list_file_objects(object())  # type: ignore[arg-type]


def test_s3_ages_follow_the_servers_clock_not_the_local_one(s3_bucket: str) -> None:
    """A server whose Date says two days later makes a fresh object two days old: the local
    clock, which may be skewed, is not what ages are measured by."""
    client = boto3.client("s3")
    storage = S3Storage(s3_bucket, "tf", client=client)
    storage.put_bytes(file_key("p", "file-1"), b"x")
    assert [o.age < timedelta(minutes=5) for page in list_file_objects(storage) for o in page] == [True]

    def server_two_days_later(parsed: dict, **_: Any) -> None:
        headers = parsed["ResponseMetadata"]["HTTPHeaders"]
        later = datetime.now(timezone.utc) + 2 * DAY
        headers["date"] = later.strftime("%a, %d %b %Y %H:%M:%S GMT")

    client.meta.events.register("after-call.s3.ListObjectsV2", server_two_days_later)
    ages = [o.age for page in list_file_objects(storage) for o in page]
    assert len(ages) == 1 and 2 * DAY - timedelta(minutes=5) < ages[0] <= 2 * DAY + SECOND


def test_s3_listing_stays_under_the_storage_prefix(s3_bucket: str) -> None:
    storage = S3Storage(s3_bucket, "tf")
    other = S3Storage(s3_bucket, "tf2")
    storage.put_bytes(file_key("p", "file-1"), b"x")
    other.put_bytes(file_key("p", "file-2"), b"x")
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="tf/projects/p/files/", Body=b"")  # a folder marker
    for key in NOT_FILES:
        storage.put_bytes(key.format(p="p"), b"x")

    found = [o for page in list_file_objects(storage) for o in page]

    assert [(o.key, o.project_id, o.file_id) for o in found] == [(file_key("p", "file-1"), "p", "file-1")]
    assert isinstance(found[0], StoredFile)
