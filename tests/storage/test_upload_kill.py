"""Issue 5's crash safety, end to end: SIGKILL the API (a real uvicorn process) mid-upload, on
file:// and on s3://. Afterwards there is no file record and no visible object; what the write
left (a temp file, an open multipart upload with its parts) is removed by the scheduler's sweep.

Two kills per backend: one while the request body is still arriving, one inside the storage
write window. The second is aimed, not timed: on s3:// a proxy holds the upload's second part
(the first is stored), on file:// an inotify watch fires as the temp file is created.

A third kill, after the object is stored but before its row commits, leaves a whole visible
object that no record owns; the sweep removes it too. It is aimed by holding SQLite's write
lock from the test: the API stores the object, then waits on the lock to insert its row.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest

from tests.conftest import ADMIN_KEY, drop_queue, free_port
from tests.storage.s3_gate import S3Gate, upload_part
from tuneforge.s3_storage import PART_SIZE
from tuneforge.storage import FileStorage, Storage, open_storage
from tuneforge_scheduler.settings import SchedulerSettings
from tuneforge_scheduler.worker import build_scheduler, build_worker, sweep_storage

pytestmark = pytest.mark.chaos

LINE = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
BOUNDARY = "tuneforge-kill-boundary"
HEAD = (
    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
    f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
    "Content-Type: application/jsonl\r\n\r\n"
).encode()
TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()


def dataset(size: int) -> bytes:
    return LINE * (size // len(LINE) + 1)


def valid_dataset(n: int) -> bytes:
    """Distinct examples: a file that passes validation (repeated ones are refused)."""
    return b"".join(LINE.replace(b'"hi"', f'"hi {i}"'.encode()) for i in range(n))


class Api:
    """The API alone, as the Helm chart runs it: uvicorn on ``create_app``, its own process group."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home / "api.log"

    def start(self) -> None:
        argv = [
            sys.executable, "-m", "uvicorn", "--factory", "tuneforge_api.app:create_app",
            "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
        ]  # fmt: skip
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                argv,
                env=self.env,
                cwd=self.home,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the API did not start:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        try:
            return httpx.get(self.url + "/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()

    def files(self) -> list[dict]:
        response = httpx.get(self.url + "/v1/files", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        response.raise_for_status()
        return response.json()["data"]

    def open_upload(self, payload_size: int) -> socket.socket:
        """A raw upload request whose body the caller sends: it decides where the body stops."""
        sock = socket.create_connection(("127.0.0.1", self.port))
        sock.sendall(
            (
                f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Authorization: Bearer {ADMIN_KEY}\r\n"
                f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
                f"Content-Length: {len(HEAD) + payload_size + len(TAIL)}\r\n\r\n"
            ).encode()
            + HEAD
        )
        return sock


def kill_mid_body(api: Api, payload: bytes) -> None:
    """Half of the body sent, then SIGKILL: the request never ends."""
    api.start()
    with api.open_upload(len(payload)) as sock:
        sock.sendall(payload[: len(payload) // 2])
        api.kill()


class TempFileWatch:
    """SIGKILLs a process group the moment a file is created in ``folder`` (inotify)."""

    IN_CREATE = 0x100

    def __init__(self, folder: Path, pgid: int) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_CLOEXEC)
        assert self.fd >= 0 and libc.inotify_add_watch(self.fd, str(folder).encode(), self.IN_CREATE) >= 0
        self.pgid = pgid
        self.fired = threading.Event()
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        readable, _, _ = select.select([self.fd, self._stop_r], [], [], 120)
        if self.fd in readable:
            os.killpg(self.pgid, signal.SIGKILL)
            self.fired.set()

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(10)
        for fd in (self.fd, self._stop_r, self._stop_w):
            os.close(fd)


def kill_in_write_window_s3(api: Api, gate: S3Gate, payload: bytes) -> None:
    """Part 1 is stored, part 2 is in flight (held by the gate): SIGKILL there."""
    api.start()
    gate.hold(upload_part(2))
    with api.open_upload(len(payload)) as sock:
        sock.sendall(payload + TAIL)
        deadline = time.monotonic() + 60
        while not gate.held.wait(0.05):
            if select.select([sock], [], [], 0)[0]:  # an answer: the upload ended without part 2
                pytest.fail(f"the API answered before part 2: {sock.recv(4096)!r}")
            assert time.monotonic() < deadline, f"no part 2 came:\n{api.log.read_text()[-3000:]}"
        api.kill()
    gate.release()


def kill_in_write_window_file(api: Api, tmp_dir: Path, payload: bytes, tries: int = 3) -> None:
    """SIGKILL as the upload's first temp file appears under ``.tmp/`` (the spool the body is
    received into, or the copy that ``put_fileobj`` writes). If the write still won the race
    (the watcher was not scheduled in time), undo the stored file as a client would and retry."""
    for _ in range(tries):
        before = set(tmp_dir.iterdir())  # what the kill mid-body may have left already
        api.start()
        assert api.proc is not None
        watch = TempFileWatch(tmp_dir, api.proc.pid)
        try:
            with api.open_upload(len(payload)) as sock:  # open until the kill: a client gone is no test
                with contextlib.suppress(OSError):  # the kill may come while the body is sent
                    sock.sendall(payload + TAIL)
                deadline = time.monotonic() + 60
                while not watch.fired.wait(0.01):
                    if select.select([sock], [], [], 0)[0]:  # an answer: the write won the race
                        break
                    assert time.monotonic() < deadline, "the API never wrote a temp file"
        finally:
            watch.close()
        api.kill()
        if set(tmp_dir.iterdir()) - before:
            return
        api.start()
        for f in api.files():
            httpx.delete(f"{api.url}/v1/files/{f['id']}", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        api.kill()
    pytest.fail(f"no kill landed inside the write window in {tries} tries")


class DatabaseWriteLock:
    """Holds the SQLite database's write lock (``BEGIN IMMEDIATE``) while open: in WAL mode the
    API still reads, and a write of its waits on the lock (up to its 30 s busy timeout)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def __enter__(self) -> DatabaseWriteLock:
        self._conn = sqlite3.connect(self.path, isolation_level=None)
        self._conn.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, *_: object) -> None:
        assert self._conn is not None
        self._conn.execute("ROLLBACK")
        self._conn.close()


def kill_between_store_and_commit(api: Api, storage: Storage, payload: bytes) -> None:
    """Upload while the test holds the write lock; SIGKILL once the object is in storage (its
    row is then waiting on the lock, not committed)."""
    assert api.proc is not None
    with DatabaseWriteLock(api.home / "tuneforge.db"), api.open_upload(len(payload)) as sock:
        sock.sendall(payload + TAIL)
        deadline = time.monotonic() + 25  # well inside the API's 30 s wait on the lock
        while not storage.list("projects/"):
            if select.select([sock], [], [], 0.01)[0]:  # an answer: the row did not wait
                pytest.fail(f"the API answered before the kill: {sock.recv(4096)!r}")
            assert time.monotonic() < deadline, f"no object was stored:\n{api.log.read_text()[-3000:]}"
        api.kill()


def service_env(home: Path, redis_url: str, queue: str, storage_uri: str) -> dict[str, str]:
    return {
        **os.environ,
        "TUNEFORGE_HOME": str(home),
        "TUNEFORGE_REDIS_URL": redis_url,
        "TUNEFORGE_QUEUE_NAME": queue,
        "TUNEFORGE_API_KEY": ADMIN_KEY,
        "TUNEFORGE_VALIDATION_WORKERS": "0",  # no worker processes to outlive the kill
        "TUNEFORGE_STORAGE_URI": storage_uri,
    }


def sweep_now(home: Path, storage_uri: str, redis_url: str, queue: str) -> None:
    """The scheduler's sweep with age 0: whatever is left now counts as stale."""
    settings = SchedulerSettings(
        home=home, storage_uri=storage_uri, redis_url=redis_url, queue_name=queue, stale_upload_hours=0
    )
    try:
        asyncio.run(run_the_sweep(settings))
    finally:
        drop_queue(redis_url, queue)


async def run_the_sweep(settings: SchedulerSettings) -> None:
    """The scheduler's cron task, in a worker context set up as the worker's start-up does."""
    worker = build_worker(settings, build_scheduler(settings))
    ctx: dict = {}
    await worker.on_startup(ctx)
    try:
        await sweep_storage(ctx)
    finally:
        await worker.on_shutdown(ctx)


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def cleanup() -> Iterator[list]:
    """Things to close at the end, whatever happened: APIs and gates."""
    items: list = []
    yield items
    for item in items:
        item.kill() if isinstance(item, Api) else item.close()


def leftovers(storage: Storage) -> list[tuple[str, int]]:
    """Incomplete writes in storage, with the bytes they hold: temp files, or open multipart
    uploads under the storage's prefix (their parts)."""
    if isinstance(storage, FileStorage):
        return sorted((p.name, p.stat().st_size) for p in (storage.root / ".tmp").iterdir())
    s3 = boto3.client("s3")
    found = []
    for upload in s3.list_multipart_uploads(Bucket=storage.bucket, Prefix=storage.prefix).get("Uploads", []):
        parts = s3.list_parts(Bucket=storage.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        found.append((upload["Key"], sum(p["Size"] for p in parts.get("Parts", []))))
    return sorted(found)


def test_an_upload_killed_mid_write_leaves_nothing_after_the_sweep(
    backend: str, tmp_path: Path, redis_url: str, cleanup: list, request: pytest.FixtureRequest
) -> None:
    if backend == "s3":
        request.getfixturevalue("s3_endpoint")  # sets the AWS_* variables that the API inherits
    home = tmp_path / "home"
    home.mkdir()
    queue = f"tf-test:{uuid.uuid4().hex}"
    if backend == "s3":
        storage_uri = f"s3://{request.getfixturevalue('s3_bucket')}/tf"
        env = service_env(home, redis_url, queue, storage_uri)
        gate = S3Gate(os.environ["AWS_ENDPOINT_URL"])
        cleanup.append(gate)
        env["AWS_ENDPOINT_URL"] = gate.url  # the API reaches S3 through the gate; the test directly
        payload = dataset(PART_SIZE + (1 << 20))  # two parts: a full one, then the rest
    else:
        storage_uri = (home / "storage").as_uri()
        env = service_env(home, redis_url, queue, storage_uri)
        payload = dataset(64 << 20)  # its copy into the temp file takes tens of milliseconds
    storage = open_storage(storage_uri)
    api = Api(home, env)
    cleanup.append(api)

    kill_mid_body(api, payload)
    if backend == "s3":
        kill_in_write_window_s3(api, gate, payload)
    else:
        assert isinstance(storage, FileStorage)
        kill_in_write_window_file(api, storage.root / ".tmp", payload)

    api.start()  # a fresh API: the killed ones' work is all it can know of
    assert api.files() == []
    api.kill()
    assert storage.list("") == [], "a killed upload left a visible object"
    left = leftovers(storage)
    assert left, "the kill inside the write window left nothing to clean: it did not land there"
    if backend == "s3":  # the upload's first part is stored, and billed, until aborted
        assert any(size == PART_SIZE for _, size in left), left

    sweep_now(home, storage_uri, redis_url, queue)
    assert leftovers(storage) == []
    assert storage.list("") == []


def test_an_upload_killed_before_its_row_commits_leaves_no_object_after_the_sweep(
    backend: str, tmp_path: Path, redis_url: str, cleanup: list, request: pytest.FixtureRequest
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    queue = f"tf-test:{uuid.uuid4().hex}"
    if backend == "s3":
        request.getfixturevalue("s3_endpoint")  # sets the AWS_* variables that the API inherits
        storage_uri = f"s3://{request.getfixturevalue('s3_bucket')}/tf"
    else:
        storage_uri = (home / "storage").as_uri()
    storage = open_storage(storage_uri)
    api = Api(home, service_env(home, redis_url, queue, storage_uri))
    cleanup.append(api)
    payload = valid_dataset(5000)  # ~0.5 MB: validated in the request, then stored whole

    api.start()
    kill_between_store_and_commit(api, storage, payload)

    api.start()  # a fresh API: no record of the file, so no way to reach or delete its object
    assert api.files() == []
    api.kill()
    [orphan] = storage.list("")
    assert orphan.startswith("projects/") and "/files/file-" in orphan, orphan
    assert storage.get_bytes(orphan) == payload  # the kill came after the whole object was stored

    sweep_now(home, storage_uri, redis_url, queue)
    assert storage.list("") == []
    assert leftovers(storage) == []  # on file://, the spool's name of the object went as well
