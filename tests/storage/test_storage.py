"""One contract, two backends: file:// and S3 (a real S3-compatible server over HTTP)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import boto3
import pytest

from tuneforge.s3_storage import S3Storage
from tuneforge.storage import (
    FileStorage,
    Storage,
    checkpoint_prefix,
    complete_checkpoint_steps,
    get_dir,
    open_storage,
    put_dir,
)

MIB = 1024 * 1024


@pytest.fixture(params=["file", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "file":
        return open_storage((tmp_path / "store").as_uri())
    bucket = request.getfixturevalue("s3_bucket")
    return S3Storage(bucket, "root/prefix", part_size=5 * MIB)


def test_put_get_list_delete(storage: Storage, tmp_path: Path) -> None:
    storage.put_bytes("a/b/c.txt", b"hello")
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 1000)
    storage.put_file("a/d.bin", src)
    assert storage.get_bytes("a/b/c.txt") == b"hello"
    assert storage.exists("a/d.bin") and not storage.exists("a/nope") and storage.size("a/d.bin") == 1000
    assert storage.list("a/") == ["a/b/c.txt", "a/d.bin"] and storage.list("zzz/") == []
    storage.get_file("a/d.bin", tmp_path / "out" / "d.bin")
    assert (tmp_path / "out" / "d.bin").read_bytes() == src.read_bytes()
    with storage.open_read("a/b/c.txt") as fh:
        assert fh.read() == b"hello"
    storage.delete("a/b/c.txt")
    assert storage.list("a/") == ["a/d.bin"]
    storage.delete_prefix("a/")
    assert storage.list("a/") == []


def test_missing_keys_raise_file_not_found(storage: Storage, tmp_path: Path) -> None:
    for call in (
        lambda: storage.get_bytes("nope"),
        lambda: storage.size("nope"),
        lambda: storage.get_file("nope", tmp_path / "x"),
        lambda: storage.open_read("nope"),
    ):
        with pytest.raises(FileNotFoundError):
            call()
    storage.delete("nope")  # deleting nothing is fine


@pytest.mark.parametrize("key", ["../x", "/abs", "a/../../b", "a/./b", "nul\x00", ""])
def test_keys_cannot_escape(storage: Storage, key: str) -> None:
    with pytest.raises(ValueError):
        storage.put_bytes(key, b"x")


def test_large_object_streams_in_parts(storage: Storage) -> None:
    data = os.urandom(11 * MIB + 123)  # three parts at 5 MiB
    storage.put_fileobj("big.bin", io.BytesIO(data))
    assert storage.size("big.bin") == len(data) and storage.get_bytes("big.bin") == data


class Exploding(io.RawIOBase):
    """Yields a few MiB, then fails like a dropped client connection."""

    def __init__(self, fail_after: int) -> None:
        self.left = fail_after

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            raise ConnectionResetError("client went away")
        n = min(size if size > 0 else MIB, self.left)
        self.left -= n
        return b"z" * n


def test_a_spool_is_published_whole_and_leaves_no_temp_file(storage: Storage) -> None:
    body = os.urandom(3 * MIB)
    with storage.open_spool() as spool:
        spool.write(body)
        assert storage.list("") == []  # nothing visible while it is received
        storage.put_spool("files/f1", spool)
    assert storage.get_bytes("files/f1") == body and storage.list("") == ["files/f1"]
    if not isinstance(storage, S3Storage):
        assert not any(Path(storage.root, ".tmp").iterdir()), "a temp file was left behind"
        assert Path(storage.root, "files/f1").stat().st_mode & 0o777 == 0o644  # as _atomic's objects


def test_a_spool_is_copied_where_hard_links_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = FileStorage(tmp_path)

    def no_links(*_: object) -> None:
        raise PermissionError("hard links are not supported here")

    monkeypatch.setattr(os, "link", no_links)
    with storage.open_spool() as spool:
        spool.write(b"abc")
        storage.put_spool("files/f2", spool)
    assert storage.get_bytes("files/f2") == b"abc" and not any((tmp_path / ".tmp").iterdir())


def test_failed_upload_leaves_nothing(storage: Storage) -> None:
    with pytest.raises(ConnectionResetError):
        storage.put_fileobj("partial.bin", Exploding(12 * MIB))
    assert not storage.exists("partial.bin") and storage.list("") == []
    if isinstance(storage, S3Storage):
        uploads = boto3.client("s3").list_multipart_uploads(Bucket=storage.bucket)
        assert not uploads.get("Uploads"), "an aborted multipart upload left parts behind"
    else:
        assert not any(Path(storage.root, ".tmp").iterdir()), "a temp file was left behind"


def test_dirs_and_checkpoint_completeness(storage: Storage, tmp_path: Path) -> None:
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "a.json").write_text("{}")
    (src / "sub" / "b.bin").write_bytes(b"b")
    assert put_dir(storage, src, "x/") == ["a.json", "sub/b.bin"]
    assert get_dir(storage, "x/", tmp_path / "back") == ["a.json", "sub/b.bin"]
    for step, complete in ((5, True), (10, True), (15, False)):
        prefix = checkpoint_prefix("p", "j", step)
        storage.put_bytes(prefix + "adapter_model.safetensors", b"w")
        if complete:
            storage.put_bytes(prefix + "manifest.json", b"{}")
    assert complete_checkpoint_steps(storage, "p", "j") == [5, 10]


def test_open_storage_picks_the_backend(tmp_path: Path, s3_bucket: str) -> None:
    assert isinstance(open_storage(tmp_path.as_uri()), FileStorage)
    s3 = open_storage(f"s3://{s3_bucket}/some/prefix")
    assert isinstance(s3, S3Storage) and s3.uri == f"s3://{s3_bucket}/some/prefix/"
    with pytest.raises(ValueError):
        open_storage("ftp://x/y")
