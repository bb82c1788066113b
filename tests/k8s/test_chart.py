"""The Helm chart, rendered and linted offline with helm-python-sdk (Helm's Go SDK embedded; no
cluster, no helm binary), for the default values and the value files in helm/tuneforge/ci/.
Every rendered object is validated with kubernetes-validate --strict against the oldest and
newest Kubernetes versions we support."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from tests.k8s.conftest import JOB_ID, make_spec, wait_until
from tests.k8s.fake_apiserver import FakeKubernetes
from tests.k8s.test_manifests import K8S_VERSIONS
from tuneforge_scheduler.executors import run_name
from tuneforge_scheduler.executors.kubernetes import KubernetesExecutor
from tuneforge_scheduler.settings import KubernetesSettings, SchedulerSettings

CHART = Path(__file__).resolve().parents[2] / "helm" / "tuneforge"
VALUE_FILES = {"defaults": None, **{p.stem: p for p in sorted((CHART / "ci").glob("*.yaml"))}}
RELEASE, NAMESPACE = "tuneforge", "ml-platform"


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    chart = helm_python.Chart.load(CHART)
    rendered = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def values_of(case: str) -> dict[str, Any]:
    path = VALUE_FILES[case]
    return yaml.safe_load(path.read_text()) if path else {}


def by_kind(objects: list[dict[str, Any]], kind: str, suffix: str = "") -> dict[str, Any]:
    [obj] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"].endswith(suffix)]
    return obj


@pytest.fixture(scope="module", params=list(VALUE_FILES))
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(values_of(request.param))


def test_chart_lints_strictly() -> None:
    report = helm_python.lint(CHART, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("case", list(VALUE_FILES))
def test_value_files_lint_and_pass_the_schema(case: str) -> None:
    helm_python.Chart.load(CHART).validate_schema(values_of(case))


@pytest.mark.parametrize(
    "bad",
    [
        {"trainer": {"shmsize": "1Gi"}},  # misspelt key
        {"trainer": {"kueueQueue": "Not_A_Name"}},
        {"trainer": {"tolerations": [{"key": "a", "operator": "Maybe"}]}},
        {"storage": {"uri": "file:///data"}},  # two Deployments cannot share a file:// store
        {"redis": {"enabled": False}},  # then a URL or a Secret is required
    ],
)
def test_schema_rejects_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(helm_python.HelmValuesError):
        helm_python.Chart.load(CHART).validate_schema(bad)


def test_every_object_passes_the_official_schemas(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    assert objects
    for version in K8S_VERSIONS:
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)


def test_scheduler_is_a_single_reconciler_with_least_privilege(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objects = rendered
    scheduler = by_kind(objects, "Deployment", "-scheduler")
    assert scheduler["spec"]["replicas"] == 1 and scheduler["spec"]["strategy"]["type"] == "Recreate"
    role = by_kind(objects, "Role")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]}
    assert rules == {
        (("batch",), ("jobs",)): {"get", "list", "watch", "create", "patch", "delete"},
        (("",), ("pods",)): {"list"},
        (("",), ("secrets", "configmaps")): {"get", "create", "patch", "delete"},
        (("",), ("services",)): {"get", "create"},
    }
    binding = by_kind(objects, "RoleBinding")
    assert binding["subjects"][0]["name"] == scheduler["spec"]["template"]["spec"]["serviceAccountName"]
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def test_api_has_http_probes_and_no_kubernetes_token(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, objects = rendered
    api = by_kind(objects, "Deployment", "-api")["spec"]["template"]["spec"]
    container = api["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["automountServiceAccountToken"] is False
    for deployment in [o for o in objects if o["kind"] == "Deployment"]:
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False


def test_console_secret_is_shared_by_every_api_replica_by_reference() -> None:
    """Console sessions are signed with TUNEFORGE_UI_SECRET: replicas must share it, from a Secret."""
    api = by_kind(render(values_of("kueue-values")), "Deployment", "-api")["spec"]["template"]["spec"]
    [env] = [e for e in api["containers"][0]["env"] if e["name"] == "TUNEFORGE_UI_SECRET"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "tuneforge-console", "key": "ui-secret"}
    defaults = by_kind(render(), "Deployment", "-api")["spec"]["template"]["spec"]
    assert "TUNEFORGE_UI_SECRET" not in {e["name"] for e in defaults["containers"][0]["env"]}


def test_config_has_no_secrets_and_the_scheduler_can_read_it(
    rendered: tuple[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    case, objects = rendered
    config = by_kind(objects, "ConfigMap")["data"]
    assert not [
        k for k in config if any(s in k for s in ("PASSWORD", "SECRET_ACCESS", "DATABASE_URL", "API_KEY"))
    ]
    # The real settings class parses what the chart writes (nested settings, JSON lists and dicts).
    for key in list(__import__("os").environ):
        if key.startswith("TUNEFORGE_"):
            monkeypatch.delenv(key)
    for key, value in config.items():
        monkeypatch.setenv(key, value)
    settings = SchedulerSettings()
    values = values_of(case)
    trainer = values.get("trainer", {})
    k8s = settings.kubernetes
    assert settings.executor == "kubernetes" and settings.environment == "production"
    assert (k8s.namespace, k8s.release) == (NAMESPACE, RELEASE)
    assert k8s.service_account == "tuneforge-trainer"
    assert k8s.kueue_queue == (trainer.get("kueueQueue") or None)
    assert k8s.node_selector == trainer.get("nodeSelector", {})
    assert k8s.tolerations == trainer.get(
        "tolerations", yaml.safe_load((CHART / "values.yaml").read_text())["trainer"]["tolerations"]
    )
    assert k8s.storage_secret == values.get("storage", {}).get("existingSecret", "tuneforge-s3")
    assert settings.public_url == f"http://tuneforge-api.{NAMESPACE}.svc:8000"
    # The database URL comes from a Secret by reference, in both Deployments.
    for deployment in [
        o for o in objects if o["kind"] == "Deployment" and "redis" not in o["metadata"]["name"]
    ]:
        env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["TUNEFORGE_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "tuneforge-database"


def test_redis_is_in_cluster_or_external() -> None:
    internal = render()
    assert by_kind(internal, "ConfigMap")["data"]["TUNEFORGE_REDIS_URL"] == "redis://tuneforge-redis:6379/0"
    external = render(values_of("external-redis-values"))
    assert not [o for o in external if o["metadata"]["name"].endswith("-redis")]
    scheduler = by_kind(external, "Deployment", "-scheduler")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in scheduler["env"]}
    assert env["TUNEFORGE_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "tuneforge-redis"


def _verb(method: str, path: str, query: dict[str, str]) -> tuple[str, str, str]:
    """(apiGroup, resource, verb) that RBAC checks for one request of the executor."""
    parts = path.strip("/").split("/")
    group = "" if parts[0] == "api" else parts[1]
    rest = parts[parts.index("namespaces") + 2 :]
    named = len(rest) > 1
    if method == "GET":
        verb = "watch" if query.get("watch") in ("True", "true") else "get" if named else "list"
    else:
        verb = {"POST": "create", "PATCH": "patch", "DELETE": "delete", "PUT": "update"}[method]
    return group, rest[0], verb


def test_the_role_allows_every_request_the_executor_makes(
    fake_k8s: FakeKubernetes, namespace: str, k8s_settings: KubernetesSettings
) -> None:
    """Drive the executor through everything it does (FAKE API server), then check each request's
    verb against the chart's Role."""
    ex = KubernetesExecutor(k8s_settings, api_client=fake_k8s.api_client(), cancel_wait_s=1)
    name, other = run_name(JOB_ID, 1), run_name(JOB_ID, 2)
    ex.submit(name, make_spec(nodes=2), {"TUNEFORGE_JOB_TOKEN": "t"})
    ex.submit(name, make_spec(nodes=2), {"TUNEFORGE_JOB_TOKEN": "t2"})  # a relaunch: 409s, patch
    fake_k8s.patch(
        "batch/v1/jobs", name, {"status": {"conditions": [{"type": "Failed", "status": "True"}]}}, namespace
    )
    ex.refresh()
    wait_until(lambda: ex.jobs_watch.stats.watches >= 1, "the watch opened")
    ex.status(name)  # a failed Job: its pods are listed for the exit code
    ex.release(name)
    ex.orphan_grace_s = 0
    ex.reap_orphans({name: "test"})
    fake_k8s.fail_next("POST", f"/namespaces/{namespace}/jobs", 500)
    with pytest.raises(ApiException):
        ex.submit(other, make_spec(attempt=2), {"TUNEFORGE_JOB_TOKEN": "t"})  # cleans up after itself
    ex.cancel(other)
    ex.shutdown()

    role = by_kind(render(), "Role")
    allowed = {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    used = {_verb(m, p, q) for m, p, q, _ in fake_k8s.requests() if f"/namespaces/{namespace}/" in p}
    assert {v for _, _, v in used} >= {"watch", "list", "get", "create", "patch", "delete"}
    assert used <= allowed, used - allowed
