"""The real app in-process: FastAPI's TestClient is an httpx.Client, so the SDK runs on
top of it unchanged. Every test here runs once on SQLite and once on PostgreSQL."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.conftest import ADMIN_KEY, drop_queue, free_port
from tuneforge import Client
from tuneforge_api.app import create_app
from tuneforge_api.bootstrap import ensure_default_project
from tuneforge_api.settings import Settings

UPLOAD_LIMIT = 256 * 1024


def chat_lines(n: int = 4) -> bytes:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"question {i}"},
                {"role": "assistant", "content": f"answer {i}"},
            ]
        }
        for i in range(n)
    ]
    return "\n".join(json.dumps(r) for r in rows).encode() + b"\n"


@dataclass
class Harness:
    app: FastAPI
    http: TestClient
    settings: Settings

    def client(self, key: str | None = ADMIN_KEY) -> Client:
        return Client(base_url="http://testserver", api_key=key or "", http_client=self.http, max_retries=0)

    @property
    def storage_root(self) -> Path:
        return Path(self.settings.resolved_storage_uri.removeprefix("file://"))

    def stored_objects(self) -> list[str]:
        return [
            p.relative_to(self.storage_root).as_posix()
            for p in self.storage_root.rglob("*")
            if p.is_file() and ".tmp" not in p.parts
        ]

    def upload(self, key: str = ADMIN_KEY, data: bytes | None = None, name: str = "train.jsonl") -> dict:
        r = self.http.post(
            "/v1/files",
            files={"file": (name, data or chat_lines())},
            data={"purpose": "fine-tune"},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert r.status_code == 200, r.text
        return r.json()


def harness(tmp_path: Path, redis_url: str, **settings: Any) -> Iterator[Harness]:
    """The app on its own home, queue and admin key, plus ``settings``; the queue is dropped
    afterwards."""
    resolved = Settings(
        home=tmp_path / "home",
        redis_url=redis_url,
        queue_name=f"tf-test:{uuid.uuid4().hex}",
        api_key=ADMIN_KEY,
        **settings,
    )
    app = create_app(resolved)
    with TestClient(app) as http:
        http.portal.call(ensure_default_project, app.state.services)
        yield Harness(app, http, resolved)
    drop_queue(redis_url, resolved.resolved_queue_name)


@pytest.fixture
def api(tmp_path: Path, database_url: str, redis_url: str) -> Iterator[Harness]:
    yield from harness(tmp_path, redis_url, database_url=database_url, max_upload_bytes=UPLOAD_LIMIT)


@pytest.fixture
def other_key(api: Harness) -> str:
    """A member key of a second project."""
    admin = api.client()
    project = admin.admin.create_project(f"other-{uuid.uuid4().hex[:6]}")
    return admin.admin.create_key(project.id, name="b").key or ""


@pytest.fixture
def live_url(api: Harness) -> Iterator[str]:
    """The app on a real uvicorn server on loopback (its own app instance and event loop,
    the same database and storage as ``api``)."""
    yield from serve(api)


def serve(api: Harness) -> Iterator[str]:
    """Run a second app on ``api``'s settings under uvicorn until the generator is closed."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(api.settings), port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(5)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
