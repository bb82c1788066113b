"""Runs each attempt as a Kubernetes Job, through the official ``kubernetes`` client.

The cluster, not this process, is the record: names are deterministic (``ft-{job}-a{n}``), a
create that answers 409 for an object with our labels is a success, and a restarted scheduler
finds its Jobs by name. The manifests come from the pure builders in ``tuneforge_scheduler.k8s``.

Cost of a reconcile pass: ``refresh()`` lists the Jobs of this release whose end is not yet
recorded (one LIST, label selector), plus one LIST of Pending pods when some Job has pods that
are not ready. ``status()`` then answers from that snapshot; only a Job missing from it costs a
GET (one created after the list, or a lost one). Once the scheduler has recorded how an attempt
ended, ``release()`` labels its Job ``tuneforge.io/recorded=true`` (so no later pass lists it)
and sets ``ttlSecondsAfterFinished`` (so Kubernetes deletes it, with everything it owns).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.types import JobSpec
from tuneforge_scheduler.executors.base import RunStatus
from tuneforge_scheduler.k8s import job_status
from tuneforge_scheduler.k8s.manifests import (
    build_env_secret,
    build_headless_service,
    build_job,
    build_spec_configmap,
    owner_reference,
)
from tuneforge_scheduler.k8s.names import (
    IDENTITY_LABELS,
    RECORDED,
    RUN,
    active_selector,
    object_name,
    release_selector,
)
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
        self._snapshot: _Snapshot | None = None

    # -- submit -------------------------------------------------------------------------------

    def submit(self, name: str, spec: JobSpec, env: dict[str, str]) -> None:
        """Create the Job, then the objects it owns. Every step is idempotent."""
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
        created, _ = self._create(
            job, lambda: self.batch.create_namespaced_job(ns, job, **_raw()), self.batch.read_namespaced_job
        )
        owner = owner_reference(created)
        pod_env = {k: v for k, v in env.items() if k not in HOST_ONLY_ENV}
        secret = build_env_secret(spec, self.settings, pod_env, name=k8s_name, namespace=ns, owner=owner)
        _, is_new = self._create(
            secret,
            lambda: self.core.create_namespaced_secret(ns, secret, **_raw()),
            self.core.read_namespaced_secret,
        )
        if not is_new:
            # A relaunch of the same attempt mints a new job token; the pod must get that one.
            self.core.patch_namespaced_secret(
                k8s_name, ns, {"stringData": secret["stringData"]}, _content_type=MERGE_PATCH, **_raw()
            )
        configmap = build_spec_configmap(spec, self.settings, name=k8s_name, namespace=ns, owner=owner)
        self._create(
            configmap,
            lambda: self.core.create_namespaced_config_map(ns, configmap, **_raw()),
            self.core.read_namespaced_config_map,
        )
        if spec.resources.nodes > 1:
            service = build_headless_service(spec, self.settings, name=k8s_name, namespace=ns, owner=owner)
            self._create(
                service,
                lambda: self.core.create_namespaced_service(ns, service, **_raw()),
                self.core.read_namespaced_service,
            )
        log.info("submitted Job %s/%s (%d node(s))", ns, k8s_name, spec.resources.nodes)

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
        """One LIST of this release's unrecorded Jobs (plus Pending pods if some are not ready)."""
        try:
            jobs = self._list_jobs()
            pods: dict[str, list[dict[str, Any]]] = {}
            if any(job_status.needs_pod_details(job) for job in jobs.values()):
                pods = self._list_pending_pods()
        except Exception:
            self._snapshot = None  # never answer from a stale list
            raise
        self._snapshot = _Snapshot(time.monotonic(), jobs, pods)

    def _list_jobs(self) -> dict[str, dict[str, Any]]:
        body = _json(
            self.batch.list_namespaced_job(
                self.namespace, label_selector=active_selector(self.settings.release), **_raw()
            )
        )
        return {item["metadata"]["name"]: item for item in body.get("items") or []}

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
        from kubernetes.client.exceptions import ApiException

        k8s_name = object_name(name)
        try:
            self.batch.delete_namespaced_job(
                k8s_name, self.namespace, propagation_policy="Foreground", grace_period_seconds=None, **_raw()
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
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

        patch = {
            "metadata": {"labels": {RECORDED: "true"}},
            "spec": {"ttlSecondsAfterFinished": self.settings.ttl_after_finished_s},
        }
        try:
            self.batch.patch_namespaced_job(
                object_name(name), self.namespace, patch, _content_type=MERGE_PATCH, **_raw()
            )
        except ApiException as exc:
            if exc.status != 404:
                raise

    def shutdown(self) -> None:
        """Jobs outlive the scheduler (unlike local processes): a restarted scheduler finds them."""
        self.api_client.close()


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
