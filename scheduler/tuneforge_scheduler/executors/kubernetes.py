"""Runs each attempt as a Kubernetes Job, through the official ``kubernetes`` client.

The cluster, not this process, is the record: names are deterministic (``ft-{job}-a{n}``), a
create that answers 409 for an object with our labels is a success, and a restarted scheduler
finds its Jobs by name. The manifests come from the pure builders in ``tuneforge_scheduler.k8s``.

Cost of a reconcile pass: ``refresh()`` reads the Jobs of this release whose end is not yet
recorded from a watch cache (``k8s/watch.py``: one LIST at start, then a watch that resumes from
its resourceVersion, and a new LIST only on 410 Gone), so a pass normally sends no request at
all. While the watch is not healthy (starting, or its stream broke), the pass makes one LIST
instead. Either way it adds one LIST of Pending pods when some Job has pods that are not ready.
``status()`` answers from that snapshot; only a Job missing from it costs a GET (one created
after the snapshot, or a lost one). Once the scheduler has recorded how an attempt ended,
``release()`` labels its Job ``tuneforge.io/recorded=true`` (so it leaves the list and the watch)
and sets ``ttlSecondsAfterFinished`` (so Kubernetes deletes it, with everything it owns).

Orphans: ``orphan_candidates()`` names the unrecorded Jobs that no running attempt owns; the
scheduler checks them against the database (``k8s/orphans.py``) and ``reap_orphans()`` deletes
those still orphaned after a grace period.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.types import JobSpec
from tuneforge_scheduler.executors.base import RunRef, RunStatus, run_name
from tuneforge_scheduler.k8s import job_status
from tuneforge_scheduler.k8s.manifests import (
    build_env_secret,
    build_headless_service,
    build_job,
    build_spec_configmap,
    owner_reference,
)
from tuneforge_scheduler.k8s.names import (
    ATTEMPT,
    COMPONENT,
    IDENTITY_LABELS,
    INSTANCE,
    JOB_ID,
    MANAGED_BY,
    MANAGER,
    PROJECT,
    RECORDED,
    RUN,
    active_selector,
    object_name,
    release_selector,
)
from tuneforge_scheduler.k8s.watch import Gone, WatchCache
from tuneforge_scheduler.settings import KubernetesSettings

log = logging.getLogger("tuneforge.scheduler.kubernetes")

IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# Keys of the scheduler's env that describe the scheduler's machine, not the pod's.
HOST_ONLY_ENV = {"TUNEFORGE_HOME"}
MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT_S = 30


class ForeignObjectError(RuntimeError):
    """A create answered 409 and the object there is not this attempt's (other labels)."""


@dataclass(frozen=True)
class _Snapshot:
    taken: float
    jobs: dict[str, dict[str, Any]]
    pods: dict[str, list[dict[str, Any]]]


class KubernetesExecutor:
    def __init__(
        self,
        settings: KubernetesSettings,
        *,
        api_client: Any | None = None,
        models_dir: str | None = None,
        snapshot_max_age_s: float = 30.0,
        cancel_wait_s: float = 15.0,
        watch: bool = True,
        watch_timeout_s: int = 240,
        orphan_grace_s: float = 120.0,
    ) -> None:
        from kubernetes import client  # optional dependency: the "kubernetes" extra

        self.settings = settings
        self.max_concurrent = settings.max_jobs
        self.api_client = api_client or _load_api_client(settings)
        self.batch = client.BatchV1Api(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self.namespace = settings.namespace or _pod_namespace() or "default"
        self.models_dir = models_dir
        self.snapshot_max_age_s = snapshot_max_age_s
        self.cancel_wait_s = cancel_wait_s
        self.orphan_grace_s = orphan_grace_s
        self._snapshot: _Snapshot | None = None
        # Started by the first refresh(), so a process that never reconciles opens no watch.
        self.jobs_watch: WatchCache | None = (
            WatchCache(
                self._list_jobs_for_watch,
                self._open_jobs_watch,
                what=f"Jobs in {self.namespace}",
                timeout_s=watch_timeout_s,
                keep=lambda job: ((job.get("metadata") or {}).get("labels") or {}).get(RECORDED) != "true",
            )
            if watch
            else None
        )
        self._orphans_since: dict[str, float] = {}  # run name -> when first confirmed an orphan

    # -- submit -------------------------------------------------------------------------------

    def submit(self, name: str, spec: JobSpec, env: dict[str, str]) -> None:
        """The Secret and ConfigMap first (a pod that starts without them fails with
        CreateContainerConfigError or waits on its mount), then the Job, then hand them to the Job
        (ownerReferences) so they go with it. Every step is idempotent; if the Job cannot be
        created, the Secret and ConfigMap are deleted again."""
        k8s_name = object_name(name)
        ns = self.namespace
        max_duration = getattr(spec.resources, "max_duration_s", None)  # a proposed JobSpec field
        job = build_job(
            spec,
            self.settings,
            name=k8s_name,
            namespace=ns,
            max_duration_s=max_duration,
            models_dir=self.models_dir,
        )
        pod_env = {k: v for k, v in env.items() if k not in HOST_ONLY_ENV}
        secret = build_env_secret(spec, self.settings, pod_env, name=k8s_name, namespace=ns)
        secret_obj, is_new = self._create(
            secret,
            lambda: self.core.create_namespaced_secret(ns, secret, **_raw()),
            self.core.read_namespaced_secret,
        )
        if not is_new:
            # A relaunch of the same attempt mints a new job token; the pod must get that one.
            self.core.patch_namespaced_secret(
                k8s_name, ns, {"stringData": secret["stringData"]}, _content_type=MERGE_PATCH, **_raw()
            )
        configmap = build_spec_configmap(spec, self.settings, name=k8s_name, namespace=ns)
        configmap_obj, _ = self._create(
            configmap,
            lambda: self.core.create_namespaced_config_map(ns, configmap, **_raw()),
            self.core.read_namespaced_config_map,
        )
        try:
            created, _ = self._create(
                job,
                lambda: self.batch.create_namespaced_job(ns, job, **_raw()),
                self.batch.read_namespaced_job,
            )
        except Exception as create_error:
            # A create that timed out may have succeeded: then the Job needs them after all.
            try:
                found = self._our_job(job)
            except Exception:  # noqa: BLE001 - the create's own error is the one to raise
                # Cannot tell whether the Job exists: keep them, or its pod could wait forever on a
                # missing Secret. If there is no Job, the relaunch adopts them and cancel deletes them.
                log.warning("could not create Job %s/%s, nor read it back", ns, k8s_name)
                raise create_error from None
            if found is None:
                # Without a Job to own them, nothing would ever delete them.
                log.warning("could not create Job %s/%s; deleting its Secret and ConfigMap", ns, k8s_name)
                self._delete_attempt_data(k8s_name)
                raise
            created = found
        owner = owner_reference(created)
        try:
            self._adopt(secret_obj, owner, self.core.patch_namespaced_secret)
            self._adopt(configmap_obj, owner, self.core.patch_namespaced_config_map)
        except Exception:
            # Unowned, they would outlive the Job. Start over: once this Job is gone, the scheduler
            # finds the attempt missing and launches it again.
            log.warning(
                "could not hand Secret and ConfigMap %s/%s to their Job; deleting all three", ns, k8s_name
            )
            self._delete_job(k8s_name)
            self._delete_attempt_data(k8s_name)
            raise
        if spec.resources.nodes > 1:
            service = build_headless_service(spec, self.settings, name=k8s_name, namespace=ns, owner=owner)
            self._create(
                service,
                lambda: self.core.create_namespaced_service(ns, service, **_raw()),
                self.core.read_namespaced_service,
            )
        log.info("submitted Job %s/%s (%d node(s))", ns, k8s_name, spec.resources.nodes)

    def _adopt(self, obj: dict[str, Any], owner: dict[str, Any], patch: Any) -> None:
        """Make the Job the owner of ``obj`` (garbage-collected with it), unless it already is."""
        meta = obj.get("metadata") or {}
        if any(ref.get("uid") == owner["uid"] for ref in meta.get("ownerReferences") or []):
            return
        patch(
            meta["name"],
            meta["namespace"],
            {"metadata": {"ownerReferences": [owner]}},
            _content_type=MERGE_PATCH,
            **_raw(),
        )

    def _delete_job(self, k8s_name: str, preconditions: dict[str, str] | None = None) -> bool:
        """Delete a Job and, first (Foreground), its pods. False when it was already gone."""
        from kubernetes.client.exceptions import ApiException

        # The policy both as a query parameter and in the body, which API servers read first.
        body: dict[str, Any] = {"propagationPolicy": "Foreground"}
        if preconditions:
            body["preconditions"] = preconditions
        try:
            self.batch.delete_namespaced_job(
                k8s_name, self.namespace, propagation_policy="Foreground", body=body, **_raw()
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            return False
        return True

    def _our_job(self, job: dict[str, Any]) -> dict[str, Any] | None:
        """The Job of this attempt if it exists with our labels; None if it does not. Raises when
        the API server cannot tell."""
        found = self._get_job(job["metadata"]["name"])
        labels = ((found or {}).get("metadata") or {}).get("labels") or {}
        if found is None or any(labels.get(k) != job["metadata"]["labels"][k] for k in IDENTITY_LABELS):
            return None
        return found

    def _delete_attempt_data(self, k8s_name: str) -> None:
        """Delete an attempt's Secret and ConfigMap, best effort; one already gone is fine."""
        from kubernetes.client.exceptions import ApiException

        for delete in (self.core.delete_namespaced_secret, self.core.delete_namespaced_config_map):
            try:
                delete(k8s_name, self.namespace, **_raw())
            except ApiException as exc:
                if exc.status != 404:
                    log.warning("could not delete %s of %s: HTTP %s", delete.__name__, k8s_name, exc.status)
            except Exception as exc:  # noqa: BLE001 - the caller re-raises its own error
                log.warning("could not delete %s of %s: %s", delete.__name__, k8s_name, type(exc).__name__)

    def _create(self, manifest: dict[str, Any], create: Any, read: Any) -> tuple[dict[str, Any], bool]:
        """Create, or accept the object already there if it carries this attempt's labels.
        Returns the object and whether this call created it."""
        from kubernetes.client.exceptions import ApiException

        try:
            return _json(create()), True
        except ApiException as exc:
            if exc.status != 409:
                raise
        meta = manifest["metadata"]
        existing = _json(read(meta["name"], meta["namespace"], **_raw()))
        labels = (existing.get("metadata") or {}).get("labels") or {}
        if any(labels.get(key) != meta["labels"][key] for key in IDENTITY_LABELS):
            raise ForeignObjectError(f"{manifest['kind']} {meta['name']} exists and is not this attempt's")
        return existing, False

    # -- status -------------------------------------------------------------------------------

    def refresh(self) -> None:
        """This release's unrecorded Jobs from the watch cache, or one LIST while the watch is not
        healthy (plus Pending pods if some are not ready)."""
        watch = self.jobs_watch
        if watch is not None:
            watch.start()
        try:
            jobs = watch.items() if watch is not None and watch.healthy else self._list_jobs()
            pods: dict[str, list[dict[str, Any]]] = {}
            if any(job_status.needs_pod_details(job) for job in jobs.values()):
                pods = self._list_pending_pods()
        except Exception:
            self._snapshot = None  # never answer from a stale list
            raise
        self._snapshot = _Snapshot(time.monotonic(), jobs, pods)

    def _list_jobs(self) -> dict[str, dict[str, Any]]:
        items, _ = self._list_jobs_for_watch()
        return {item["metadata"]["name"]: item for item in items}

    def _list_jobs_for_watch(self) -> tuple[list[dict[str, Any]], str]:
        body = _json(
            self.batch.list_namespaced_job(
                self.namespace, label_selector=active_selector(self.settings.release), **_raw()
            )
        )
        return list(body.get("items") or []), str((body.get("metadata") or {}).get("resourceVersion") or "")

    def _open_jobs_watch(self, resource_version: str, timeout_s: int) -> _EventStream:
        from kubernetes.client.exceptions import ApiException

        try:
            response = self.batch.list_namespaced_job(
                self.namespace,
                label_selector=active_selector(self.settings.release),
                watch=True,
                resource_version=resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout_s,
                _preload_content=False,
                # The server ends the stream after timeout_s; silence well past that is a dead link.
                _request_timeout=(REQUEST_TIMEOUT_S, timeout_s + REQUEST_TIMEOUT_S),
            )
        except ApiException as exc:
            if exc.status == 410:
                raise Gone() from exc
            raise
        return _EventStream(response)

    def _list_pending_pods(self, run: str | None = None) -> dict[str, list[dict[str, Any]]]:
        selector = release_selector(self.settings.release)
        if run:
            selector += f",{RUN}={run}"
        body = _json(
            self.core.list_namespaced_pod(
                self.namespace, label_selector=selector, field_selector="status.phase=Pending", **_raw()
            )
        )
        by_run: dict[str, list[dict[str, Any]]] = {}
        for pod in body.get("items") or []:
            by_run.setdefault(((pod.get("metadata") or {}).get("labels") or {}).get(RUN, ""), []).append(pod)
        return by_run

    def status(self, name: str) -> RunStatus:
        k8s_name = object_name(name)
        snap = self._snapshot
        if (
            snap is not None
            and time.monotonic() - snap.taken <= self.snapshot_max_age_s
            and k8s_name in snap.jobs
        ):
            job = snap.jobs[k8s_name]
            pods = snap.pods.get(k8s_name, [])
        else:
            job = self._get_job(k8s_name)
            pods = []
            if job is not None and job_status.needs_pod_details(job):
                pods = self._list_pending_pods(k8s_name).get(k8s_name, [])
        if job is not None and job_status.is_finished(job):
            # The exit code lives on the failed pod; read it once, when the attempt has ended.
            if "Failed" in job_status.true_conditions(job):
                pods = self._list_pods(k8s_name)
        return job_status.run_status(job, pods)

    def _get_job(self, k8s_name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return _json(self.batch.read_namespaced_job(k8s_name, self.namespace, **_raw()))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _list_pods(self, k8s_name: str) -> list[dict[str, Any]]:
        body = _json(
            self.core.list_namespaced_pod(self.namespace, label_selector=f"{RUN}={k8s_name}", **_raw())
        )
        return list(body.get("items") or [])

    # -- cancel and clean-up ------------------------------------------------------------------

    def cancel(self, name: str) -> None:
        """Delete the Job and (Foreground) its pods; wait a little for them to stop. 404 is done."""
        k8s_name = object_name(name)
        if not self._delete_job(k8s_name):
            # No Job: a crash between creating the Secret and the Job may have left them unowned.
            self._delete_attempt_data(k8s_name)
            return
        # With Foreground propagation the Job stays (with a deletionTimestamp) until its pods are
        # gone, so its disappearance means the trainer stopped writing. Bounded: a pass must go on.
        deadline = time.monotonic() + self.cancel_wait_s
        while time.monotonic() < deadline:
            if self._get_job(k8s_name) is None:
                return
            time.sleep(0.5)
        log.warning("Job %s is still stopping after %.0f s", k8s_name, self.cancel_wait_s)

    def release(self, name: str) -> None:
        """The scheduler has recorded how this attempt ended: stop listing its Job, let Kubernetes
        delete it after ``ttl_after_finished_s``. A Job that is already gone is fine."""
        from kubernetes.client.exceptions import ApiException

        k8s_name = object_name(name)
        patch = {
            "metadata": {"labels": {RECORDED: "true"}},
            "spec": {"ttlSecondsAfterFinished": self.settings.ttl_after_finished_s},
        }
        try:
            self.batch.patch_namespaced_job(
                k8s_name, self.namespace, patch, _content_type=MERGE_PATCH, **_raw()
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
        if self.jobs_watch is not None:
            self.jobs_watch.forget(k8s_name)  # its event follows; the next pass must not see it

    def orphan_candidates(self, expected: set[str]) -> list[RunRef]:
        """Unrecorded Jobs of this installation whose run is not in ``expected`` (the runs of the
        jobs that are running). Only Jobs that carry all our labels, agreeing with their name, and
        that are not already being deleted. From the watch cache, else a fresh snapshot."""
        watch = self.jobs_watch
        snap = self._snapshot
        if watch is not None and watch.healthy:
            jobs = watch.items()
        elif snap is not None and time.monotonic() - snap.taken <= self.snapshot_max_age_s:
            jobs = snap.jobs
        else:
            return []
        found = []
        for k8s_name, job in jobs.items():
            ref = _run_ref(job, self.settings.release)
            if ref is None or object_name(ref.name) != k8s_name or ref.name in expected:
                continue
            if (job.get("metadata") or {}).get("deletionTimestamp"):
                continue  # already being deleted
            found.append(ref)
        return found

    def reap_orphans(self, orphans: dict[str, str]) -> list[str]:
        """Delete (Foreground) the Jobs of ``orphans`` (run name -> why) that have been orphans
        for ``orphan_grace_s``; a run that is no longer named starts its grace period afresh.
        Each Job is read again first: still unrecorded, and deleted only if its uid is the same."""
        from kubernetes.client.exceptions import ApiException

        now = time.monotonic()
        self._orphans_since = {run: self._orphans_since.get(run, now) for run in orphans}
        deleted = []
        for run, why in orphans.items():
            if now - self._orphans_since[run] < self.orphan_grace_s:
                continue
            k8s_name = object_name(run)
            job = self._get_job(k8s_name)
            labels = ((job or {}).get("metadata") or {}).get("labels") or {}
            if job is None or labels.get(RECORDED) == "true" or _run_ref(job, self.settings.release) is None:
                self._orphans_since.pop(run, None)
                continue
            log.warning("deleting orphan Job %s/%s: %s", self.namespace, k8s_name, why)
            # The uid precondition: never a new Job that took the name since we read it (409).
            try:
                self._delete_job(k8s_name, preconditions={"uid": job["metadata"]["uid"]})
            except ApiException as exc:
                if exc.status != 409:
                    raise
            self._orphans_since.pop(run, None)
            deleted.append(run)
        return deleted

    def shutdown(self) -> None:
        """Jobs outlive the scheduler (unlike local processes): a restarted scheduler finds them."""
        if self.jobs_watch is not None:
            self.jobs_watch.stop()
        self.api_client.close()


def _run_ref(job: dict[str, Any], release: str) -> RunRef | None:
    """The run a Job belongs to, if it carries every label we put on ours for this release."""
    labels = (job.get("metadata") or {}).get("labels") or {}
    ours = labels.get(MANAGED_BY) == MANAGER and labels.get(INSTANCE) == release
    attempt = labels.get(ATTEMPT, "")
    if not ours or labels.get(COMPONENT) != "trainer" or not attempt.isdigit():
        return None
    if not labels.get(JOB_ID) or not labels.get(PROJECT):
        return None
    job_id = labels[JOB_ID]
    return RunRef(run_name(job_id, int(attempt)), job_id, int(attempt), labels[PROJECT])


class _EventStream:
    """The events of one watch response, one JSON object per line, as they arrive."""

    def __init__(self, response: Any) -> None:
        self.response = response

    def __iter__(self) -> Iterator[dict[str, Any]]:
        buffer = b""
        for chunk in self.response.stream(amt=None, decode_content=False):
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line.strip():
                    yield json.loads(line)

    def close(self) -> None:
        # From another thread (shutdown), closing the response would wait for the reader's lock
        # while the reader waits for data: shut the socket first, so the read returns at once.
        sock = getattr(getattr(self.response, "connection", None), "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed
        self.response.close()
        self.response.release_conn()


def _raw() -> dict[str, Any]:
    # Plain JSON instead of the client's model classes: parsing 500 Jobs into models costs seconds.
    return {"_preload_content": False, "_request_timeout": REQUEST_TIMEOUT_S}


def _json(response: Any) -> dict[str, Any]:
    return json.loads(response.data or b"{}")


def _pod_namespace() -> str | None:
    try:
        return IN_CLUSTER_NAMESPACE.read_text().strip() or None
    except OSError:
        return None


def _load_api_client(settings: KubernetesSettings) -> Any:
    """In-cluster config inside a pod, else a kubeconfig (``settings.kubeconfig`` or the default)."""
    from kubernetes import client, config

    if settings.kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ:
        config.load_incluster_config()
        return client.ApiClient()
    configuration = client.Configuration()
    config.load_kube_config(
        config_file=settings.kubeconfig, context=settings.context, client_configuration=configuration
    )
    return client.ApiClient(configuration)
