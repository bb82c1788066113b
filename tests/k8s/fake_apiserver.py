"""A FAKE Kubernetes API server: kmock's in-memory emulator over real HTTP on loopback.

No Kubernetes can run here, so this is the one fake of the test suite (STYLE.md item 10). The
official ``kubernetes`` client talks to it over HTTP exactly as it would to a cluster. It runs
no controllers: no pods appear, no Job ever finishes on its own. Tests set Job and pod status
themselves, as the Job controller and the kubelet would.

kmock (0.8) stores objects and answers create (409 on a duplicate), get, list, merge-patch and
delete (404 when absent). What a real API server also does, and this subclass adds:

- on create: ``metadata.uid``, ``creationTimestamp`` and ``namespace`` (ownerReferences need the
  uid); on every change (create, patch, delete, and the tests' own writes through ``put`` and
  ``patch``) a new ``resourceVersion`` from one counter, as etcd's revision;
- on list: ``labelSelector`` (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``) and
  ``fieldSelector`` (``path=value``, ``path!=value``) filtering, and the list's resourceVersion;
- watches as the API server's watch cache serves them: from a ``resourceVersion`` (replayed from
  an event log) or from now (the current objects as ADDED); filtered by the same selectors, where an
  object that stops matching arrives as DELETED and one that starts matching as ADDED;
  ``timeoutSeconds``; an ERROR event with a 410 Status for a resourceVersion older than the log.

Test hooks, for what a real server does at its own moments: ``compact()`` (the log forgets; older
resourceVersions get 410), ``drop_watches()`` (open streams break mid-response), ``hold_watches()``
(new watch requests wait, as during a network partition), ``fail_next()`` (one request answers an
error status and changes nothing).

It does not run admission, validation (the manifests are checked against the official schemas
by ``kubernetes-validate`` instead), defaulting, garbage collection or watch bookmarks.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import datetime
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kmock
from kmock import KubernetesEmulator

RESOURCES = {
    "batch/v1/jobs": "Job",
    "v1/pods": "Pod",
    "v1/configmaps": "ConfigMap",
    "v1/secrets": "Secret",
    "v1/services": "Service",
}
NAMESPACE = "tuneforge-test"

_REQUIREMENT = re.compile(
    r"^\s*(?P<neg>!)?(?P<key>[^\s=!,()]+)\s*(?:(?P<op>==|=|!=)\s*(?P<val>[^\s,]*)|\s+(?P<setop>in|notin)\s*"
    r"\((?P<vals>[^)]*)\))?\s*$"
)


def _split_selector(selector: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current)
    return parts


def parse_label_selector(selector: str) -> list[tuple[str, str, Any]]:
    """(op, key, value) requirements; parsed once per request, not once per object."""
    parsed = []
    for requirement in _split_selector(selector):
        m = _REQUIREMENT.match(requirement)
        if m is None:
            raise ValueError(f"unparsable label selector: {requirement!r}")
        if m["neg"]:
            parsed.append(("absent", m["key"], None))
        elif m["op"]:
            parsed.append(("!=" if m["op"] == "!=" else "=", m["key"], m["val"]))
        elif m["setop"]:
            parsed.append((m["setop"], m["key"], {v.strip() for v in m["vals"].split(",")}))
        else:
            parsed.append(("exists", m["key"], None))
    return parsed


def matches_labels(labels: dict[str, str], requirements: list[tuple[str, str, Any]]) -> bool:
    for op, key, value in requirements:
        present = key in labels
        if op == "absent":
            ok = not present
        elif op == "=":
            ok = labels.get(key) == value
        elif op == "!=":
            ok = labels.get(key) != value  # like Kubernetes: an absent label matches
        elif op == "in":
            ok = present and labels[key] in value
        elif op == "notin":
            ok = labels.get(key) not in value
        else:
            ok = present
        if not ok:
            return False
    return True


def matches_fields(obj: dict[str, Any], selector: str) -> bool:
    for requirement in _split_selector(selector):
        negate = "!=" in requirement
        path, value = re.split(r"!=|==|=", requirement, maxsplit=1)
        current: Any = obj
        for part in path.strip().split("."):
            current = current.get(part) if isinstance(current, dict) else None
        if (str(current) == value.strip()) == negate:
            return False
    return True


@dataclass(frozen=True)
class _Event:
    rv: int
    resource: Any
    namespace: str
    name: str
    type: str
    obj: dict[str, Any]
    prev: dict[str, Any] | None  # the state before, to tell when an object enters or leaves a selector


class _Recorder:
    """Stands in for kmock's per-resource event buses: every change kmock publishes is stamped with
    a new resourceVersion and appended to the emulator's event log."""

    def __init__(self, emulator: _Emulator, resource: Any) -> None:
        self.emulator, self.resource = emulator, resource

    async def put(self, event: dict[str, Any]) -> None:
        meta = event["object"].get("metadata") or {}
        self.emulator.record(
            self.resource, (self.resource, meta.get("namespace"), meta.get("name")), event["type"]
        )


class _Emulator(KubernetesEmulator):
    """kmock's emulator plus what a real API server adds on create, filters on list, and watches."""

    MAX_LOG = 100_000  # events kept for watches that resume; older resourceVersions get 410

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._buses = _Buses(self)  # type: ignore[assignment]
        self.last_rv = 0
        self.log: list[_Event] = []
        self.log_offset = 0  # events dropped from the front of the log
        self.compacted_rv = 0  # a watch from below this resourceVersion answers 410
        self._tick = asyncio.Event()
        self._watches: dict[int, Any] = {}  # id -> the aiohttp request of each open watch
        self.hold = asyncio.Event()
        self.hold.set()  # set: watch requests proceed
        # (method, path suffix, status, whether the change is made anyway) to answer once
        self.failures: list[tuple[str, str, int, bool]] = []

    def record(self, resource: Any, key: tuple[Any, str, str], event_type: str) -> None:
        """Stamp the change with a new resourceVersion and log it. Runs under the emulator's lock."""
        self.last_rv += 1
        stored = self.objects[key]
        history = stored.history
        if event_type == "DELETED":
            obj = copy.deepcopy(stored.last.raw)
            prev: dict[str, Any] | None = copy.deepcopy(obj)
        else:
            stored["metadata"] = {**(stored.raw.get("metadata") or {}), "resourceVersion": str(self.last_rv)}
            obj = copy.deepcopy(stored.raw)
            before = history[-2] if len(history) >= 2 else None
            prev = copy.deepcopy(before.raw) if before is not None else None
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.last_rv)
        self.log.append(_Event(self.last_rv, resource, key[1], key[2], event_type, obj, prev))
        if len(self.log) > self.MAX_LOG:
            self.compact(keep=self.MAX_LOG // 2)
        self.wake()

    def compact(self, keep: int = 0) -> None:
        """Forget all but the last ``keep`` events, as etcd compaction and the watch cache do."""
        dropped = self.log[: len(self.log) - keep] if keep else self.log
        if dropped:
            self.compacted_rv = dropped[-1].rv
        else:
            self.compacted_rv = self.last_rv
        self.log_offset += len(dropped)
        self.log = self.log[len(dropped) :]
        self.wake()

    def wake(self) -> None:
        self._tick.set()
        self._tick = asyncio.Event()

    def drop_watches(self) -> int:
        """Break every open watch stream mid-response (the TCP connection closes)."""
        for raw_request in self._watches.values():
            raw_request.transport.close()
        self.wake()
        return len(self._watches)

    async def _handle(self, request):  # type: ignore[no-untyped-def]
        if request.action == kmock.action.LIST and request.params.get("watch") in ("True", "1"):
            # The official client sends watch=True; the API server parses it as Go's ParseBool does.
            object.__setattr__(request, "action", kmock.action.WATCH)
        if request.action == kmock.action.WATCH:
            await self.hold.wait()  # before an injected failure: a held watch meets it when let go
        for i, (method, suffix, status, applied) in enumerate(self.failures):
            if request.method.value.upper() == method and request.url.path.endswith(suffix):
                del self.failures[i]
                if applied:  # the change is made, the answer lost (a timeout after the commit)
                    await self._prepare_and_handle(request)
                raise kmock.KubernetesError(status=status, reason="Injected", message="injected by the test")
        return await self._prepare_and_handle(request)

    async def _prepare_and_handle(self, request):  # type: ignore[no-untyped-def]
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            meta.setdefault("namespace", request.namespace)
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
        return await super()._handle(request)

    async def _serve_list(self, request):  # type: ignore[no-untyped-def]
        body = await super()._serve_list(request)
        labels = request.params.get("labelSelector")
        fields = request.params.get("fieldSelector")
        items = body["items"]
        if labels:
            wanted = parse_label_selector(labels)
            items = [
                o for o in items if matches_labels((o.get("metadata") or {}).get("labels") or {}, wanted)
            ]
        if fields:
            items = [o for o in items if matches_fields(o, fields)]
        return {**body, "items": items, "metadata": {"resourceVersion": str(self.last_rv)}}

    async def _serve_watch(self, request):  # type: ignore[no-untyped-def]
        yield b""  # send the headers now: the client waits for them before it reads events
        params = request.params
        wanted = parse_label_selector(params.get("labelSelector") or "")
        fields = params.get("fieldSelector") or ""

        def visible(obj: dict[str, Any] | None) -> bool:
            if obj is None or not matches_labels((obj.get("metadata") or {}).get("labels") or {}, wanted):
                return False
            return not fields or matches_fields(obj, fields)

        loop = asyncio.get_running_loop()
        timeout = params.get("timeoutSeconds")
        deadline = loop.time() + float(timeout) if timeout else None
        since = params.get("resourceVersion") or ""
        if since in ("", "0"):
            # "From now": the current objects as ADDED, then what changes after them.
            async with self._lock:
                position = self.log_offset + len(self.log)
                current = [
                    copy.deepcopy(o.raw)
                    for (r, ns, _), o in self.objects.items()
                    if r == request.resource and ns == request.namespace and not o.deleted
                ]
            for obj in current:
                if visible(obj):
                    yield {"type": "ADDED", "object": obj}
        else:
            if int(since) < self.compacted_rv:
                yield _gone(since, self.compacted_rv)
                return
            position = self.log_offset + bisect.bisect_right([e.rv for e in self.log], int(since))
        watch_id = id(request)
        self._watches[watch_id] = request._raw_request
        try:
            while True:
                tick = self._tick
                if position < self.log_offset:  # compacted under a watcher that lagged behind
                    yield _gone(since, self.compacted_rv)
                    return
                while position < self.log_offset + len(self.log):
                    event = self.log[position - self.log_offset]
                    position += 1
                    since = str(event.rv)
                    if event.resource != request.resource or event.namespace != request.namespace:
                        continue
                    was, now = visible(event.prev), visible(event.obj) and event.type != "DELETED"
                    if was and now:
                        yield {"type": "MODIFIED", "object": event.obj}
                    elif now:
                        yield {"type": "ADDED", "object": event.obj}
                    elif was:
                        yield {"type": "DELETED", "object": event.obj}
                if request._raw_request.transport is None or request._raw_request.transport.is_closing():
                    return  # dropped by drop_watches()
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return  # timeoutSeconds: the server ends the stream cleanly
                try:
                    await asyncio.wait_for(tick.wait(), remaining)
                except asyncio.TimeoutError:
                    pass
        finally:
            self._watches.pop(watch_id, None)


class _Buses(dict):  # type: ignore[type-arg]
    def __init__(self, emulator: _Emulator) -> None:
        super().__init__()
        self.emulator = emulator

    def __missing__(self, resource: Any) -> _Recorder:
        self[resource] = recorder = _Recorder(self.emulator, resource)
        return recorder


def _gone(since: str, compacted: int) -> dict[str, Any]:
    return {
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": f"too old resource version: {since} ({compacted})",
            "reason": "Expired",
            "code": 410,
        },
    }


class FakeKubernetes:
    """The fake API server on a loopback port, served from its own thread and event loop (the
    official client is synchronous). Test helpers run on that loop, under the emulator's lock."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.emulator: _Emulator | None = None
        self.url = ""
        self._thread = threading.Thread(target=self._run, name="fake-kubernetes", daemon=True)

    def start(self) -> FakeKubernetes:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake Kubernetes API did not start")
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with _Emulator() as emulator, kmock.Server(emulator) as server:
            for key, kind in RESOURCES.items():
                emulator.resources[key] = kmock.ResourceInfo(kind=kind, namespaced=True)
            self.emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def stop(self) -> None:
        if self.emulator is not None:
            self.drop_watches()  # a server with open streams would wait for them to end
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def api_client(self) -> Any:
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        return client.ApiClient(configuration)

    # -- what the controllers and the kubelet would do, and assertions ------------------------

    def run(self, fn: Callable[[_Emulator], Any]) -> Any:
        """Run ``fn(emulator)`` on the server's loop, holding the emulator's lock."""

        async def locked() -> Any:
            assert self.emulator is not None
            async with self.emulator._lock:
                return fn(self.emulator)

        return asyncio.run_coroutine_threadsafe(locked(), self._loop).result(10)

    def get(self, resource: str, name: str, namespace: str = NAMESPACE) -> dict[str, Any] | None:
        def read(emu: _Emulator) -> dict[str, Any] | None:
            key = (kmock.resource(resource), namespace, name)
            if key not in emu.objects or emu.objects[key].deleted:
                return None
            return dict(emu.objects[key].raw)

        return self.run(read)

    def names(self, resource: str, namespace: str = NAMESPACE) -> list[str]:
        res = kmock.resource(resource)

        def read(emu: _Emulator) -> list[str]:
            return sorted(
                n for (r, ns, n), o in emu.objects.items() if r == res and ns == namespace and not o.deleted
            )

        return self.run(read)

    def put(self, resource: str, obj: dict[str, Any], namespace: str = NAMESPACE) -> None:
        """Store an object directly (as a controller would create it), without an HTTP request.
        Watches see it like any other change."""

        def write(emu: _Emulator) -> None:
            meta = obj.setdefault("metadata", {})
            meta.setdefault("namespace", namespace)
            meta.setdefault("uid", str(uuid.uuid4()))
            res = kmock.resource(resource)
            key = (res, namespace, meta["name"])
            if key in emu.objects and not emu.objects[key].deleted:
                emu.objects[key].patch(obj)
                emu.record(res, key, "MODIFIED")
            elif key in emu.objects:
                emu.objects[key].create(obj)
                emu.record(res, key, "ADDED")
            else:
                emu.objects[key] = obj
                emu.record(res, key, "ADDED")

        self.run(write)

    def patch(self, resource: str, name: str, changes: dict[str, Any], namespace: str = NAMESPACE) -> None:
        """Merge-patch an object as a controller would (status, conditions); watches see it."""

        def write(emu: _Emulator) -> None:
            res = kmock.resource(resource)
            emu.objects[res, namespace, name].patch(changes)
            emu.record(res, (res, namespace, name), "MODIFIED")

        self.run(write)

    def delete(self, resource: str, name: str, namespace: str = NAMESPACE) -> None:
        """Remove an object at once, as the garbage collector would; watches see it."""

        def write(emu: _Emulator) -> None:
            res = kmock.resource(resource)
            emu.objects[res, namespace, name].delete()
            emu.record(res, (res, namespace, name), "DELETED")

        self.run(write)

    # -- what a real API server does at its own moments ----------------------------------------

    def compact(self) -> None:
        """Forget the event log: a watch that resumes from an older resourceVersion gets 410 Gone."""
        self.run(lambda emu: emu.compact())

    def drop_watches(self) -> int:
        """Break every open watch stream mid-response. Returns how many there were."""
        return self.run(lambda emu: emu.drop_watches())

    def hold_watches(self, held: bool = True) -> None:
        """While held, new watch requests wait unanswered (a partition); release with False."""
        self.run(lambda emu: emu.hold.clear() if held else emu.hold.set())

    def fail_next(self, method: str, path_suffix: str, status: int = 500, *, applied: bool = False) -> None:
        """The next ``method`` request whose path ends with ``path_suffix`` answers ``status``; it
        changes nothing, unless ``applied`` (the change is made and the answer lost)."""
        self.run(lambda emu: emu.failures.append((method.upper(), path_suffix, status, applied)))

    def open_watches(self) -> int:
        return self.run(lambda emu: len(emu._watches))

    def requests(self) -> list[tuple[str, str, dict[str, str], Any]]:
        """(method, path, query, body) of every request so far."""
        return self.run(lambda emu: [(r.method, r.url.path, dict(r.params), r.data) for r in emu._requests])

    def clear_requests(self) -> None:
        self.run(lambda emu: emu._requests.clear())


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
