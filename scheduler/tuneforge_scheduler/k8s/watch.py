"""A local copy of the objects that match one selector, kept current by a watch (an informer).

The one module of ``k8s/`` that runs I/O, and only through the two callables it is given, so it
knows nothing of the client library:

- ``list_objects()`` returns ``(items, resourceVersion)``: a full LIST;
- ``open_watch(resource_version, timeout_s)`` returns a ``WatchStream``: the watch's events, one
  dict per line, and ``close()``.

A thread lists once, then watches from the list's resourceVersion and applies each event. When
a stream ends (the server's ``timeoutSeconds``) it resumes from the last resourceVersion seen, so
nothing is lost and nothing is listed again. When a stream breaks, it reconnects the same way
after a short back-off. Only a 410 Gone (an ERROR event or the HTTP status: the server no longer
has events that old) makes it list again, which replaces the whole copy. ``healthy`` is true
while the copy is known to be current: after a list, while a stream is open; a caller that finds
it false asks the API server itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger("tuneforge.scheduler.kubernetes")

Obj = dict[str, Any]
GONE = 410


class WatchStream(Protocol):
    def __iter__(self) -> Iterator[Obj]: ...
    def close(self) -> None: ...


class Gone(Exception):
    """The API server no longer has the events since our resourceVersion: list again."""


@dataclass
class WatchStats:
    lists: int = 0  # full LISTs: the first one, then one per 410
    watches: int = 0  # watch requests opened
    events: int = 0
    breaks: int = 0  # streams that failed or broke (then resumed from the last resourceVersion)


class WatchCache:
    def __init__(
        self,
        list_objects: Callable[[], tuple[list[Obj], str]],
        open_watch: Callable[[str, int], WatchStream],
        *,
        what: str = "objects",
        timeout_s: int = 240,
        retry_s: float = 0.5,
        max_retry_s: float = 30.0,
        keep: Callable[[Obj], bool] = lambda obj: True,
    ) -> None:
        self._list_objects = list_objects
        self._open_watch = open_watch
        self.what = what
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.max_retry_s = max_retry_s
        self._keep = keep  # a filter the selector cannot express
        self.stats = WatchStats()
        self._items: dict[str, Obj] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._healthy = False
        self._stream: WatchStream | None = None
        self._thread: threading.Thread | None = None

    # -- what callers use ---------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._healthy

    def items(self) -> dict[str, Obj]:
        """A copy of the current objects by name (the objects themselves are not copied)."""
        with self._lock:
            return dict(self._items)

    def forget(self, name: str) -> None:
        """Drop an object that the caller knows has left the selector; its event follows."""
        with self._lock:
            self._items.pop(name, None)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"watch-{self.what}", daemon=True)
            self._thread.start()

    def stop(self, wait_s: float = 5.0) -> None:
        self._stop.set()
        self._healthy = False
        thread = self._thread
        deadline = time.monotonic() + wait_s
        while thread is not None and thread.is_alive() and time.monotonic() < deadline:
            self._close_stream()  # unblocks the thread's read; again if it opened one meanwhile
            thread.join(0.05)

    def _close_stream(self) -> None:
        stream = self._stream
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - closing a broken stream may fail; we are leaving anyway
                pass

    # -- the thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        resource_version: str | None = None
        delay = self.retry_s
        while not self._stop.is_set():
            try:
                if resource_version is None:
                    resource_version = self._relist()
                resource_version = self._watch(resource_version)
                delay = self.retry_s
            except Gone:
                log.info(
                    "watch of %s: resourceVersion %s expired (410); listing again",
                    self.what,
                    resource_version,
                )
                resource_version = None
            except Exception as exc:  # noqa: BLE001 - any failure: not current any more, retry
                self._healthy = False
                self.stats.breaks += 1
                if self._stop.is_set():
                    break
                log.warning("watch of %s broke (%s); resuming in %.1f s", self.what, _describe(exc), delay)
                self._stop.wait(delay)
                delay = min(delay * 2, self.max_retry_s)
        self._healthy = False

    def _relist(self) -> str:
        self._healthy = False
        items, resource_version = self._list_objects()
        self.stats.lists += 1
        with self._lock:
            self._items = {o["metadata"]["name"]: o for o in items if self._keep(o)}
        return resource_version

    def _watch(self, resource_version: str) -> str:
        """One watch request, to its end. Returns the resourceVersion to resume from."""
        stream = self._open_watch(resource_version, self.timeout_s)
        self._stream = stream
        self.stats.watches += 1
        self._healthy = not self._stop.is_set()
        try:
            for event in stream if self._healthy else ():
                if self._stop.is_set():
                    break
                resource_version = self._apply(event) or resource_version
        finally:
            self._stream = None
            stream.close()
        return resource_version

    def _apply(self, event: Obj) -> str | None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == GONE:
                raise Gone()
            raise RuntimeError(f"watch error: {obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
        meta = obj.get("metadata") or {}
        if kind != "BOOKMARK":
            self.stats.events += 1
            with self._lock:
                if kind == "DELETED" or not self._keep(obj):
                    self._items.pop(meta.get("name"), None)
                else:
                    self._items[meta["name"]] = obj
        return meta.get("resourceVersion")


def _describe(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    return f"HTTP {status}" if status else type(exc).__name__
