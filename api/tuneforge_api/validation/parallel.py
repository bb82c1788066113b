"""The fast path on worker processes: blocks go out a few at a time, and their facts come back
in file order, so the one pass that counts, dedupes and names problems (``scan``) is unchanged.

A block goes out as its bytes, or, when the file is a local one (``local_file``), as a byte
range that the worker reads itself: then the calling process neither reads nor copies the data,
it only keeps the books, and the workers share all the per-line work.

Memory stays bounded: at most ``AHEAD_PER_WORKER`` blocks per worker are in flight. The pool is
shared by every validation of the process and made on first use, with the ``forkserver``
start method: the API process has threads, and forking a threaded process is unsafe. A pool
that breaks (a worker killed) is replaced, and the blocks it held are classified here.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import stat
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from tuneforge_api.validation import fast

AHEAD_PER_WORKER = 2
MAX_WORKERS = 8

_lock = threading.Lock()
_pool: ProcessPoolExecutor | None = None


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_workers() -> int:
    """0 (no pool) where the C scanner is built: then a worker's scan costs about what the calling
    process spends anyway to receive and book its results, so the pool only adds processes (on 2
    CPUs, 1 GB of chat: in-process and 2 workers within run-to-run noise; bench/RESULTS.md).
    Without it, msgspec decodes every line and the pool pays: one worker per CPU (at most 8),
    none on a single CPU. ``Limits.workers`` still asks for a pool either way."""
    cpus = available_cpus()
    return min(MAX_WORKERS, cpus) if cpus >= 2 and not fast.NATIVE else 0


def _get_pool(workers: int) -> ProcessPoolExecutor:
    """The process's pool; its size is the first caller's (validations share it)."""
    global _pool
    with _lock:
        if _pool is None:
            context = multiprocessing.get_context("forkserver")
            _pool = ProcessPoolExecutor(workers, mp_context=context)
        return _pool


def _drop_pool(broken: ProcessPoolExecutor) -> None:
    global _pool
    with _lock:
        if _pool is broken:
            _pool = None
    broken.shutdown(wait=False, cancel_futures=True)


def local_file(fh: object) -> str | None:
    """A path by which a worker process can read ``fh``'s file, when it is a regular local file
    (then its blocks go out as byte ranges); None for anything else (a stream from S3, memory).

    The path names the open descriptor (/proc/<pid>/fd/<n>), so a file deleted or replaced
    while it is validated is still the one read, as it is for the calling process.
    """
    if not isinstance(fh, io.BufferedReader | io.BufferedRandom) or not isinstance(fh.raw, io.FileIO):
        return None
    fd = fh.fileno()
    path = f"/proc/{os.getpid()}/fd/{fd}"
    if not stat.S_ISREG(os.fstat(fd).st_mode) or not os.path.exists(path):
        return None
    return path


def read_span(fd: int, offset: int, stop: int) -> bytes:
    """Bytes ``offset:stop`` of the open file ``fd`` (pread: the file position does not move)."""
    parts = []
    while offset < stop:
        part = os.pread(fd, stop - offset, offset)
        if not part:
            raise OSError(f"the file ended at byte {offset}, before {stop}")
        parts.append(part)
        offset += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def classify_span(
    source: Source, offset: int, stop: int, trained_stride: int, sample_stride: int
) -> fast.BlockFacts:
    """``fast.classify`` of bytes ``offset:stop`` of the file ``source`` names, in a worker.

    The descriptor behind the path may have been closed, and its number reused, by the time a
    queued block runs (a validation that failed): a file other than the one validated (its
    device and inode tell) is refused, and a pipe cannot block the worker (O_NONBLOCK)."""
    path, device, inode = source
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        found = os.fstat(fd)
        if (found.st_dev, found.st_ino) != (device, inode) or not stat.S_ISREG(found.st_mode):
            raise OSError(f"{path} is no longer the file being validated")
        block = read_span(fd, offset, stop)
    finally:
        os.close(fd)
    return fast.classify(block, trained_stride, sample_stride)


# The path a worker opens (``local_file``) and the device and inode it must find there.
Source = tuple[str, int, int]
# A block's bytes, or its (offset, stop) in the file a worker reads by path.
Payload = bytes | tuple[int, int]
# (payload, too long, future, the pool the future was sent to)
Pending = tuple[Payload, bool, "Future[fast.BlockFacts] | None", ProcessPoolExecutor | None]


def classified(
    blocks: Iterator[tuple[Payload, bool]],
    workers: int,
    trained_stride: int,
    sample_stride: int,
    source: Source | None = None,
) -> Iterator[tuple[Payload, bool, fast.BlockFacts | None]]:
    """``(payload, too_long, facts)`` in file order; facts is None for a too-long line or where
    the pool or a worker's read failed (the caller then classifies the block itself). A payload
    is a block's bytes, or with ``source``, its byte range in that file.

    Validations share the pool, so a failed future drops only the pool it came from: the
    current one may be a healthy replacement that other validations are using.
    """
    pool = _get_pool(workers)
    pending: deque[Pending] = deque()
    ahead = workers * AHEAD_PER_WORKER

    def done(item: Pending) -> tuple[Payload, bool, fast.BlockFacts | None]:
        nonlocal pool
        payload, too_long, future, sent_to = item
        if future is None or sent_to is None:
            return payload, too_long, None
        try:
            return payload, too_long, future.result()
        except (BrokenProcessPool, CancelledError):  # the caller classifies this block in-process
            _drop_pool(sent_to)
            pool = _get_pool(workers)
            return payload, too_long, None
        except OSError:  # the worker could not read the block: the caller reads it itself
            return payload, too_long, None

    def submit(payload: Payload) -> Pending:
        nonlocal pool
        if isinstance(payload, bytes):
            args: tuple = (fast.classify, payload, trained_stride, sample_stride)
        else:
            args = (classify_span, source, *payload, trained_stride, sample_stride)
        for _ in range(2):
            try:
                return payload, False, pool.submit(*args), pool
            # BrokenProcessPool, or another validation shut this pool down after it broke
            except RuntimeError:
                _drop_pool(pool)
                pool = _get_pool(workers)
        return payload, False, None, None  # the pool keeps failing: classify in-process

    try:
        for payload, too_long in blocks:
            pending.append((payload, True, None, None) if too_long else submit(payload))
            if len(pending) >= ahead:
                yield done(pending.popleft())
        while pending:
            yield done(pending.popleft())
    finally:  # a validation that stopped early leaves no queued block behind
        for _, _, future, _ in pending:
            if future is not None:
                future.cancel()
