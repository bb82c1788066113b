"""Object storage chosen by URI: ``file:///dir`` (embedded default) or ``s3://bucket/prefix``.

Keys are relative to the storage root and follow DESIGN.md's layout (see the ``*_key``
helpers). Every write is atomic: a reader sees the whole object or nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import unquote, urlparse

CHUNK = 1 << 20
TMP_DIR = ".tmp"  # FileStorage's folder of writes in flight, under its root; never listed


def file_key(project_id: str, file_id: str) -> str:
    return f"projects/{project_id}/files/{file_id}"


def job_prefix(project_id: str, job_id: str) -> str:
    return f"projects/{project_id}/jobs/{job_id}/"


def adapter_prefix(project_id: str, job_id: str) -> str:
    return job_prefix(project_id, job_id) + "adapter/"


def checkpoints_prefix(project_id: str, job_id: str) -> str:
    return job_prefix(project_id, job_id) + "checkpoints/"


def checkpoint_prefix(project_id: str, job_id: str, step: int) -> str:
    return checkpoints_prefix(project_id, job_id) + f"step-{step}/"


MANIFEST = "manifest.json"


def complete_checkpoint_steps(storage: Storage, project_id: str, job_id: str) -> list[int]:
    """Steps of the job's checkpoints whose manifest exists (a checkpoint without one is
    incomplete and does not exist), in ascending order."""
    prefix = checkpoints_prefix(project_id, job_id)
    steps = set()
    for key in storage.list(prefix):
        rest = key[len(prefix) :]
        folder, _, name = rest.partition("/")
        if name == MANIFEST and folder.startswith("step-") and folder[5:].isdigit():
            steps.add(int(folder[5:]))
    return sorted(steps)


class Storage(Protocol):
    uri: str

    def put_file(self, key: str, path: Path) -> None: ...
    def put_fileobj(self, key: str, fh: BinaryIO) -> None: ...
    def open_spool(self) -> BinaryIO: ...
    def put_spool(self, key: str, spool: BinaryIO) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_file(self, key: str, path: Path) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def open_read(self, key: str) -> BinaryIO: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...


def check_key(key: str) -> str:
    """Refuse keys that could escape the root: storage keys never come from user paths."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\x00" in key or any(p in ("..", ".") for p in parts):
        raise ValueError(f"invalid storage key: {key!r}")
    return key


class FileStorage:
    """A directory on local disk. Writes go to a temp file and are renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp = self.root / TMP_DIR
        self._tmp.mkdir(exist_ok=True)
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    @contextmanager
    def _atomic(self, key: str) -> Iterator[BinaryIO]:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp / uuid.uuid4().hex
        try:
            with open(tmp, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, key: str, path: Path) -> None:
        with open(path, "rb") as src:
            self.put_fileobj(key, src)

    def put_fileobj(self, key: str, fh: BinaryIO) -> None:
        with self._atomic(key) as dst:
            shutil.copyfileobj(fh, dst, CHUNK)

    def put_bytes(self, key: str, data: bytes) -> None:
        with self._atomic(key) as dst:
            dst.write(data)

    def open_spool(self) -> BinaryIO:
        """A temp file for an object being received (an upload), under ``.tmp/`` on the disk the
        object will live on, so that ``put_spool`` publishes it by a rename, not a second copy.
        It is removed when closed; one left by a crash is swept as any other temp file."""
        return tempfile.NamedTemporaryFile(dir=self._tmp, prefix="spool-")  # type: ignore[return-value]

    def put_spool(self, key: str, spool: BinaryIO) -> None:
        """Publish a whole spool from ``open_spool`` atomically: synced, then linked under a temp
        name and renamed into place (the spool's own name goes when it is closed)."""
        spool.flush()
        os.fchmod(spool.fileno(), 0o644)  # a temp file is 0600; objects written by _atomic are 0644
        os.fsync(spool.fileno())
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp / uuid.uuid4().hex
        try:
            os.link(spool.name, tmp)
        except OSError:  # a filesystem without hard links: one copy, written as any other object
            spool.seek(0)
            self.put_fileobj(key, spool)
            return
        try:
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def get_file(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(key), path)

    def get_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def open_read(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def list(self, prefix: str) -> list[str]:
        """Keys under a folder prefix ("" lists everything), never the temp files in flight."""
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not base.is_dir():
            return []
        keys = (p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())
        return sorted(k for k in keys if not k.startswith(TMP_DIR + "/"))

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix.rstrip("/")), ignore_errors=True)


def put_dir(storage: Storage, local_dir: Path, prefix: str, *, skip: set[str] = frozenset()) -> list[str]:
    """Upload every file of a folder under ``prefix``; returns the relative names."""
    names = []
    for p in sorted(Path(local_dir).rglob("*")):
        rel = p.relative_to(local_dir).as_posix()
        if p.is_file() and rel not in skip:
            storage.put_file(prefix + rel, p)
            names.append(rel)
    return names


def get_dir(storage: Storage, prefix: str, local_dir: Path) -> list[str]:
    """Download every object under ``prefix`` into a folder; returns the relative names."""
    names = []
    for key in storage.list(prefix):
        rel = key[len(prefix) :]
        storage.get_file(key, Path(local_dir) / rel)
        names.append(rel)
    return names


def open_storage(uri: str) -> Storage:
    """Pick the backend from the URI scheme; heavy imports happen only for the one chosen."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return FileStorage(Path(unquote(parsed.path)))
    if parsed.scheme == "s3":
        from tuneforge.s3_storage import S3Storage

        return S3Storage(bucket=parsed.netloc, prefix=parsed.path.lstrip("/"))
    raise ValueError(f"unsupported storage URI {uri!r}: use file:///path or s3://bucket/prefix")
