"""The pure manifest builders: validated with kubernetes-validate --strict against the official
schemas of the oldest and newest Kubernetes we support, and compared with golden files.

Regenerate the golden files after an intended change with
``TUNEFORGE_UPDATE_GOLDEN=1 pytest tests/k8s/test_manifests.py``, and read the diff.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.k8s.conftest import JOB_ID, make_spec
from tuneforge_scheduler.executors import run_name
from tuneforge_scheduler.k8s.manifests import (
    build_env_secret,
    build_headless_service,
    build_job,
    build_spec_configmap,
)
from tuneforge_scheduler.k8s.names import MAX_NAME, label_value, object_name
from tuneforge_scheduler.settings import KubernetesSettings

# The Kubernetes versions we support (docs/kubernetes.md): podReplacementPolicy is on by default
# from 1.29 and podFailurePolicy is GA from 1.31; 1.30 is the oldest still commonly run.
K8S_VERSIONS = ["1.30", "1.37"]
GOLDEN = Path(__file__).parent / "golden"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
NS = "tuneforge"
OWNER = {"apiVersion": "batch/v1", "kind": "Job", "name": "x", "uid": "6f1c7a1e-0000-4000-8000-000000000000"}

FULL = KubernetesSettings(
    namespace=NS,
    release="prod",
    trainer_image="registry.example.com/tuneforge-trainer:0.1.0",
    image_pull_secrets=["registry"],
    service_account="tuneforge-trainer",
    node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    priority_class="training",
    kueue_queue="team-a",
    shm_size="32Gi",
    storage_secret="tuneforge-s3",
    models_volume_claim="tuneforge-models",
)


def all_objects(settings: KubernetesSettings, nodes: int, gpus: int) -> list[dict[str, Any]]:
    spec = make_spec(gpus=gpus, nodes=nodes)
    name = run_name(JOB_ID, 1)
    objects = [
        build_job(spec, settings, name=name, namespace=NS, models_dir="/models"),
        build_spec_configmap(spec, settings, name=name, namespace=NS, owner=OWNER),
        build_env_secret(spec, settings, {"TUNEFORGE_JOB_TOKEN": "t"}, name=name, namespace=NS, owner=OWNER),
    ]
    if nodes > 1:
        objects.append(build_headless_service(spec, settings, name=name, namespace=NS, owner=OWNER))
    return objects


CASES = {
    "one-node-defaults": (KubernetesSettings(namespace=NS), 1, 1),
    "one-node-cpu": (KubernetesSettings(namespace=NS), 1, 0),
    "multi-node-full": (FULL, 4, 8),
}


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_manifests_pass_the_official_schemas_strictly(case: str, version: str) -> None:
    for obj in all_objects(*CASES[case]):
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_catches_a_misspelt_field() -> None:
    job = all_objects(*CASES["one-node-defaults"])[0]
    job["spec"]["backofLimit"] = job["spec"].pop("backoffLimit")
    with pytest.raises(kubernetes_validate.ValidationError, match="backofLimit"):
        kubernetes_validate.validate(job, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("case", CASES)
def test_manifests_match_golden_files(case: str) -> None:
    text = json.dumps(all_objects(*CASES[case]), indent=2, sort_keys=True) + "\n"
    path = GOLDEN / f"{case}.json"
    if os.environ.get("TUNEFORGE_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.read_text() == text, f"{path.name} changed; see this module's docstring"


def test_one_node_job() -> None:
    job = build_job(make_spec(gpus=2), KubernetesSettings(), name="ft-a-a1", namespace=NS)
    spec = job["spec"]
    pod = spec["template"]["spec"]
    trainer = pod["containers"][0]
    assert spec["backoffLimit"] == 0
    assert spec["podReplacementPolicy"] == "Failed"
    assert spec["activeDeadlineSeconds"] == 3 * 24 * 3600
    assert "ttlSecondsAfterFinished" not in spec  # only once the scheduler has recorded the end
    assert "suspend" not in spec and "completionMode" not in spec
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [42]}},
    ]
    assert pod["restartPolicy"] == "Never"
    assert (
        trainer["resources"]["requests"]["nvidia.com/gpu"] == trainer["resources"]["limits"]["nvidia.com/gpu"]
    )
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in trainer["volumeMounts"]
    assert {"name": "spec", "mountPath": "/etc/tuneforge", "readOnly": True} in trainer["volumeMounts"]
    # Secrets only by reference: nothing secret is inline in the Job.
    assert trainer["envFrom"] == [{"secretRef": {"name": "ft-a-a1"}}]
    assert not any("TOKEN" in e["name"] or "AWS" in e["name"] for e in trainer["env"])
    labels = job["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "tuneforge"
    assert labels["app.kubernetes.io/instance"] == "tuneforge"
    assert (labels["tuneforge.io/job-id"], labels["tuneforge.io/attempt"]) == (JOB_ID, "1")
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_settings_reach_the_pod() -> None:
    job = build_job(make_spec(), FULL, name="ft-a-a1", namespace=NS, models_dir="/models")
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == FULL.node_selector
    assert pod["priorityClassName"] == "training"
    assert pod["serviceAccountName"] == "tuneforge-trainer"
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["containers"][0]["envFrom"][0] == {"secretRef": {"name": "tuneforge-s3"}}
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in pod["containers"][0][
        "volumeMounts"
    ]
    # Kueue: labelled with the LocalQueue, created suspended for Kueue to admit.
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["suspend"] is True
    assert "kueue.x-k8s.io/queue-name" not in job["spec"]["template"]["metadata"]["labels"]


def test_max_duration_of_the_job_can_only_lower_the_limit() -> None:
    settings = KubernetesSettings(max_duration_s=7200)
    build = lambda d: build_job(make_spec(), settings, name="n", namespace=NS, max_duration_s=d)  # noqa: E731
    assert build(None)["spec"]["activeDeadlineSeconds"] == 7200
    assert build(600)["spec"]["activeDeadlineSeconds"] == 600
    assert build(10**6)["spec"]["activeDeadlineSeconds"] == 7200


def test_multi_node_job_runs_torchrun_in_every_pod() -> None:
    name = run_name(JOB_ID, 2)
    job = build_job(make_spec(attempt=2, gpus=8, nodes=4), KubernetesSettings(), name=name, namespace=NS)
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    assert spec["backoffLimit"] == 0  # any rank fails: a whole new attempt from the last checkpoint
    trainer = spec["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in trainer["env"]}
    assert env["MASTER_ADDR"] == f"{name}-0.{name}"
    assert env["NNODES"] == "4" and env["NPROC_PER_NODE"] == "8"
    assert env["NODE_RANK"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }
    script = trainer["command"][-1]
    assert trainer["command"][:2] == ["/bin/sh", "-c"]
    assert 'torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE"' in script
    assert '--node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR"' in script
    assert "exit 42" in script  # a worker's 42 survives torchrun's "exit 1"

    service = build_headless_service(
        make_spec(nodes=4), KubernetesSettings(), name=name, namespace=NS, owner=OWNER
    )
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"tuneforge.io/run": name}
    assert spec["template"]["metadata"]["labels"]["tuneforge.io/run"] == name
    assert spec["template"]["spec"]["subdomain"] == name


def test_spec_configmap_holds_the_spec_and_no_secret() -> None:
    spec = make_spec()
    cm = build_spec_configmap(spec, KubernetesSettings(), name="n", namespace=NS, owner=OWNER)
    assert json.loads(cm["data"]["spec.json"]) == spec.model_dump(mode="json")
    assert cm["metadata"]["ownerReferences"] == [OWNER]


@pytest.mark.parametrize("attempt", [1, 20])
def test_names_of_our_ids_are_dns_labels_that_leave_room_for_pod_indexes(attempt: int) -> None:
    name = run_name(JOB_ID, attempt)
    assert object_name(name) == name  # ftjob-<24 hex>: used as is
    assert DNS_LABEL.match(name) and len(f"{name}-63") <= 63


@pytest.mark.parametrize("job_id", ["FTJOB_Upper.Case", "ftjob-" + "a" * 80, "ftjob-ünïcode"])
def test_other_ids_get_a_deterministic_valid_name(job_id: str) -> None:
    name = object_name(run_name(job_id, 1))
    assert DNS_LABEL.match(name) and len(name) <= MAX_NAME
    assert name == object_name(run_name(job_id, 1))
    assert name != object_name(run_name(job_id, 2))
    assert len(label_value(job_id)) <= 63


FAKE_TORCHRUN = """
import os, signal, sys, time
mode = os.environ["FAKE_MODE"]
if mode == "rank-42":  # one worker exits 42; torchrun itself reports 1
    open(os.path.join(os.environ["TUNEFORGE_TRAINER_EXIT_DIR"], "rank-3"), "w").write("42")
    sys.exit(1)
if mode == "crash":
    sys.exit(3)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
open(os.environ["FAKE_STARTED"], "w").write("1")
time.sleep(30)
"""


def test_multi_node_wrapper_passes_on_42_and_sigterm(tmp_path: Path) -> None:
    """Runs the pod's shell script for real, with a stand-in for torch.distributed.run."""
    import signal
    import subprocess
    import sys
    import time

    run_module = tmp_path / "torch" / "distributed" / "run.py"
    run_module.parent.mkdir(parents=True)
    for package in (tmp_path / "torch", run_module.parent):
        (package / "__init__.py").write_text("")
    run_module.write_text(FAKE_TORCHRUN)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(sys.executable)
    job = build_job(make_spec(gpus=2, nodes=2), KubernetesSettings(), name="n", namespace=NS)
    script = job["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    env = {
        "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin",
        "PYTHONPATH": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "FAKE_STARTED": str(tmp_path / "started"),
        **{e["name"]: e.get("value", "0") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]},
    }
    assert subprocess.run(["/bin/sh", "-c", script], env={**env, "FAKE_MODE": "rank-42"}).returncode == 42
    assert subprocess.run(["/bin/sh", "-c", script], env={**env, "FAKE_MODE": "crash"}).returncode == 3

    proc = subprocess.Popen(["/bin/sh", "-c", script], env={**env, "FAKE_MODE": "sleep"})
    deadline = time.monotonic() + 10
    while not (tmp_path / "started").exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 143  # torchrun got the SIGTERM and stopped; its code is the pod's
