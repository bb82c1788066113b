"""The kubernetes executor over real HTTP against the FAKE API server (kmock's in-memory
emulator; no cluster can run here). The fake runs no controllers, so each test writes the Job
and pod status that the Job controller and the kubelet would write."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from tests.k8s.conftest import JOB_ID, make_spec
from tests.k8s.fake_apiserver import FakeKubernetes
from tuneforge_scheduler.executors import RunState, run_name
from tuneforge_scheduler.executors.kubernetes import ForeignObjectError, KubernetesExecutor
from tuneforge_scheduler.k8s.names import RECORDED
from tuneforge_scheduler.settings import KubernetesSettings

NAME = run_name(JOB_ID, 1)
TOKEN = {"TUNEFORGE_JOB_TOKEN": "tfjob-secret-token", "TUNEFORGE_HOME": "/home/scheduler/.tuneforge"}


def requests_of(fake: FakeKubernetes, namespace: str) -> list[tuple[str, str, dict[str, str], Any]]:
    return [r for r in fake.requests() if f"/namespaces/{namespace}/" in r[1] or r[1].endswith(namespace)]


def job_status(**status: Any) -> dict[str, Any]:
    return {"status": status}


def condition(type_: str, reason: str = "", message: str = "") -> dict[str, str]:
    return {"type": type_, "status": "True", "reason": reason, "message": message}


def put_pod(
    fake: FakeKubernetes, namespace: str, name: str, *, run: str = NAME, phase: str = "Pending", **status: Any
) -> None:
    """A pod as the Job controller creates it and the kubelet reports it."""
    obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/managed-by": "tuneforge",
                "app.kubernetes.io/instance": "tuneforge",
                "tuneforge.io/run": run,
                "batch.kubernetes.io/job-name": run,
            },
        },
        "status": {"phase": phase, **status},
    }
    fake.put("v1/pods", obj, namespace=namespace)


# -- create ------------------------------------------------------------------------------------


def test_submit_one_node_creates_job_secret_and_configmap(
    executor: KubernetesExecutor, fake_k8s: FakeKubernetes, namespace: str
) -> None:
    executor.submit(NAME, make_spec(gpus=2), TOKEN)

    job = fake_k8s.get("batch/v1/jobs", NAME, namespace)
    assert job is not None and job["spec"].get("completionMode") is None
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "tuneforge_trainer", "--spec", "/etc/tuneforge/spec.json"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {"secretRef": {"name": "tuneforge-s3"}} in container["envFrom"]
    assert fake_k8s.names("v1/services", namespace) == []  # one node needs no Service

    # The token is in the attempt's Secret, not in the spec; the scheduler's home is not passed on.
    secret = fake_k8s.get("v1/secrets", NAME, namespace)
    assert secret["stringData"] == {"TUNEFORGE_JOB_TOKEN": "tfjob-secret-token"}
    spec_json = fake_k8s.get("v1/configmaps", NAME, namespace)["data"]["spec.json"]
    assert "tfjob-secret-token" not in spec_json and JOB_ID in spec_json

    # Both are owned by the Job, so Kubernetes deletes them with it.
    for obj in (secret, fake_k8s.get("v1/configmaps", NAME, namespace)):
        assert obj["metadata"]["ownerReferences"] == [
            {"apiVersion": "batch/v1", "kind": "Job", "name": NAME, "uid": job["metadata"]["uid"]}
        ]


def test_submit_several_nodes_creates_indexed_job_and_owned_headless_service(
    executor: KubernetesExecutor, fake_k8s: FakeKubernetes, namespace: str
) -> None:
    executor.submit(NAME, make_spec(gpus=4, nodes=3), TOKEN)

    job = fake_k8s.get("batch/v1/jobs", NAME, namespace)
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == (
        "Indexed",
        3,
        3,
    )
    assert job["spec"]["template"]["spec"]["subdomain"] == NAME
    service = fake_k8s.get("v1/services", NAME, namespace)
    assert service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    # What the pod reads at start exists before the Job; the Job then owns it; the Service last.
    writes = [
        (r[0], r[1].split(f"/namespaces/{namespace}/", 1)[1])
        for r in requests_of(fake_k8s, namespace)
        if r[0] in ("POST", "PATCH")
    ]
    assert writes == [
        ("POST", "secrets"),
        ("POST", "configmaps"),
        ("POST", "jobs"),
        ("PATCH", f"secrets/{NAME}"),
        ("PATCH", f"configmaps/{NAME}"),
        ("POST", "services"),
    ]


def test_submit_twice_is_idempotent_and_refreshes_the_token(
    executor: KubernetesExecutor, fake_k8s: FakeKubernetes, namespace: str
) -> None:
    executor.submit(NAME, make_spec(nodes=2), TOKEN)
    uid = fake_k8s.get("batch/v1/jobs", NAME, namespace)["metadata"]["uid"]
    # A relaunch of the same attempt (the scheduler crashed between commit and launch) gets 409s.
    executor.submit(NAME, make_spec(nodes=2), {"TUNEFORGE_JOB_TOKEN": "tfjob-new-token"})

    assert fake_k8s.get("batch/v1/jobs", NAME, namespace)["metadata"]["uid"] == uid
    assert fake_k8s.get("v1/secrets", NAME, namespace)["stringData"] == {
        "TUNEFORGE_JOB_TOKEN": "tfjob-new-token"
    }
    assert fake_k8s.names("batch/v1/jobs", namespace) == [NAME]


def test_a_409_for_an_object_that_is_not_ours_is_an_error(
    executor: KubernetesExecutor, fake_k8s: FakeKubernetes, namespace: str
) -> None:
    fake_k8s.put("batch/v1/jobs", {"metadata": {"name": NAME, "labels": {"app": "someone-else"}}}, namespace)
    with pytest.raises(ForeignObjectError):
        executor.submit(NAME, make_spec(), TOKEN)


# -- status -----------------------------------------------------------------------------------


@pytest.fixture
def submitted(executor: KubernetesExecutor, fake_k8s: FakeKubernetes, namespace: str) -> KubernetesExecutor:
    executor.submit(NAME, make_spec(), TOKEN)
    return executor


def test_created_job_is_running(submitted: KubernetesExecutor) -> None:
    submitted.refresh()
    status = submitted.status(NAME)
    assert (status.state, status.detail) == (RunState.running, "")


def test_unknown_job_is_missing(executor: KubernetesExecutor) -> None:
    executor.refresh()
    assert executor.status(run_name(JOB_ID, 7)).state == RunState.missing


@pytest.mark.parametrize(
    ("conditions", "pods", "expected"),
    [
        pytest.param([condition("Complete")], [], (RunState.exited, 0), id="complete"),
        pytest.param(
            [
                condition("FailureTarget", "PodFailurePolicy"),
                condition(
                    "Failed",
                    "PodFailurePolicy",
                    f"Container trainer for pod x/{NAME}-abc failed with exit code 42 matching FailJob rule "
                    "at index 1",
                ),
            ],
            [],
            (RunState.exited, 42),
            id="pod-failure-policy-exit-42",
        ),
        pytest.param(
            [condition("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")],
            [],
            (RunState.exited, 42),
            id="deadline-exceeded",
        ),
        pytest.param(
            [condition("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")],
            [
                {
                    "phase": "Failed",
                    "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 137}}}],
                }
            ],
            (RunState.exited, 137),
            id="backoff-limit-exit-137",
        ),
        pytest.param(
            [condition("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")],
            [],
            (RunState.lost, None),
            id="backoff-limit-pod-gone",
        ),
        pytest.param(
            [condition("FailureTarget", "BackoffLimitExceeded")],
            [],
            (RunState.running, None),
            id="failure-target-pods-still-stopping",
        ),
    ],
)
def test_job_conditions_map_to_run_states(
    submitted: KubernetesExecutor,
    fake_k8s: FakeKubernetes,
    namespace: str,
    conditions: list[dict[str, str]],
    pods: list[dict[str, Any]],
    expected: tuple[RunState, int | None],
) -> None:
    fake_k8s.patch("batch/v1/jobs", NAME, job_status(conditions=conditions), namespace)
    for i, status in enumerate(pods):
        put_pod(fake_k8s, namespace, f"{NAME}-{i}", **status)
    submitted.refresh()
    status = submitted.status(NAME)
    assert (status.state, status.exit_code) == expected
    if expected[0] == RunState.exited and "DeadlineExceeded" in str(conditions):
        assert "maximum duration (259200 s)" in status.detail


def test_a_preempted_pod_does_not_end_the_attempt(
    submitted: KubernetesExecutor, fake_k8s: FakeKubernetes, namespace: str
) -> None:
    # podFailurePolicy Ignore: the Job controller replaces the pod without counting a failure.
    put_pod(
        fake_k8s,
        namespace,
        f"{NAME}-old",
        phase="Failed",
        conditions=[condition("DisruptionTarget", "PreemptionByScheduler")],
        containerStatuses=[{"name": "trainer", "state": {"terminated": {"exitCode": 143}}}],
    )
    fake_k8s.patch("batch/v1/jobs", NAME, job_status(active=1, ready=1), namespace)
    submitted.refresh()
    assert submitted.status(NAME).state == RunState.running
    # If the attempt fails anyway, a preempted pod's exit code is not the trainer's verdict.
    fake_k8s.patch(
        "batch/v1/jobs", NAME, job_status(conditions=[condition("Failed", "BackoffLimitExceeded")]), namespace
    )
    submitted.refresh()
    assert submitted.status(NAME).state == RunState.lost


@pytest.mark.parametrize(
    ("pod_status", "expected"),
    [
        pytest.param(
            {
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
                    }
                ]
            },
            "Waiting for a node (Unschedulable): 0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
            id="unschedulable",
        ),
        pytest.param(
            {
                "containerStatuses": [
                    {
                        "name": "trainer",
                        "state": {
                            "waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}
                        },
                    }
                ]
            },
            f"Pod {NAME}-x cannot start (ImagePullBackOff): Back-off pulling image",
            id="image-pull-backoff",
        ),
        pytest.param(
            {"containerStatuses": [{"name": "trainer", "state": {"waiting": {"reason": "ErrImagePull"}}}]},
            f"Pod {NAME}-x cannot start (ErrImagePull)",
            id="err-image-pull",
        ),
        pytest.param(
            {
                "containerStatuses": [
                    {"name": "trainer", "state": {"waiting": {"reason": "ContainerCreating"}}}
                ]
            },
            "",
            id="container-creating-is-normal",
        ),
    ],
)
def test_pending_pod_reasons_become_detail(
    submitted: KubernetesExecutor,
    fake_k8s: FakeKubernetes,
    namespace: str,
    pod_status: dict[str, Any],
    expected: str,
) -> None:
    put_pod(fake_k8s, namespace, f"{NAME}-x", **pod_status)
    fake_k8s.patch("batch/v1/jobs", NAME, job_status(active=1), namespace)
    submitted.refresh()
    status = submitted.status(NAME)
    assert (status.state, status.detail) == (RunState.running, expected)


def test_kueue_suspended_job_is_waiting_for_quota(
    fake_k8s: FakeKubernetes, namespace: str, k8s_settings: KubernetesSettings
) -> None:
    settings = k8s_settings.model_copy(update={"kueue_queue": "team-a-gpus"})
    ex = KubernetesExecutor(settings, api_client=fake_k8s.api_client(), watch=False)
    ex.submit(NAME, make_spec(), TOKEN)
    job = fake_k8s.get("batch/v1/jobs", NAME, namespace)
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpus"

    ex.refresh()
    status = ex.status(NAME)
    assert status.state == RunState.running
    assert status.detail == "Waiting for quota: Kueue queue team-a-gpus has not admitted the job yet"
    # No pod LIST while suspended: there are no pods to explain.
    assert not [r for r in requests_of(fake_k8s, namespace) if r[1].endswith("/pods")]

    fake_k8s.patch("batch/v1/jobs", NAME, {"spec": {"suspend": False}}, namespace)  # Kueue admits it
    ex.refresh()
    assert ex.status(NAME).detail == ""
    # We never unsuspend a Job ourselves.
    assert not [r for r in requests_of(fake_k8s, namespace) if r[0] == "PATCH" and "/jobs/" in r[1]]
    ex.shutdown()


# -- cost of a pass ---------------------------------------------------------------------------


def test_without_the_watch_a_pass_is_one_list_and_finished_jobs_are_not_listed_again(
    fake_k8s: FakeKubernetes, namespace: str, k8s_settings: KubernetesSettings
) -> None:
    # The fallback path, taken whenever the watch is not healthy (tests/k8s/test_watch.py).
    executor = KubernetesExecutor(k8s_settings, api_client=fake_k8s.api_client(), watch=False)
    names = [run_name(f"ftjob-{i:024x}", 1) for i in range(5)]
    for name, job_id in zip(names, [f"ftjob-{i:024x}" for i in range(5)], strict=True):
        executor.submit(name, make_spec(job_id=job_id), TOKEN)
        fake_k8s.patch("batch/v1/jobs", name, job_status(active=1, ready=1), namespace)
    fake_k8s.patch("batch/v1/jobs", names[0], job_status(conditions=[condition("Complete")]), namespace)
    fake_k8s.clear_requests()

    executor.refresh()
    assert all(executor.status(n).state == RunState.running for n in names[1:])
    assert executor.status(names[0]).exit_code == 0
    sent = requests_of(fake_k8s, namespace)
    assert [(m, p.rsplit("/", 1)[-1]) for m, p, _, _ in sent] == [("GET", "jobs")]
    assert sent[0][2]["labelSelector"].endswith(f"{RECORDED}!=true")

    # The scheduler recorded the end: label and TTL go on the Job, and the next list skips it.
    executor.release(names[0])
    job = fake_k8s.get("batch/v1/jobs", names[0], namespace)
    assert job["metadata"]["labels"][RECORDED] == "true"
    assert job["spec"]["ttlSecondsAfterFinished"] == 3600
    executor.refresh()
    assert set(executor._snapshot.jobs) == set(names[1:])
    executor.shutdown()


def test_status_of_a_job_created_after_the_list_costs_one_get(
    executor: KubernetesExecutor, fake_k8s: FakeKubernetes, namespace: str
) -> None:
    executor.refresh()
    executor.submit(NAME, make_spec(), TOKEN)
    fake_k8s.patch("batch/v1/jobs", NAME, job_status(active=1, ready=1), namespace)
    fake_k8s.clear_requests()
    assert executor.status(NAME).state == RunState.running
    assert [(m, p.rsplit("/", 1)[-1]) for m, p, _, _ in requests_of(fake_k8s, namespace)] == [("GET", NAME)]


# -- cancel -----------------------------------------------------------------------------------


def test_cancel_deletes_in_the_foreground_and_404_counts_as_done(
    submitted: KubernetesExecutor, fake_k8s: FakeKubernetes, namespace: str
) -> None:
    submitted.cancel(NAME)
    assert fake_k8s.get("batch/v1/jobs", NAME, namespace) is None
    deletes = [r for r in requests_of(fake_k8s, namespace) if r[0] == "DELETE"]
    assert len(deletes) == 1 and deletes[0][2]["propagationPolicy"] == "Foreground"
    submitted.cancel(NAME)  # already gone: 404, no error
    submitted.release(NAME)  # and releasing a deleted Job is fine too
    submitted.refresh()
    assert submitted.status(NAME).state == RunState.missing


# -- the Secret and ConfigMap exist before the Job, and never outlive it -------------------------


def test_a_job_that_cannot_be_created_leaves_no_secret_or_configmap(
    executor: KubernetesExecutor, fake_k8s: FakeKubernetes, namespace: str
) -> None:
    fake_k8s.fail_next("POST", f"/namespaces/{namespace}/jobs", 500)
    with pytest.raises(ApiException) as raised:
        executor.submit(NAME, make_spec(), TOKEN)
    assert raised.value.status == 500
    assert fake_k8s.names("batch/v1/jobs", namespace) == []
    assert fake_k8s.names("v1/secrets", namespace) == []
    assert fake_k8s.names("v1/configmaps", namespace) == []
    # The next launch of the attempt starts from nothing and succeeds.
    executor.submit(NAME, make_spec(), TOKEN)
    assert fake_k8s.get("v1/secrets", NAME, namespace)["metadata"]["ownerReferences"][0]["name"] == NAME


def test_a_foreign_job_of_that_name_leaves_no_secret_behind(
    executor: KubernetesExecutor, fake_k8s: FakeKubernetes, namespace: str
) -> None:
    fake_k8s.put("batch/v1/jobs", {"metadata": {"name": NAME, "labels": {"app": "someone-else"}}}, namespace)
    with pytest.raises(ForeignObjectError):
        executor.submit(NAME, make_spec(), TOKEN)
    assert fake_k8s.names("v1/secrets", namespace) == []
    assert fake_k8s.names("v1/configmaps", namespace) == []
    assert fake_k8s.get("batch/v1/jobs", NAME, namespace)["metadata"]["labels"] == {"app": "someone-else"}


def test_if_the_job_cannot_own_its_secret_all_three_go_and_the_attempt_is_missing(
    executor: KubernetesExecutor, fake_k8s: FakeKubernetes, namespace: str
) -> None:
    fake_k8s.fail_next("PATCH", f"/namespaces/{namespace}/secrets/{NAME}", 500)
    with pytest.raises(ApiException):
        executor.submit(NAME, make_spec(), TOKEN)
    for resource in ("batch/v1/jobs", "v1/secrets", "v1/configmaps"):
        assert fake_k8s.names(resource, namespace) == []
    executor.refresh()
    assert executor.status(NAME).state == RunState.missing  # so the scheduler launches it again


def test_cancel_of_a_job_never_created_deletes_its_secret(
    executor: KubernetesExecutor, fake_k8s: FakeKubernetes, namespace: str
) -> None:
    """The scheduler died between creating the Secret and the Job, then the job was cancelled."""
    fake_k8s.fail_next("POST", f"/namespaces/{namespace}/jobs", 503)
    fake_k8s.fail_next("DELETE", f"/namespaces/{namespace}/secrets/{NAME}", 503)
    fake_k8s.fail_next("DELETE", f"/namespaces/{namespace}/configmaps/{NAME}", 503)
    with pytest.raises(ApiException):
        executor.submit(NAME, make_spec(), TOKEN)
    assert fake_k8s.names("v1/secrets", namespace) == [NAME]  # the clean-up failed too
    executor.cancel(NAME)
    assert fake_k8s.names("v1/secrets", namespace) == []
    assert fake_k8s.names("v1/configmaps", namespace) == []


def test_a_job_create_that_failed_after_all_keeps_its_secret(
    executor: KubernetesExecutor, fake_k8s: FakeKubernetes, namespace: str
) -> None:
    """The create answered an error, yet the API server made the Job (a lost answer)."""
    fake_k8s.fail_next("POST", f"/namespaces/{namespace}/jobs", 504, applied=True)
    executor.submit(NAME, make_spec(), TOKEN)
    uid = fake_k8s.get("batch/v1/jobs", NAME, namespace)["metadata"]["uid"]
    for resource in ("v1/secrets", "v1/configmaps"):
        assert fake_k8s.get(resource, NAME, namespace)["metadata"]["ownerReferences"][0]["uid"] == uid


def test_a_job_create_whose_outcome_is_unknown_keeps_its_secret(
    executor: KubernetesExecutor, fake_k8s: FakeKubernetes, namespace: str
) -> None:
    """The create's answer is lost and the read-back fails too: the Job may exist, so its Secret and
    ConfigMap stay (deleting them would leave its pod waiting on them forever)."""
    fake_k8s.fail_next("POST", f"/namespaces/{namespace}/jobs", 504, applied=True)
    fake_k8s.fail_next("GET", f"/namespaces/{namespace}/jobs/{NAME}", 503)
    with pytest.raises(ApiException) as raised:
        executor.submit(NAME, make_spec(), TOKEN)
    assert raised.value.status == 504
    assert fake_k8s.names("v1/secrets", namespace) == [NAME]
    assert fake_k8s.names("v1/configmaps", namespace) == [NAME]
    # The relaunch finds all three and makes the Job their owner.
    executor.submit(NAME, make_spec(), TOKEN)
    uid = fake_k8s.get("batch/v1/jobs", NAME, namespace)["metadata"]["uid"]
    assert fake_k8s.get("v1/secrets", NAME, namespace)["metadata"]["ownerReferences"][0]["uid"] == uid
