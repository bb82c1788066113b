"""GET /checkpoints and from_checkpoint. Checkpoint folders are written into the real
storage here the way the trainer writes them (files, then manifest.json last)."""

from __future__ import annotations

import json

import pytest

from tests.api.conftest import Harness, auth
from tests.conftest import ADMIN_KEY
from tuneforge.storage import MANIFEST, checkpoint_prefix
from tuneforge.types import JobStatus
from tuneforge_api.store import jobs

TINY = "tuneforge/tiny-llama"


def make_job(api: Harness, key: str = ADMIN_KEY, finish: bool = True) -> dict:
    f = api.upload(key=key)
    job = api.http.post(
        "/v1/fine_tuning/jobs", json={"model": TINY, "training_file": f["id"]}, headers=auth(key)
    ).json()
    if finish:

        async def go() -> None:
            async with api.app.state.services.sessions() as session:
                await jobs.transition(
                    session,
                    job["id"],
                    (JobStatus.validating_files,),
                    JobStatus.failed,
                    error={"code": "x", "message": "stopped for the test", "param": None},
                )
                await session.commit()

        api.http.portal.call(go)
    return job


def write_checkpoint(api: Harness, job: dict, step: int, *, complete: bool = True) -> None:
    storage = api.app.state.services.storage
    prefix = checkpoint_prefix(job["organization_id"], job["id"], step)
    storage.put_bytes(prefix + "adapter_model.safetensors", b"weights")
    if complete:
        manifest = {"step": step, "metrics": {"train_loss": 1.0 / step}, "created_at": 1_700_000_000 + step}
        storage.put_bytes(prefix + MANIFEST, json.dumps(manifest).encode())


def test_lists_complete_checkpoints_newest_first(api: Harness) -> None:
    job = make_job(api)
    for step in (10, 20, 30):
        write_checkpoint(api, job, step)
    write_checkpoint(api, job, 40, complete=False)  # no manifest: does not exist
    url = f"/v1/fine_tuning/jobs/{job['id']}/checkpoints"
    page = api.http.get(url, params={"limit": 2}, headers=auth(ADMIN_KEY)).json()
    assert [c["step_number"] for c in page["data"]] == [30, 20] and page["has_more"]
    first = page["data"][0]
    assert first["object"] == "fine_tuning.job.checkpoint" and first["fine_tuning_job_id"] == job["id"]
    assert first["metrics"] == {"train_loss": 1 / 30} and first["fine_tuned_model_checkpoint"].endswith(
        ":ckpt-step-30"
    )
    rest = api.http.get(url, params={"after": page["last_id"]}, headers=auth(ADMIN_KEY)).json()
    assert [c["step_number"] for c in rest["data"]] == [10] and not rest["has_more"]
    assert api.http.get(url, params={"after": "ftckpt-0-1"}, headers=auth(ADMIN_KEY)).status_code == 400


def test_new_job_from_a_checkpoint(api: Harness) -> None:
    source = make_job(api)
    write_checkpoint(api, source, 10)
    ckpt = api.http.get(f"/v1/fine_tuning/jobs/{source['id']}/checkpoints", headers=auth(ADMIN_KEY)).json()
    f = api.upload()
    r = api.http.post(
        "/v1/fine_tuning/jobs",
        json={"model": TINY, "training_file": f["id"], "from_checkpoint": ckpt["data"][0]["id"]},
        headers=auth(ADMIN_KEY),
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("case", ["unknown", "incomplete", "running", "garbage"])
def test_bad_from_checkpoint_is_400(api: Harness, case: str) -> None:
    source = make_job(api, finish=case != "running")
    write_checkpoint(api, source, 10, complete=case != "incomplete")
    cid = {"unknown": source["id"].replace("ftjob-", "ftckpt-") + "-99", "garbage": "../../etc"}.get(
        case, source["id"].replace("ftjob-", "ftckpt-") + "-10"
    )
    f = api.upload()
    r = api.http.post(
        "/v1/fine_tuning/jobs",
        json={"model": TINY, "training_file": f["id"], "from_checkpoint": cid},
        headers=auth(ADMIN_KEY),
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "from_checkpoint", r.text


def test_another_project_cannot_see_or_use_checkpoints(api: Harness, other_key: str) -> None:
    source = make_job(api)
    write_checkpoint(api, source, 10)
    assert (
        api.http.get(f"/v1/fine_tuning/jobs/{source['id']}/checkpoints", headers=auth(other_key)).status_code
        == 404
    )
    f = api.upload(key=other_key)
    cid = source["id"].replace("ftjob-", "ftckpt-") + "-10"
    r = api.http.post(
        "/v1/fine_tuning/jobs",
        json={"model": TINY, "training_file": f["id"], "from_checkpoint": cid},
        headers=auth(other_key),
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "checkpoint_not_found"
