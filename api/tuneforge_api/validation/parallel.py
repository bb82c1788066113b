"""The fast path on worker processes: blocks go out a few at a time, and their facts come back
in file order, so the one pass that counts, dedupes and names problems (``scan``) is unchanged.

Memory stays bounded: at most ``AHEAD_PER_WORKER`` blocks per worker are in flight. The pool is
shared by every validation of the process and made on first use, with the ``forkserver``
start method: the API process has threads, and forking a threaded process is unsafe. A pool
that breaks (a worker killed) is replaced, and the blocks it held are classified here.
"""

from __future__ import annotations

import multiprocessing
import os
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
    """One worker per idle CPU (at most 8), or none when fewer than two are idle: on a busy host
    the pool only adds the cost of shipping blocks between processes (bench/RESULTS.md)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not available on this platform
        load = 0.0
    spare = int(available_cpus() - load)
    return min(MAX_WORKERS, spare) if spare >= 2 else 0


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


# (first, block, n, future, the pool the future was sent to)
Pending = tuple[int, bytes, int, "Future[fast.BlockFacts] | None", ProcessPoolExecutor | None]


def classified(
    blocks: Iterator[tuple[int, bytes, int]], workers: int, trained_stride: int, sample_stride: int
) -> Iterator[tuple[int, bytes, int, fast.BlockFacts | None]]:
    """``(first, block, n, facts)`` in file order; facts is None for a too-long line (n == 0)
    or where the pool failed (the caller then classifies the block itself).

    Validations share the pool, so a failed future drops only the pool it came from: the
    current one may be a healthy replacement that other validations are using.
    """
    pool = _get_pool(workers)
    pending: deque[Pending] = deque()
    ahead = workers * AHEAD_PER_WORKER

    def done(item: Pending) -> tuple[int, bytes, int, fast.BlockFacts | None]:
        nonlocal pool
        first, block, n, future, sent_to = item
        if future is None or sent_to is None:
            return first, block, n, None
        try:
            return first, block, n, future.result()
        except (BrokenProcessPool, CancelledError):  # the caller classifies this block in-process
            _drop_pool(sent_to)
            pool = _get_pool(workers)
            return first, block, n, None

    def submit(block: bytes, n: int, first: int) -> Pending:
        nonlocal pool
        args = (fast.classify_block, block, n, first, trained_stride, sample_stride)
        for _ in range(2):
            try:
                return first, block, n, pool.submit(*args), pool
            # BrokenProcessPool, or another validation shut this pool down after it broke
            except RuntimeError:
                _drop_pool(pool)
                pool = _get_pool(workers)
        return first, block, n, None, None  # the pool keeps failing: classify in-process

    for first, block, n in blocks:
        pending.append(submit(block, n, first) if n else (first, block, n, None, None))
        if len(pending) >= ahead:
            yield done(pending.popleft())
    while pending:
        yield done(pending.popleft())
