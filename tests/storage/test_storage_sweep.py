"""The sweep of incomplete writes, on both backends: stale ones go, fresh ones and every
visible object stay. Ages come from a ``now`` moved forward, never from sleeping."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from io import BytesIO
from pathlib import Path

import boto3
import pytest

from tuneforge.s3_storage import S3Storage
from tuneforge.storage import FileStorage, open_storage
from tuneforge.storage_sweep import DEFAULT_STALE_AGE, sweep_incomplete

DAY = timedelta(days=1)


def _mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)


def _leave_temp_file(storage: FileStorage, name: str, size: int) -> Path:
    """What a writer killed mid-copy leaves: a partial file under .tmp/."""
    path = storage.root / ".tmp" / name
    path.write_bytes(b"x" * size)
    return path


def test_file_sweep_removes_stale_temp_files_only(tmp_path: Path) -> None:
    storage = open_storage((tmp_path / "store").as_uri())
    assert isinstance(storage, FileStorage)
    storage.put_bytes("projects/p/files/f", b"visible")
    dead = _leave_temp_file(storage, "dead", 1000)
    live = _leave_temp_file(storage, "live", 10)
    old = (_mtime(live) - 2 * DAY).timestamp()
    os.utime(dead, (old, old))  # its writer died two days ago

    result = sweep_incomplete(storage, DEFAULT_STALE_AGE)

    assert result.removed == ["dead"] and result.bytes_freed == 1000 and result.kept == 1
    assert not dead.exists() and live.exists()
    assert storage.list("") == ["projects/p/files/f"]

    # A day later the other one is stale too.
    later = sweep_incomplete(storage, DAY, now=_mtime(live) + DAY + timedelta(seconds=1))
    assert later.removed == ["live"] and later.kept == 0 and not live.exists()
    assert storage.get_bytes("projects/p/files/f") == b"visible"


def test_file_sweep_keeps_a_temp_file_younger_than_the_age(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "store")
    live = _leave_temp_file(storage, "live", 10)
    result = sweep_incomplete(storage, timedelta(hours=1), now=_mtime(live) + timedelta(minutes=59))
    assert result.removed == [] and result.kept == 1 and live.exists()


def test_file_sweep_touches_nothing_but_plain_files_in_tmp(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "store")
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    (storage.root / ".tmp" / "link").symlink_to(outside)
    (storage.root / ".tmp" / "folder").mkdir()
    (storage.root / ".tmp" / "folder" / "inner").write_text("x")
    storage.put_bytes("a/b", b"visible")

    result = sweep_incomplete(storage, timedelta(0), now=datetime.now(timezone.utc) + 30 * DAY)

    assert result.removed == []
    assert outside.read_text() == "not ours" and (storage.root / ".tmp" / "link").is_symlink()
    assert (storage.root / ".tmp" / "folder" / "inner").exists() and storage.list("") == ["a/b"]


def test_file_sweep_of_a_temp_name_of_a_published_object_keeps_the_object(tmp_path: Path) -> None:
    """A writer killed after linking its spool into place leaves a second name of the object."""
    storage = FileStorage(tmp_path / "store")
    storage.put_bytes("projects/p/files/f", b"visible")
    os.link(storage.root / "projects/p/files/f", storage.root / ".tmp" / "spool-published")

    result = sweep_incomplete(storage, timedelta(0), now=datetime.now(timezone.utc) + DAY)

    assert result.removed == ["spool-published"] and result.bytes_freed == 0
    assert storage.get_bytes("projects/p/files/f") == b"visible"


def test_file_sweep_tolerates_a_temp_file_that_vanishes_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that finishes renames its temp file away between the listing and the delete."""
    storage = FileStorage(tmp_path / "store")
    gone = _leave_temp_file(storage, "renamed", 10)
    stays = _leave_temp_file(storage, "dead", 20)
    real_scandir = os.scandir

    def scandir_then_rename(path: Path) -> list[os.DirEntry[str]]:
        entries = list(real_scandir(path))
        os.replace(gone, storage.root / "a-finished-object")
        return entries

    monkeypatch.setattr("tuneforge.storage_sweep.os.scandir", scandir_then_rename)
    result = sweep_incomplete(storage, timedelta(0), now=datetime.now(timezone.utc) + DAY)

    assert result.removed == ["dead"] and result.bytes_freed == 20 and not stays.exists()
    assert (storage.root / "a-finished-object").exists()


@pytest.fixture
def s3_storage(s3_bucket: str) -> S3Storage:
    return S3Storage(s3_bucket, "root/prefix", part_size=5 * 1024 * 1024)


def _leave_multipart_upload(bucket: str, key: str, part: bytes) -> str:
    """What an API killed mid-upload leaves: a multipart upload with a part, never completed."""
    s3 = boto3.client("s3")
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=part)
    return upload_id


def _open_uploads(bucket: str, prefix: str = "") -> list[tuple[str, str]]:
    uploads = boto3.client("s3").list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    return sorted((u["Key"], u["UploadId"]) for u in uploads)


def _initiated(bucket: str, upload_id: str) -> datetime:
    """The start time the server reports: the sweep judges age by it, not by the local clock
    (moto's server reports one fixed date for every upload; real stores report the real one)."""
    uploads = boto3.client("s3").list_multipart_uploads(Bucket=bucket)["Uploads"]
    return next(u["Initiated"] for u in uploads if u["UploadId"] == upload_id)


def test_s3_sweep_aborts_stale_multipart_uploads_under_its_prefix_only(
    s3_storage: S3Storage, s3_bucket: str
) -> None:
    s3_storage.put_bytes("projects/p/files/f", b"visible")
    key = "root/prefix/projects/p/files/file-dead"
    dead = _leave_multipart_upload(s3_bucket, key, b"p" * 12345)
    # Not this storage's: another prefix, and one that merely starts with the same letters.
    foreign = [
        ("root/other/x", _leave_multipart_upload(s3_bucket, "root/other/x", b"o")),
        ("root/prefix2/x", _leave_multipart_upload(s3_bucket, "root/prefix2/x", b"o")),
    ]
    started = _initiated(s3_bucket, dead)

    fresh = sweep_incomplete(s3_storage, DAY, now=started + timedelta(hours=23))
    assert fresh.removed == [] and fresh.kept == 1
    assert _open_uploads(s3_bucket, "root/prefix/") == [(key, dead)]

    stale = sweep_incomplete(s3_storage, DAY, now=started + DAY + timedelta(seconds=1))
    assert stale.removed == [f"{key}#{dead}"] and stale.bytes_freed == 12345 and stale.kept == 0
    assert _open_uploads(s3_bucket, "root/prefix/") == []
    assert _open_uploads(s3_bucket) == sorted(foreign)
    assert s3_storage.list("") == ["projects/p/files/f"]

    again = sweep_incomplete(s3_storage, DAY, now=started + 2 * DAY)
    assert again.removed == [] and again.kept == 0


def test_s3_sweep_without_a_prefix_leaves_other_applications_uploads(s3_bucket: str) -> None:
    storage = S3Storage(s3_bucket, "", part_size=5 * 1024 * 1024)  # the whole bucket is Tuneforge's root
    ours = _leave_multipart_upload(s3_bucket, "projects/p/files/file-dead", b"p")
    theirs = _leave_multipart_upload(s3_bucket, "backups/db.tar", b"b")
    started = _initiated(s3_bucket, ours)
    result = sweep_incomplete(storage, DAY, now=started + 2 * DAY)
    assert result.removed == [f"projects/p/files/file-dead#{ours}"]
    assert _open_uploads(s3_bucket) == [("backups/db.tar", theirs)]


def test_s3_sweep_leaves_a_completed_upload_alone(s3_storage: S3Storage, s3_bucket: str) -> None:
    data = os.urandom(6 * 1024 * 1024)  # above the 5 MiB part size: a completed multipart upload
    s3_storage.put_bytes("small", b"x")
    s3_storage.put_fileobj("big", BytesIO(data))
    result = sweep_incomplete(s3_storage, timedelta(0), now=datetime.now(timezone.utc) + DAY)
    assert result.removed == [] and s3_storage.get_bytes("big") == data


def test_refuses_what_it_cannot_judge(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path / "store")
    with pytest.raises(ValueError):
        sweep_incomplete(storage, timedelta(seconds=-1))
    with pytest.raises(ValueError):
        sweep_incomplete(storage, DAY, now=datetime(2030, 1, 1))  # naive: which zone?
    with pytest.raises(TypeError):
        sweep_incomplete(object(), DAY)  # type: ignore[arg-type]
