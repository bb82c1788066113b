"""A FAKE Kubernetes API server: kmock's in-memory emulator over real HTTP on loopback.

No Kubernetes can run here, so this is the one fake of the test suite (STYLE.md item 10). The
official ``kubernetes`` client talks to it over HTTP exactly as it would to a cluster. It runs
no controllers: no pods appear, no Job ever finishes on its own. Tests set Job and pod status
themselves, as the Job controller and the kubelet would.

kmock (0.8) stores objects and answers create (409 on a duplicate), get, list, merge-patch and
delete (404 when absent). What a real API server also does, and this subclass adds:

- on create: ``metadata.uid``, ``creationTimestamp``, ``resourceVersion`` and ``namespace``
  (ownerReferences need the uid);
- on list: ``labelSelector`` (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``) and
  ``fieldSelector`` (``path=value``, ``path!=value``) filtering.

It does not run admission, validation (the manifests are checked against the official schemas
by ``kubernetes-validate`` instead), defaulting, garbage collection or watches with bookmarks.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import re
import threading
import uuid
from collections.abc import Callable
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


class _Emulator(KubernetesEmulator):
    """kmock's emulator plus what a real API server adds on create and filters on list."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._versions = itertools.count(1)

    async def _handle(self, request):  # type: ignore[no-untyped-def]
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            meta.setdefault("namespace", request.namespace)
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
            meta["resourceVersion"] = str(next(self._versions))
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
        return {**body, "items": items, "metadata": {"resourceVersion": str(next(self._versions))}}


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
        """Store an object directly (as a controller would create it), without an HTTP request."""

        def write(emu: _Emulator) -> None:
            meta = obj.setdefault("metadata", {})
            meta.setdefault("namespace", namespace)
            meta.setdefault("uid", str(uuid.uuid4()))
            key = (kmock.resource(resource), namespace, meta["name"])
            if key in emu.objects and not emu.objects[key].deleted:
                emu.objects[key].patch(obj)
            else:
                emu.objects[key] = obj

        self.run(write)

    def patch(self, resource: str, name: str, changes: dict[str, Any], namespace: str = NAMESPACE) -> None:
        self.run(lambda emu: emu.objects[kmock.resource(resource), namespace, name].patch(changes))

    def requests(self) -> list[tuple[str, str, dict[str, str], Any]]:
        """(method, path, query, body) of every request so far."""
        return self.run(lambda emu: [(r.method, r.url.path, dict(r.params), r.data) for r in emu._requests])

    def clear_requests(self) -> None:
        self.run(lambda emu: emu._requests.clear())


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
