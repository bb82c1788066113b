"""Remove what a killed writer leaves behind in storage.

A process that is SIGKILLed mid-write runs no cleanup: on ``file://`` its temp file (a copy
in flight, or an upload's spool) stays in ``<root>/.tmp/``; on ``s3://`` its multipart upload
stays open, invisible but billed for its parts. Neither is ever a visible object, so removing
them loses nothing, provided the writer is really gone: a live writer keeps its temp file's
mtime fresh, and a live multipart upload is younger than ``older_than`` (S3 lifecycle rules
commonly abort after one day).

It also lists the objects of files (``projects/<p>/files/<id>``) with their ages, for the
scheduler's sweep of objects that no file record owns (an upload killed between storing its
object and committing its row); that sweep asks the DB, which this module does not know.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Generator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Any

from tuneforge.storage import TMP_DIR, FileStorage, Storage, check_key, file_key

log = logging.getLogger("tuneforge.storage_sweep")

DEFAULT_STALE_AGE = timedelta(days=1)


@dataclass
class SweepResult:
    """What one sweep removed (``removed``: temp file names, or ``key#upload_id``) and left."""

    removed: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    kept: int = 0  # incomplete writes still young enough to be alive

    @property
    def count(self) -> int:
        return len(self.removed)


def sweep_incomplete(
    storage: Storage, older_than: timedelta = DEFAULT_STALE_AGE, now: datetime | None = None
) -> SweepResult:
    """Delete incomplete writes (``file://`` temp files, ``s3://`` multipart uploads under the
    storage's prefix) last touched or started at least ``older_than`` before ``now``."""
    if older_than < timedelta(0):
        raise ValueError("older_than must not be negative")
    now = now or datetime.now(timezone.utc)
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    cutoff = now - older_than
    if isinstance(storage, FileStorage):
        return _sweep_file(storage, cutoff)
    if _is_s3(storage):
        return _sweep_s3(storage, cutoff)
    raise TypeError(f"no sweep for storage backend {type(storage).__name__}")


def _sweep_file(storage: FileStorage, cutoff: datetime) -> SweepResult:
    result = SweepResult()
    limit = cutoff.timestamp()
    try:
        entries = list(os.scandir(storage.root / TMP_DIR))
    except FileNotFoundError:
        return result
    for entry in entries:
        try:
            # Only plain files: FileStorage puts nothing else there, so anything else is not ours.
            if not entry.is_file(follow_symlinks=False):
                continue
            stat = entry.stat(follow_symlinks=False)
            if stat.st_mtime > limit:
                result.kept += 1
                continue
            os.unlink(entry.path)
        except FileNotFoundError:  # renamed into place or removed meanwhile
            continue
        # A spool already published is a second name of the object: removing it frees nothing.
        freed = stat.st_size if stat.st_nlink == 1 else 0
        result.removed.append(entry.name)
        result.bytes_freed += freed
        log.info("removed stale temp file %s/%s (%d bytes freed)", TMP_DIR, entry.name, freed)
    return result


def _sweep_s3(storage: Any, cutoff: datetime) -> SweepResult:
    from botocore.exceptions import ClientError

    # S3Storage exposes no public client; its own one carries the endpoint and checksum config.
    s3, bucket = storage._s3, storage.bucket
    result = SweepResult()
    stale = []
    # Only under projects/, where every Tuneforge key lives: with no storage prefix the bucket
    # may hold other applications' uploads, which are not ours to abort.
    ours = storage.prefix + "projects/"
    for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=ours):
        for upload in page.get("Uploads", []):
            if upload["Initiated"] <= cutoff:
                stale.append(upload)
            else:
                result.kept += 1
    for upload in stale:
        key, upload_id = upload["Key"], upload["UploadId"]
        size = _parts_bytes(s3, bucket, key, upload_id)
        try:
            s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchUpload", "404"):
                continue  # completed or aborted meanwhile
            raise
        result.removed.append(f"{key}#{upload_id}")
        result.bytes_freed += size
        log.info(
            "aborted stale multipart upload of %s started %s (%d bytes of parts)",
            key,
            upload["Initiated"].isoformat(),
            size,
        )
    return result


def _parts_bytes(s3: Any, bucket: str, key: str, upload_id: str) -> int:
    """Bytes held by an upload's parts, for the log only: 0 when they cannot be listed."""
    from botocore.exceptions import ClientError

    try:
        pages = s3.get_paginator("list_parts").paginate(Bucket=bucket, Key=key, UploadId=upload_id)
        return sum(part["Size"] for page in pages for part in page.get("Parts", []))
    except ClientError:
        return 0


# --- File objects that may have lost their record ------------------------------------------------

PROJECTS = "projects/"


@dataclass(frozen=True)
class StoredFile:
    """An object at ``projects/<project_id>/files/<file_id>``, with its age by the storage's clock."""

    key: str
    project_id: str
    file_id: str
    size: int
    age: timedelta


def list_file_objects(
    storage: Storage, now: datetime | None = None, page_size: int = 1000
) -> Generator[list[StoredFile], None, None]:
    """Every object directly under a ``projects/<p>/files/`` folder (a file's object), in batches
    of at most ``page_size`` from one project each; nothing deeper, nothing elsewhere (jobs/).

    Projects are found in storage, not in the DB, so a project's objects are found whatever its
    rows say. Age is ``now`` minus the object's last write (``file://``: its mtime; ``s3://``:
    LastModified, which for a multipart upload is when the upload began). Without ``now`` it is
    the storage's own clock: the local one for ``file://``, and on ``s3://`` the server's, from
    each listing's Date header, so a skewed local clock cannot make a fresh object look old."""
    if page_size < 1:
        raise ValueError("page_size must be at least 1")
    if now is not None and now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if isinstance(storage, FileStorage):
        return _file_objects_file(storage, now, page_size)
    if _is_s3(storage):
        return _file_objects_s3(storage, now, page_size)
    raise TypeError(f"no file listing for storage backend {type(storage).__name__}")


def _is_s3(storage: Storage) -> bool:
    try:
        from tuneforge.s3_storage import S3Storage
    except ImportError:  # boto3 not installed: an S3Storage cannot exist either
        return False
    return isinstance(storage, S3Storage)


def _stored_file(project_id: str, file_id: str, size: int, age: timedelta) -> StoredFile | None:
    """The entry, if both names are plain key segments (anything else is no file of ours)."""
    if not project_id or not file_id or "/" in project_id or "/" in file_id:
        return None
    key = file_key(project_id, file_id)
    try:
        check_key(key)
    except ValueError:
        return None
    return StoredFile(key, project_id, file_id, size, age)


def _file_objects_file(
    storage: FileStorage, now: datetime | None, page_size: int
) -> Generator[list[StoredFile], None, None]:
    try:
        projects = [e for e in os.scandir(storage.root / PROJECTS) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return
    for project in projects:
        try:
            entries = os.scandir(os.path.join(project.path, "files"))
        except (FileNotFoundError, NotADirectoryError):
            continue
        batch: list[StoredFile] = []
        with entries:
            for entry in entries:
                try:
                    # Plain files only: a symlink or a folder here is nothing FileStorage wrote.
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    stat = entry.stat(follow_symlinks=False)
                except FileNotFoundError:  # deleted meanwhile
                    continue
                clock = now or datetime.now(timezone.utc)
                age = clock - datetime.fromtimestamp(stat.st_mtime, timezone.utc)
                if found := _stored_file(project.name, entry.name, stat.st_size, age):
                    batch.append(found)
                if len(batch) >= page_size:
                    yield batch
                    batch = []
        if batch:
            yield batch


def _file_objects_s3(
    storage: Any, now: datetime | None, page_size: int
) -> Generator[list[StoredFile], None, None]:
    s3, bucket = storage._s3, storage.bucket
    root = storage.prefix + PROJECTS
    listing = s3.get_paginator("list_objects_v2")
    # Delimiter "/": one entry per project folder, never the (many) objects of its jobs.
    for page in listing.paginate(Bucket=bucket, Prefix=root, Delimiter="/"):
        for common in page.get("CommonPrefixes", []):
            project_id = common["Prefix"][len(root) :].rstrip("/")
            folder = f"{common['Prefix']}files/"
            config = {"PageSize": min(page_size, 1000)}
            for files in listing.paginate(
                Bucket=bucket, Prefix=folder, Delimiter="/", PaginationConfig=config
            ):
                clock = now or _server_time(files)
                batch = []
                for obj in files.get("Contents", []):
                    name = obj["Key"][len(folder) :]  # "" for a folder marker object
                    age = clock - obj["LastModified"]
                    if found := _stored_file(project_id, name, int(obj["Size"]), age):
                        batch.append(found)
                if batch:
                    yield batch


def _server_time(response: dict[str, Any]) -> datetime:
    """The time the S3 server answered (its Date header), else the local clock."""
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if date:
        with contextlib.suppress(TypeError, ValueError):
            parsed = parsedate_to_datetime(date)
            if parsed.tzinfo is not None:
                return parsed
    return datetime.now(timezone.utc)
