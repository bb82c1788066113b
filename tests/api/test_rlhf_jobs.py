"""Create-time rules for rlhf jobs and for jobs that start from a fine-tuned model, and the
spec the scheduler builds from them."""

from __future__ import annotations

import json

import pytest

from tests.api.conftest import Harness, auth, chat_lines
from tests.conftest import ADMIN_KEY
from tuneforge.storage import adapter_prefix
from tuneforge.types import JobStatus
from tuneforge_api.store import jobs
from tuneforge_scheduler.executors.local import LocalExecutor
from tuneforge_scheduler.lifecycle import Scheduler

TINY = "tuneforge/tiny-llama"
PROMPTS = b"".join(
    json.dumps({"prompt": f"Where is place {i}?", "answer": "Forgeville"}).encode() + b"\n" for i in range(4)
)
PAIRS = json.dumps({"prompt": "p", "chosen": "good", "rejected": "bad"}).encode() + b"\n"


def succeeded_job(api: Harness, data: bytes, method: dict, key: str = ADMIN_KEY) -> dict:
    """A job moved to succeeded the way the scheduler would, with its ft: name."""
    f = api.upload(key=key, data=data)
    job = api.http.post(
        "/v1/fine_tuning/jobs",
        json={"model": TINY, "training_file": f["id"], "method": method},
        headers=auth(key),
    ).json()

    async def go() -> None:
        async with api.app.state.services.sessions() as session:
            ft = f"ft:{TINY}:{job['organization_id']}::{job['id']}"
            assert await jobs.transition(
                session, job["id"], (JobStatus.validating_files,), JobStatus.succeeded, fine_tuned_model=ft
            )
            await session.commit()

    api.http.portal.call(go)
    return api.client(key).jobs.get(job["id"]).model_dump()


def rlhf_body(api: Harness, rm_id: str, model: str = TINY) -> dict:
    return {
        "model": model,
        "training_file": api.upload(data=PROMPTS)["id"],
        "method": {"type": "rlhf", "rlhf": {"algorithm": "ppo", "reward_model": rm_id}},
    }


def build_spec(api: Harness, job_id: str):
    async def go():
        async with api.app.state.services.sessions() as session:
            row = await jobs.get_row_any_project(session, job_id)
        row.attempt = 1  # as when the scheduler launches the first attempt
        scheduler = Scheduler(
            services=api.app.state.services, executor=LocalExecutor(api.settings.home / "runs")
        )
        return scheduler.build_spec(row)

    return api.http.portal.call(go)


def test_rlhf_with_a_reward_model_and_an_sft_start(api: Harness) -> None:
    rm = succeeded_job(api, PAIRS, {"type": "reward_model"})
    sft = succeeded_job(api, chat_lines(), {"type": "supervised"})
    r = api.http.post(
        "/v1/fine_tuning/jobs",
        json=rlhf_body(api, rm["id"], model=sft["fine_tuned_model"]),
        headers=auth(ADMIN_KEY),
    )
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["model"] == sft["fine_tuned_model"] and job["method"]["rlhf"]["algorithm"] == "ppo"
    assert job["method"]["rlhf"]["hyperparameters"]["kl_coef"] == 0.05  # defaults are echoed
    spec = build_spec(api, job["id"])
    assert spec.base_model == TINY
    assert spec.init_adapter_key == adapter_prefix(job["organization_id"], sft["id"])
    assert spec.reward_model_key == adapter_prefix(job["organization_id"], rm["id"])
    assert spec.method.rlhf.reward_model == rm["id"]


def test_grpo_with_a_builtin_reward(api: Harness) -> None:
    body = {
        "model": TINY,
        "training_file": api.upload(data=PROMPTS)["id"],
        "method": {
            "type": "rlhf",
            "rlhf": {"algorithm": "grpo", "reward_function": {"type": "contains", "field": "answer"}},
        },
    }
    r = api.http.post("/v1/fine_tuning/jobs", json=body, headers=auth(ADMIN_KEY))
    assert r.status_code == 200, r.text
    assert build_spec(api, r.json()["id"]).reward_model_key is None


@pytest.mark.parametrize("case", ["not_a_reward_model", "not_finished", "other_project"])
def test_bad_reward_model_is_400(api: Harness, other_key: str, case: str) -> None:
    if case == "not_a_reward_model":
        rm_id = succeeded_job(api, chat_lines(), {"type": "supervised"})["id"]
    elif case == "not_finished":
        f = api.upload(data=PAIRS)
        rm_id = api.client().create_job(model=TINY, training_file=f["id"], method="reward_model").id
    else:
        rm_id = succeeded_job(api, PAIRS, {"type": "reward_model"}, key=other_key)["id"]
    r = api.http.post("/v1/fine_tuning/jobs", json=rlhf_body(api, rm_id), headers=auth(ADMIN_KEY))
    assert r.status_code == 400 and r.json()["error"]["param"] == "method.rlhf.reward_model", r.text


def test_ft_model_must_be_a_succeeded_job_of_this_project(api: Harness, other_key: str) -> None:
    theirs = succeeded_job(api, chat_lines(), {"type": "supervised"}, key=other_key)
    f = api.upload()
    for model in (theirs["fine_tuned_model"], f"ft:{TINY}:proj-x::ftjob-000", "ft:nope"):
        r = api.http.post(
            "/v1/fine_tuning/jobs", json={"model": model, "training_file": f["id"]}, headers=auth(ADMIN_KEY)
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_found", (model, r.text)
