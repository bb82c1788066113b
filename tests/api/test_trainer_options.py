"""Create-time rules for the trainer's options: SFT train_on_inputs / packing / max_seq_length,
full fine-tuning (``method.<type>.adapter``) and ``resources.zero_stage``, and the spec the
scheduler builds from them."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.conftest import Harness, auth, chat_lines
from tests.api.test_rlhf_jobs import PAIRS, build_spec, rlhf_body, succeeded_job
from tests.conftest import ADMIN_KEY

TINY = "tuneforge/tiny-llama"


def post(api: Harness, body: dict[str, Any], key: str = ADMIN_KEY) -> Any:
    return api.http.post("/v1/fine_tuning/jobs", json=body, headers=auth(key))


def supervised(hyperparameters: dict[str, Any] | None = None, **params: Any) -> dict[str, Any]:
    return {"type": "supervised", "supervised": {"hyperparameters": hyperparameters or {}, **params}}


def test_options_are_echoed_and_reach_the_trainer_spec(api: Harness) -> None:
    f = api.upload()
    hp = {"n_epochs": 2, "train_on_inputs": True, "packing": True, "max_seq_length": 256}
    body = {
        "model": TINY,
        "training_file": f["id"],
        "method": supervised(hp, adapter="full"),
        "resources": {"gpus": 2, "zero_stage": 3},
    }
    r = post(api, body)
    assert r.status_code == 200, r.text
    job = r.json()
    assert {k: job["hyperparameters"][k] for k in ("train_on_inputs", "packing", "max_seq_length")} == {
        "train_on_inputs": True,
        "packing": True,
        "max_seq_length": 256,
    }
    assert job["hyperparameters"]["batch_size"] == 1  # "auto" still resolved alongside
    assert job["method"]["supervised"]["adapter"] == "full"
    assert job["resources"]["zero_stage"] == 3
    spec = build_spec(api, job["id"])
    assert spec.method.params.adapter == "full"
    assert spec.method.params.hyperparameters.packing is True
    assert spec.method.params.hyperparameters.max_seq_length == 256
    assert spec.resources.zero_stage == 3


def test_defaults_add_nothing_to_the_echo(api: Harness) -> None:
    r = post(api, {"model": TINY, "training_file": api.upload()["id"]})
    assert r.status_code == 200, r.text
    job = r.json()
    assert set(job["hyperparameters"]) == {"n_epochs", "batch_size", "learning_rate_multiplier"}
    assert "adapter" not in job["method"]["supervised"]
    assert job["resources"]["zero_stage"] is None


@pytest.mark.parametrize(
    ("patch", "code", "param"),
    [
        (
            {"method": {"type": "dpo", "dpo": {"hyperparameters": {"packing": True}}}},
            "invalid_hyperparameters",
            "method.dpo.hyperparameters.packing",
        ),
        (
            {
                "method": {
                    "type": "reward_model",
                    "reward_model": {"hyperparameters": {"train_on_inputs": True}},
                }
            },
            "invalid_hyperparameters",
            "method.reward_model.hyperparameters.train_on_inputs",
        ),
        (
            {"method": supervised(adapter="full"), "quantization": "nf4"},
            "invalid_adapter",
            "method.supervised.adapter",
        ),
        (
            {"method": supervised(adapter="full"), "quantization": "int8"},
            "invalid_adapter",
            "method.supervised.adapter",
        ),
        ({"method": supervised(adapter="qlora")}, "invalid_request", "method.supervised.adapter"),
        (
            {"method": supervised({"max_seq_length": 8})},
            "invalid_request",
            "method.supervised.hyperparameters.max_seq_length",
        ),
        ({"resources": {"gpus": 1, "zero_stage": 3}}, "invalid_resources", "resources.zero_stage"),
        ({"resources": {"gpus": 8, "zero_stage": 1}}, "invalid_request", "resources.zero_stage"),
        (
            {
                "method": {
                    "type": "rlhf",
                    "rlhf": {"algorithm": "ppo", "reward_model": "x", "adapter": "full"},
                }
            },
            "invalid_request",
            "method.rlhf.adapter",
        ),
    ],
)
def test_incompatible_options_are_400_and_store_nothing(
    api: Harness, patch: dict[str, Any], code: str, param: str
) -> None:
    f = api.upload(data=PAIRS if "dpo" in str(patch) or "reward_model" in str(patch) else None)
    r = post(api, {"model": TINY, "training_file": f["id"], **patch})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == (code, param), error
    assert error["message"]
    assert api.client().jobs.list().data == []


def test_full_fine_tuning_cannot_start_from_a_fine_tuned_model(api: Harness) -> None:
    lora = succeeded_job(api, chat_lines(), {"type": "supervised"})
    body = {
        "model": lora["fine_tuned_model"],
        "training_file": api.upload()["id"],
        "method": supervised(adapter="full"),
    }
    r = post(api, body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_adapter", r.text


def test_a_fully_fine_tuned_model_is_not_a_starting_adapter(api: Harness) -> None:
    full = succeeded_job(api, chat_lines(), supervised(adapter="full"))
    r = post(api, {"model": full["fine_tuned_model"], "training_file": api.upload()["id"]})
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("invalid_model", "model")


def test_a_fully_fine_tuned_reward_model_cannot_serve_ppo(api: Harness) -> None:
    rm = succeeded_job(api, PAIRS, {"type": "reward_model", "reward_model": {"adapter": "full"}})
    r = post(api, rlhf_body(api, rm["id"]))
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == (
        "invalid_reward_model",
        "method.rlhf.reward_model",
    )


def test_another_projects_full_job_is_not_found(api: Harness, other_key: str) -> None:
    """Another project's job answers like a missing one, whatever kind of job it is."""
    theirs = succeeded_job(api, chat_lines(), supervised(adapter="full"), key=other_key)
    r = post(api, {"model": theirs["fine_tuned_model"], "training_file": api.upload()["id"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_found", r.text
