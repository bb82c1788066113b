"""Project A's objects, built through the real API (plus the store for what only a trainer or
the scheduler can do), and a snapshot of everything the service holds, to prove that a
request changed nothing."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from tests.api.conftest import Harness, auth
from tests.conftest import ADMIN_KEY
from tuneforge.storage import MANIFEST, adapter_prefix, checkpoint_prefix
from tuneforge.types import JobStatus
from tuneforge_api.db.tables import Base
from tuneforge_api.store import jobs, webhooks

TINY = "tuneforge/tiny-llama"
PROMPTS = b"".join(
    json.dumps({"messages": [{"role": "user", "content": f"prompt {i}"}]}).encode() + b"\n" for i in range(3)
)


@dataclass
class World:
    """Project A (the default project, admin key) and a member key of project B."""

    project_a: str
    key_a: str
    key_b: str
    key_b_id: str
    file_id: str
    active_job: str
    done_job: str
    ft_model: str
    webhook_id: str
    prompts_file: str
    feedback_session: str

    def a_ids(self) -> list[str]:
        return [
            self.file_id,
            self.active_job,
            self.done_job,
            self.ft_model,
            self.webhook_id,
            self.prompts_file,
            self.feedback_session,
        ]


def build_world(api: Harness, key_b: str, key_b_id: str) -> World:
    http = api.http
    f = api.upload(name="a-secret-name.jsonl")
    body = {"model": TINY, "training_file": f["id"], "suffix": "asuffix"}
    active = http.post("/v1/fine_tuning/jobs", json=body, headers=auth(ADMIN_KEY)).json()
    done = http.post("/v1/fine_tuning/jobs", json=body, headers=auth(ADMIN_KEY)).json()
    project = done["organization_id"]
    ft_model = f"ft:{TINY}:{project}:asuffix:{done['id']}"
    succeed(api, done["id"], ft_model)
    # The adapter the trainer would publish: files first, manifest last.
    prefix = adapter_prefix(project, done["id"])
    api.app.state.services.storage.put_bytes(prefix + "adapter_model.safetensors", b"weights")
    api.app.state.services.storage.put_bytes(prefix + MANIFEST, json.dumps({"files": {}}).encode())
    ckpt = checkpoint_prefix(project, done["id"], 1)
    api.app.state.services.storage.put_bytes(ckpt + "adapter_model.safetensors", b"weights")
    api.app.state.services.storage.put_bytes(ckpt + MANIFEST, json.dumps({"step": 1}).encode())
    hook = {"id": add_webhook(api, project)}
    prompts = api.upload(data=PROMPTS, name="a-prompts.jsonl")
    fbs = http.post(
        "/v1/feedback/sessions",
        json={"model": TINY, "prompts_file": prompts["id"], "k": 2},
        headers=auth(ADMIN_KEY),
    )
    assert fbs.status_code == 201, fbs.text
    return World(
        project,
        ADMIN_KEY,
        key_b,
        key_b_id,
        f["id"],
        active["id"],
        done["id"],
        ft_model,
        hook["id"],
        prompts["id"],
        fbs.json()["id"],
    )


def member_key_of_new_project(api: Harness) -> tuple[str, str]:
    """(secret, key id) of a member key of a fresh project B."""
    http = api.http
    project = http.post(
        "/v1/admin/projects", json={"name": f"b-{uuid.uuid4().hex[:8]}"}, headers=auth(ADMIN_KEY)
    ).json()
    key = http.post(
        f"/v1/admin/projects/{project['id']}/api_keys", json={"name": "b"}, headers=auth(ADMIN_KEY)
    ).json()
    return key["key"], key["id"]


def succeed(api: Harness, job_id: str, ft_model: str) -> None:
    async def go() -> None:
        async with api.app.state.services.sessions() as session:
            assert await jobs.transition(
                session, job_id, (JobStatus.validating_files,), JobStatus.succeeded, fine_tuned_model=ft_model
            )
            await session.commit()

    api.http.portal.call(go)


def add_webhook(api: Harness, project: str) -> str:
    """Through the store: the API would resolve the host (no DNS here); nothing delivers in these tests."""

    async def go() -> str:
        async with api.app.state.services.sessions() as session:
            hook = await webhooks.create(
                session, project, "http://127.0.0.1:9/hook", ["fine_tuning.job.succeeded"], "whsec_x"
            )
            await session.commit()
            return hook.id

    return api.http.portal.call(go)


def snapshot(api: Harness) -> dict[str, Any]:
    """Every row of every table, and every stored object with its bytes."""

    async def rows() -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        async with api.app.state.services.engine.connect() as conn:
            for table in Base.metadata.sorted_tables:
                result = await conn.execute(select(table))
                out[table.name] = sorted(repr(tuple(r)) for r in result)
        return out

    storage = api.app.state.services.storage
    objects = {key: storage.get_bytes(key) for key in storage.list("projects/")}
    return {"db": api.http.portal.call(rows), "storage": objects}


def redact(text: str, ident: str) -> str:
    """A response with one id replaced, to compare answers for two different ids."""
    return re.sub(re.escape(ident), "<ID>", text)
