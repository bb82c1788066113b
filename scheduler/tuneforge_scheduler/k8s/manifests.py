"""Pure manifest builders: a ``JobSpec`` and the executor's settings in, Kubernetes objects (dicts) out.

One attempt is:

- a ``batch/v1`` Job ``ft-{job}-a{attempt}``: one pod, or an Indexed Job of ``resources.nodes``
  pods that each run ``torchrun`` (``MASTER_ADDR=<job>-0.<svc>``, ``NODE_RANK`` = completion index);
- a ConfigMap of the same name holding ``spec.json`` (no secrets in it);
- a Secret of the same name holding the attempt's environment (the job token);
- for several nodes, a headless Service of the same name, so pods reach rank 0 by DNS.

The Secret and ConfigMap are created before the Job (a pod must never start without them), then
given to the Job through an ownerReference; the Service is created after it, owned from the start.
Kubernetes deletes all three with the Job.
"""

from __future__ import annotations

import shlex
from typing import Any

from tuneforge.types import JobSpec
from tuneforge_scheduler.k8s.names import (
    COMPLETION_INDEX_ANNOTATION,
    KUEUE_QUEUE,
    RUN,
    TRAINER_CONTAINER,
    run_labels,
)
from tuneforge_scheduler.settings import GPU_RESOURCE, KubernetesSettings

EXIT_NON_RETRIABLE = 42  # DESIGN.md contract 4
SPEC_DIR = "/etc/tuneforge"
SPEC_FILE = "spec.json"
SCRATCH_DIR = "/tmp"
TERMINATION_GRACE_S = 60  # the trainer stops on SIGTERM; torchrun passes it on to the workers

Manifest = dict[str, Any]


def owner_reference(job: Manifest) -> Manifest:
    """An ownerReference to a created Job (it needs the uid the API server gave it)."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": job["metadata"]["name"],
        "uid": job["metadata"]["uid"],
    }


def _metadata(name: str, namespace: str, labels: dict[str, str], owner: Manifest | None) -> Manifest:
    meta: Manifest = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if owner is not None:
        meta["ownerReferences"] = [owner]
    return meta


def build_spec_configmap(
    spec: JobSpec, settings: KubernetesSettings, *, name: str, namespace: str, owner: Manifest | None = None
) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(name, namespace, _labels(spec, settings, name), owner),
        "data": {SPEC_FILE: spec.model_dump_json(indent=2)},
    }


def build_env_secret(
    spec: JobSpec,
    settings: KubernetesSettings,
    env: dict[str, str],
    *,
    name: str,
    namespace: str,
    owner: Manifest | None = None,
) -> Manifest:
    """The attempt's environment from the scheduler (the job token) as a Secret, never in the spec."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(name, namespace, _labels(spec, settings, name), owner),
        "type": "Opaque",
        "stringData": dict(sorted(env.items())),
    }


def build_headless_service(
    spec: JobSpec, settings: KubernetesSettings, *, name: str, namespace: str, owner: Manifest | None = None
) -> Manifest:
    """DNS for the pods of a multi-node run: ``<name>-<index>.<name>`` resolves to each pod."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, namespace, _labels(spec, settings, name), owner),
        "spec": {
            "clusterIP": "None",
            # Rank 0 must be resolvable before it is "ready": the other ranks connect while it starts.
            "publishNotReadyAddresses": True,
            "selector": {RUN: name},
            "ports": [
                {"name": "rendezvous", "port": settings.master_port, "targetPort": settings.master_port}
            ],
        },
    }


def build_job(
    spec: JobSpec,
    settings: KubernetesSettings,
    *,
    name: str,
    namespace: str,
    max_duration_s: int | None = None,
    models_dir: str | None = None,
) -> Manifest:
    """The Job of one attempt. ``max_duration_s`` (the job's own limit) can only lower the
    settings' ``max_duration_s``; ``models_dir`` is where the base models' volume is mounted."""
    nodes = spec.resources.nodes
    labels = _labels(spec, settings, name)
    job_spec: Manifest = {
        # One failure ends the attempt; the scheduler starts the next one from the last checkpoint.
        "backoffLimit": 0,
        "activeDeadlineSeconds": min(max_duration_s or settings.max_duration_s, settings.max_duration_s),
        # A replacement pod starts only once the old one has stopped (no two writers of a checkpoint).
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": {
            "rules": [
                # Preemption, eviction, node drain: not the trainer's fault; the Job replaces the pod.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                # Bad data or config: no retry will help.
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": TRAINER_CONTAINER,
                        "operator": "In",
                        "values": [EXIT_NON_RETRIABLE],
                    },
                },
            ]
        },
        "template": {
            "metadata": {"labels": dict(labels)},
            "spec": _pod_spec(spec, settings, name=name, models_dir=models_dir),
        },
    }
    if nodes > 1:
        job_spec.update({"completionMode": "Indexed", "completions": nodes, "parallelism": nodes})
    if settings.kueue_queue:
        # Kueue admits the Job by unsuspending it when the queue has quota; we never do.
        job_spec["suspend"] = True
    metadata: Manifest = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if settings.kueue_queue:
        metadata["labels"][KUEUE_QUEUE] = settings.kueue_queue
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": job_spec}


def _labels(spec: JobSpec, settings: KubernetesSettings, name: str) -> dict[str, str]:
    return run_labels(settings.release, spec.job_id, spec.attempt, name, spec.project_id)


def _pod_spec(spec: JobSpec, settings: KubernetesSettings, *, name: str, models_dir: str | None) -> Manifest:
    gpus = spec.resources.gpus
    resources: Manifest = {
        # No CPU limit: CFS throttling slows data loading and NCCL for no gain.
        "requests": {"cpu": settings.cpu, "memory": settings.memory},
        "limits": {"memory": settings.memory},
    }
    if gpus:
        resources["requests"][GPU_RESOURCE] = str(gpus)
        resources["limits"][GPU_RESOURCE] = str(gpus)

    volumes: list[Manifest] = [
        {"name": "spec", "configMap": {"name": name}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}},
        {"name": "scratch", "emptyDir": {}},
    ]
    mounts: list[Manifest] = [
        {"name": "spec", "mountPath": SPEC_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "scratch", "mountPath": SCRATCH_DIR},
    ]
    if settings.models_volume_claim and models_dir:
        volumes.append(
            {
                "name": "models",
                "persistentVolumeClaim": {"claimName": settings.models_volume_claim, "readOnly": True},
            }
        )
        mounts.append({"name": "models", "mountPath": models_dir, "readOnly": True})

    env_from: list[Manifest] = [{"secretRef": {"name": name}}]
    if settings.storage_secret:
        env_from.insert(0, {"secretRef": {"name": settings.storage_secret}})

    container: Manifest = {
        "name": TRAINER_CONTAINER,
        "image": settings.trainer_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": _command(spec, settings, name=name),
        "env": _env(spec, settings, name=name),
        "envFrom": env_from,
        "resources": resources,
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod: Manifest = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        # The trainer talks to storage and to our API, never to the Kubernetes API.
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": volumes,
    }
    if spec.resources.nodes > 1:
        pod["subdomain"] = name  # with the headless Service: "<name>-<index>.<name>" in DNS
    if settings.node_selector:
        pod["nodeSelector"] = dict(settings.node_selector)
    if settings.tolerations:
        pod["tolerations"] = [dict(t) for t in settings.tolerations]
    if settings.priority_class:
        pod["priorityClassName"] = settings.priority_class
    if settings.service_account:
        pod["serviceAccountName"] = settings.service_account
    if settings.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in settings.image_pull_secrets]
    return pod


def _env(spec: JobSpec, settings: KubernetesSettings, *, name: str) -> list[Manifest]:
    env: list[Manifest] = [
        {"name": "HOME", "value": SCRATCH_DIR},
        {"name": "TUNEFORGE_HOME", "value": f"{SCRATCH_DIR}/tuneforge"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "TUNEFORGE_RUN", "value": name},
    ]
    if spec.resources.nodes > 1:
        env += [
            {"name": "MASTER_ADDR", "value": f"{name}-0.{name}"},
            {"name": "MASTER_PORT", "value": str(settings.master_port)},
            {"name": "NNODES", "value": str(spec.resources.nodes)},
            {"name": "NPROC_PER_NODE", "value": str(max(spec.resources.gpus, 1))},
            {
                "name": "NODE_RANK",
                "valueFrom": {
                    "fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}
                },
            },
        ]
    return env


def _command(spec: JobSpec, settings: KubernetesSettings, *, name: str) -> list[str]:
    trainer = ["-m", "tuneforge_trainer", "--spec", f"{SPEC_DIR}/{SPEC_FILE}"]
    if spec.resources.nodes <= 1:
        # One node: the trainer starts torchrun itself when it has several GPUs.
        return ["python", *trainer]
    # Several nodes: torchrun in every pod. torchrun reports any failed worker as exit 1, so each
    # worker records its own exit code (TUNEFORGE_TRAINER_EXIT_DIR) and a 42 from any of them is
    # passed on as the pod's exit code, which the podFailurePolicy turns into a failed job. The
    # shell is PID 1 and would not pass SIGTERM on by itself: the trap does, so the trainer can stop
    # cleanly on preemption or cancel.
    script = "\n".join(
        [
            'export TUNEFORGE_TRAINER_EXIT_DIR="$(mktemp -d)"',
            'python -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" '
            '--node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" '
            + shlex.join(trainer)
            + " &",
            "child=$!",
            "trap 'kill -TERM \"$child\" 2>/dev/null' TERM INT",
            'wait "$child"; rc=$?',
            'while kill -0 "$child" 2>/dev/null; do wait "$child"; rc=$?; done',
            f'if grep -qx {EXIT_NON_RETRIABLE} "$TUNEFORGE_TRAINER_EXIT_DIR"/rank-* 2>/dev/null; '
            f"then exit {EXIT_NON_RETRIABLE}; fi",
            'exit "$rc"',
        ]
    )
    return ["/bin/sh", "-c", script]
