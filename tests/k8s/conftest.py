"""Fixtures for the Kubernetes tests: the FAKE API server (kmock's emulator, see
fake_apiserver.py), one namespace per test, and the executor talking to it over HTTP."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests.k8s.fake_apiserver import FakeKubernetes
from tuneforge.types import JobSpec, LoraConfigSpec, Method, Resources
from tuneforge_scheduler.executors.kubernetes import KubernetesExecutor
from tuneforge_scheduler.settings import KubernetesSettings

JOB_ID = "ftjob-0123456789abcdef01234567"  # the shape of our ids: ftjob-<24 hex>


def make_spec(*, attempt: int = 1, gpus: int = 1, nodes: int = 1, job_id: str = JOB_ID) -> JobSpec:
    return JobSpec(
        job_id=job_id,
        project_id="proj-1",
        attempt=attempt,
        base_model="tuneforge/tiny-llama",
        method=Method(type="supervised"),
        lora=LoraConfigSpec(),
        training_file_key=f"projects/proj-1/files/file-{job_id}",
        storage_uri="s3://tuneforge/prod",
        api_base_url="http://tuneforge-api.tuneforge.svc:8000",
        resources=Resources(gpus=gpus, nodes=nodes),
    )


@pytest.fixture(scope="session")
def fake_k8s() -> Iterator[FakeKubernetes]:
    fake = FakeKubernetes().start()
    yield fake
    fake.stop()


@pytest.fixture
def namespace() -> str:
    return f"ns-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def k8s_settings(namespace: str) -> KubernetesSettings:
    return KubernetesSettings(namespace=namespace, storage_secret="tuneforge-s3")


@pytest.fixture
def executor(fake_k8s: FakeKubernetes, k8s_settings: KubernetesSettings) -> Iterator[KubernetesExecutor]:
    # The per-pass LIST path, so a test that writes status and then reads it is deterministic; the
    # watch (on by default) is tested in test_watch.py, waiting for its events.
    ex = KubernetesExecutor(k8s_settings, api_client=fake_k8s.api_client(), cancel_wait_s=2, watch=False)
    yield ex
    ex.shutdown()


def wait_until(condition: Callable[[], bool], what: str, limit_s: float = 20.0) -> None:
    """Poll until ``condition()`` holds (a watch runs in its own thread). The limit only bounds a
    broken test; nothing here asserts on how long it took."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.02)
