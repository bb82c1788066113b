"""The executor's watch on its Jobs, over real HTTP against the FAKE API server (kmock's emulator
with resourceVersions, an event log, 410 Gone and broken streams; see fake_apiserver.py). The fake
runs no controllers, so the tests write the status the Job controller would write."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.k8s.conftest import make_spec, wait_until
from tests.k8s.fake_apiserver import FakeKubernetes
from tuneforge_scheduler.executors import RunState, run_name
from tuneforge_scheduler.executors.kubernetes import KubernetesExecutor
from tuneforge_scheduler.k8s.names import RECORDED
from tuneforge_scheduler.settings import KubernetesSettings

TOKEN = {"TUNEFORGE_JOB_TOKEN": "tfjob-secret-token"}
IDS = [f"ftjob-{i:024x}" for i in range(3)]
A, B, C = (run_name(job_id, 1) for job_id in IDS)
COMPLETE = {"status": {"conditions": [{"type": "Complete", "status": "True"}], "succeeded": 1}}


def job_requests(fake: FakeKubernetes, namespace: str) -> list[tuple[str, str, dict[str, str]]]:
    """The requests about Jobs, without the watch's own (a long GET with watch=True)."""
    return [
        (method, path, query)
        for method, path, query, _ in fake.requests()
        if f"/namespaces/{namespace}/jobs" in path and query.get("watch") not in ("True", "true")
    ]


def conditions(executor: KubernetesExecutor, name: str) -> list[str]:
    job = executor.jobs_watch.items().get(name) or {}
    return [c["type"] for c in (job.get("status") or {}).get("conditions") or []]


@pytest.fixture
def watching(fake_k8s: FakeKubernetes, k8s_settings: KubernetesSettings) -> Iterator[KubernetesExecutor]:
    """An executor whose watch is running and has caught up with two submitted Jobs, A and B."""
    ex = KubernetesExecutor(k8s_settings, api_client=fake_k8s.api_client())
    for job_id, name in zip(IDS[:2], (A, B), strict=True):
        ex.submit(name, make_spec(job_id=job_id), TOKEN)
    ex.refresh()  # starts the watch (this first pass lists: the watch is not healthy yet)
    wait_until(lambda: ex.jobs_watch.healthy and {A, B} <= set(ex.jobs_watch.items()), "watch caught up")
    yield ex
    ex.shutdown()


def test_events_arrive_through_the_watch_and_a_pass_sends_no_request(
    watching: KubernetesExecutor, fake_k8s: FakeKubernetes, namespace: str
) -> None:
    fake_k8s.patch("batch/v1/jobs", A, COMPLETE, namespace)  # the Job controller finishes A
    wait_until(lambda: "Complete" in conditions(watching, A), "A's Complete condition arrived")

    fake_k8s.clear_requests()
    watching.refresh()
    assert watching.status(A).exit_code == 0
    assert watching.status(B).state == RunState.running
    assert job_requests(fake_k8s, namespace) == []  # read from the watch cache: no LIST, no GET
    assert watching.jobs_watch.stats.lists == 1


def test_the_watch_follows_the_selector(
    watching: KubernetesExecutor, fake_k8s: FakeKubernetes, namespace: str
) -> None:
    # Recorded Jobs leave the selector: the server sends DELETED and the cache drops them.
    fake_k8s.patch("batch/v1/jobs", B, {"metadata": {"labels": {RECORDED: "true"}}}, namespace)
    wait_until(lambda: B not in watching.jobs_watch.items(), "recorded Job B left the cache")
    # Another release's Job never enters it. A later change of ours arrives after it, in order.
    foreign: dict[str, Any] = {
        "metadata": {
            "name": C,
            "labels": {"app.kubernetes.io/managed-by": "tuneforge", "app.kubernetes.io/instance": "other"},
        }
    }
    fake_k8s.put("batch/v1/jobs", foreign, namespace)
    fake_k8s.patch("batch/v1/jobs", A, COMPLETE, namespace)
    wait_until(lambda: "Complete" in conditions(watching, A), "A's Complete condition arrived")
    assert set(watching.jobs_watch.items()) == {A}


@pytest.mark.parametrize("how", ["error-event", "http-status"])
def test_410_gone_relists_once_and_loses_no_event(
    watching: KubernetesExecutor, fake_k8s: FakeKubernetes, namespace: str, how: str
) -> None:
    stats = watching.jobs_watch.stats
    fake_k8s.hold_watches()  # the reconnect will wait, so changes happen while we are away
    assert fake_k8s.drop_watches() == 1
    wait_until(lambda: not watching.jobs_watch.healthy, "the broken stream was noticed")

    fake_k8s.patch("batch/v1/jobs", A, COMPLETE, namespace)  # a change
    fake_k8s.delete("batch/v1/jobs", B, namespace)  # a deletion
    watching.submit(C, make_spec(job_id=IDS[2]), TOKEN)  # a creation
    if how == "error-event":
        fake_k8s.compact()  # the server no longer has those events: the resume gets ERROR 410
    else:
        fake_k8s.fail_next("GET", f"/namespaces/{namespace}/jobs", 410)  # the resume gets HTTP 410
    fake_k8s.hold_watches(False)

    wait_until(
        lambda: watching.jobs_watch.healthy and set(watching.jobs_watch.items()) == {A, C},
        "the relist replaced the cache",
    )
    assert "Complete" in conditions(watching, A)
    assert stats.lists == 2  # the first list, and exactly one relist
    fake_k8s.clear_requests()
    watching.refresh()
    assert watching.status(B).state == RunState.missing  # one GET: B is gone
    assert job_requests(fake_k8s, namespace) == [
        ("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/{B}", {})
    ]


def test_a_dropped_stream_resumes_where_it_was_and_meanwhile_a_pass_lists(
    watching: KubernetesExecutor, fake_k8s: FakeKubernetes, namespace: str
) -> None:
    stats = watching.jobs_watch.stats
    fake_k8s.hold_watches()
    fake_k8s.drop_watches()
    wait_until(lambda: not watching.jobs_watch.healthy, "the broken stream was noticed")
    fake_k8s.patch("batch/v1/jobs", A, COMPLETE, namespace)

    # While the watch is down, a pass falls back to one LIST, and sees the change.
    fake_k8s.clear_requests()
    watching.refresh()
    assert watching.status(A).exit_code == 0
    sent = job_requests(fake_k8s, namespace)
    assert [(m, p.rsplit("/", 1)[-1]) for m, p, _ in sent] == [("GET", "jobs")]

    fake_k8s.hold_watches(False)
    wait_until(
        lambda: watching.jobs_watch.healthy and "Complete" in conditions(watching, A),
        "the resumed watch replayed the change",
    )
    assert stats.lists == 1  # resumed from its resourceVersion: no relist
    assert stats.breaks >= 1 and stats.watches >= 2
    fake_k8s.clear_requests()
    watching.refresh()
    assert job_requests(fake_k8s, namespace) == []


def test_streams_the_server_ends_are_resumed_without_a_relist(
    fake_k8s: FakeKubernetes, k8s_settings: KubernetesSettings, namespace: str
) -> None:
    ex = KubernetesExecutor(k8s_settings, api_client=fake_k8s.api_client(), watch_timeout_s=1)
    try:
        ex.submit(A, make_spec(job_id=IDS[0]), TOKEN)
        ex.refresh()
        wait_until(lambda: ex.jobs_watch.stats.watches >= 2, "a second watch after timeoutSeconds")
        fake_k8s.patch("batch/v1/jobs", A, COMPLETE, namespace)
        wait_until(lambda: ex.jobs_watch.stats.watches >= 3, "a third watch")
        wait_until(lambda: "Complete" in conditions(ex, A), "the change arrived")
        assert (ex.jobs_watch.stats.lists, ex.jobs_watch.stats.breaks) == (1, 0)
        watches = [
            q
            for _, p, q, _ in fake_k8s.requests()
            if f"/namespaces/{namespace}/" in p and q.get("watch") in ("True", "true")
        ]
        assert all(q["timeoutSeconds"] == "1" and q["resourceVersion"] for q in watches)
    finally:
        ex.shutdown()
