"""/v1/fine_tuning/jobs without a worker: create, list, get, cancel, events, adapter."""

from __future__ import annotations

import pytest

from tests.api.conftest import Harness, auth
from tests.conftest import ADMIN_KEY
from tuneforge import BadRequestError, JobStatus, NotFoundError

TINY = "tuneforge/tiny-llama"


def create(api: Harness, body: dict, key: str = ADMIN_KEY):
    return api.http.post("/v1/fine_tuning/jobs", json=body, headers=auth(key))


def test_create_echoes_resolved_hyperparameters(api: Harness) -> None:
    f = api.upload()
    job = api.client().create_job(
        model=TINY,
        training_file=f["id"],
        method="supervised",
        hyperparameters={"n_epochs": 2},
        suffix="demo",
        seed=7,
        metadata={"team": "x"},
    )
    assert job.status == JobStatus.validating_files and job.object == "fine_tuning.job"
    assert job.hyperparameters == {"n_epochs": 2, "batch_size": 1, "learning_rate_multiplier": 1.0}
    assert job.method["type"] == "supervised" and job.seed == 7 and job.metadata == {"team": "x"}
    assert job.error is None and job.result_files == [] and job.user_provided_suffix == "demo"
    assert api.client().jobs.get(job.id) == job
    events = list(api.client().jobs.events(job.id))
    assert [e.message for e in events] == [f"Created fine-tuning job {job.id}"]


def test_openai_shapes_accepted(api: Harness) -> None:
    f = api.upload()
    r = create(api, {"model": TINY, "training_file": f["id"], "hyperparameters": {"n_epochs": 3}})
    assert r.status_code == 200 and r.json()["method"]["supervised"]["hyperparameters"]["n_epochs"] == 3
    r = create(
        api,
        {
            "model": TINY,
            "training_file": f["id"],
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 2}}},
            "lora": {"r": 4, "alpha": 8},
            "resources": {"gpus": 0},
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["hyperparameters"]["batch_size"] == 2 and r.json()["lora"]["r"] == 4


@pytest.mark.parametrize(
    ("patch", "param"),
    [
        ({"model": "no/such-model"}, "model"),
        ({"training_file": "file-missing"}, "training_file"),
        ({"validation_file": "file-missing"}, "validation_file"),
        ({"method": {"type": "magic"}}, "method.type"),
        ({"method": {"type": "rlhf"}}, "method.rlhf"),
        (
            {"method": {"type": "rlhf", "rlhf": {"algorithm": "ppo", "reward_model": "ftjob-none"}}},
            "method.rlhf.reward_model",
        ),
        ({"method": {"type": "rlhf", "rlhf": {"algorithm": "ppo"}}}, "method.rlhf"),
        ({"bogus": 1}, "bogus"),
        ({"status": "succeeded"}, "status"),
        ({"hyperparameters": {"n_epochs": -1}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"learning_rate": 1}}, "hyperparameters.learning_rate"),
        ({"lora": {"r": 0}}, "lora.r"),
        ({"resources": {"nodes": 2}}, "resources.nodes"),
        ({"suffix": "bad suffix/.."}, "suffix"),
        (
            {
                "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
                "hyperparameters": {"n_epochs": 3},
            },
            "hyperparameters",
        ),
    ],
)
def test_bad_job_is_400_and_stores_nothing(api: Harness, patch: dict, param: str) -> None:
    f = api.upload()
    r = create(api, {"model": TINY, "training_file": f["id"], **patch})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    assert api.client().jobs.list().data == []
    assert api.http.get("/readyz").status_code == 200


def test_wrong_data_format_for_method(api: Harness) -> None:
    f = api.upload(data=b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    r = create(api, {"model": TINY, "training_file": f["id"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_file_format"


def test_list_pagination_newest_first(api: Harness) -> None:
    f = api.upload()
    ids = [create(api, {"model": TINY, "training_file": f["id"]}).json()["id"] for _ in range(5)]
    client = api.client()
    page = client.jobs.list(limit=2)
    assert [j.id for j in page.data] == ids[::-1][:2] and page.has_more
    assert [j.id for j in client.jobs.list_all()] == ids[::-1]
    r = api.http.get("/v1/fine_tuning/jobs", params={"limit": 0}, headers=auth(ADMIN_KEY))
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"


def test_cancel_before_start(api: Harness) -> None:
    f = api.upload()
    client = api.client()
    job = client.create_job(model=TINY, training_file=f["id"])
    assert client.jobs.cancel(job.id).status == JobStatus.cancelled
    assert client.jobs.cancel(job.id).status == JobStatus.cancelled  # idempotent
    messages = [e.message for e in client.jobs.events(job.id)]
    assert messages[-1] == "Job cancelled before it started"
    assert client.jobs.get(job.id).finished_at is not None


def test_adapter_of_unfinished_job_is_404(api: Harness) -> None:
    f = api.upload()
    job = api.client().create_job(model=TINY, training_file=f["id"])
    r = api.http.get(f"/v1/fine_tuning/jobs/{job.id}/adapter", headers=auth(ADMIN_KEY))
    assert r.status_code == 404 and r.json()["error"]["code"] == "adapter_not_found"


def test_unknown_job_is_404(api: Harness) -> None:
    with pytest.raises(NotFoundError) as exc:
        api.client().jobs.get("ftjob-nope")
    assert exc.value.code == "job_not_found"


def test_another_project_cannot_touch_jobs(api: Harness, other_key: str) -> None:
    f = api.upload()
    job = api.client().create_job(model=TINY, training_file=f["id"])
    for method, suffix in [("GET", ""), ("POST", "/cancel"), ("GET", "/events"), ("GET", "/adapter")]:
        r = api.http.request(method, f"/v1/fine_tuning/jobs/{job.id}{suffix}", headers=auth(other_key))
        assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found", suffix
    assert api.http.get("/v1/fine_tuning/jobs", headers=auth(other_key)).json()["data"] == []
    r = api.http.get(f"/v1/fine_tuning/jobs/{job.id}/events", params={"after": "x"}, headers=auth(other_key))
    assert r.status_code == 404
    assert api.client().jobs.get(job.id).status == JobStatus.validating_files  # no side effect
    # B cannot train on A's file either, and learns nothing about it.
    r = create(api, {"model": TINY, "training_file": f["id"]}, key=other_key)
    assert r.status_code == 400 and r.json()["error"]["code"] == "file_not_found"
    with pytest.raises(BadRequestError):
        api.client(other_key).create_job(model=TINY, training_file=f["id"])


def test_models_lists_base_models(api: Harness, other_key: str) -> None:
    ids = [m.id for m in api.client().models.list()]
    assert TINY in ids
    r = api.http.get(f"/v1/models/{TINY}", headers=auth(other_key))
    assert r.status_code == 200 and r.json()["id"] == TINY
    assert api.http.get("/v1/models/ft:nope", headers=auth(other_key)).status_code == 404
