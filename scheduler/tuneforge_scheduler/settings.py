"""Scheduler settings: the API's (same database, storage, Redis) plus the executor's.

The Kubernetes executor's settings are one nested model, set from the environment as
``TUNEFORGE_KUBERNETES__NAMESPACE=...`` (dicts and lists as JSON), or all at once as JSON in
``TUNEFORGE_KUBERNETES``. The Helm chart writes them into a ConfigMap.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from tuneforge_api.settings import Settings

GPU_RESOURCE = "nvidia.com/gpu"


def _default_tolerations() -> list[dict[str, Any]]:
    # GPU node pools are usually tainted so that only GPU work lands there.
    return [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]


class KubernetesSettings(BaseModel):
    """How trainer attempts become Kubernetes Jobs (``executor = "kubernetes"``)."""

    namespace: str | None = Field(
        None, description="Namespace of the trainer Jobs; default: the pod's own namespace, else 'default'."
    )
    release: str = Field(
        "tuneforge",
        description="Value of the app.kubernetes.io/instance label; several installs can share a namespace.",
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        max_length=40,
    )
    kubeconfig: str | None = Field(
        None, description="Path of a kubeconfig; default: in-cluster config, else ~/.kube/config."
    )
    context: str | None = Field(None, description="kubeconfig context to use; default: the current one.")
    trainer_image: str = Field("tuneforge-trainer:0.1.0", description="Image that runs the trainer.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="imagePullPolicy of the trainer container."
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Secrets for pulling the trainer image from a private registry."
    )
    service_account: str | None = Field(
        None, description="ServiceAccount of trainer pods; default: the namespace's default account."
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="nodeSelector of trainer pods.")
    tolerations: list[dict[str, Any]] = Field(
        default_factory=_default_tolerations, description="Tolerations of trainer pods (default: GPU taint)."
    )
    priority_class: str | None = Field(None, description="priorityClassName of trainer pods.")
    kueue_queue: str | None = Field(
        None,
        description="Kueue LocalQueue name; when set, Jobs are created suspended and Kueue admits them.",
    )
    shm_size: str = Field("16Gi", description="Size limit of the /dev/shm memory volume (NCCL, dataloaders).")
    cpu: str = Field("8", description="CPU request and limit of each trainer pod.")
    memory: str = Field("64Gi", description="Memory request and limit of each trainer pod.")
    max_duration_s: int = Field(
        3 * 24 * 3600,
        ge=60,
        description="activeDeadlineSeconds of an attempt, unless the job asks for less.",
    )
    ttl_after_finished_s: int = Field(
        3600,
        ge=0,
        description="ttlSecondsAfterFinished, set once the scheduler has recorded how an attempt ended.",
    )
    storage_secret: str | None = Field(
        None,
        description="Secret whose keys become the trainer's environment (AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...). Never written into the job spec.",
    )
    models_volume_claim: str | None = Field(
        None,
        description="PersistentVolumeClaim with the base models, mounted read-only at TUNEFORGE_MODELS_DIR.",
    )
    master_port: int = Field(
        29500, ge=1024, le=65535, description="torchrun rendezvous port (several nodes)."
    )
    max_jobs: int = Field(
        1000, ge=1, description="Attempts running at once; GPU quotas belong to Kueue, not to this number."
    )


class SchedulerSettings(Settings):
    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_", extra="ignore", env_nested_delimiter="__")

    local_max_jobs: int = Field(1, ge=1, le=64, description="Trainer processes at once on this machine.")
    reconcile_every_s: int = Field(1, ge=1, le=60, description="Seconds between reconcile passes.")
    stale_upload_hours: float = Field(
        24,
        ge=0,
        description="Hourly, incomplete writes that a killed process left in storage (file:// temp "
        "files, s3:// multipart uploads) and file objects without a file row are removed once this "
        "old; a live upload is always younger. 0 is for tests: it can remove an upload in flight.",
    )
    kubernetes: KubernetesSettings = Field(
        default_factory=KubernetesSettings, description="The kubernetes executor's settings."
    )
