"""Client behaviour over real HTTP (a uvicorn server on loopback): error classes, retries
with backoff and Retry-After, and one Idempotency-Key per logical request."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.conftest import free_port
from tuneforge import (
    APIConnectionError,
    AsyncClient,
    BadRequestError,
    Client,
    ConflictError,
    InternalServerError,
    NotFoundError,
    RateLimitError,
    UnprocessableEntityError,
)


class Script:
    """What the server answers next, and what it saw."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, dict, dict]] = []
        self.seen: list[dict] = []


@pytest.fixture
def server() -> Iterator[tuple[str, Script]]:
    script = Script()
    app = FastAPI()

    @app.api_route("/v1/{path:path}", methods=["GET", "POST"])
    async def any_route(path: str, request: Request) -> JSONResponse:
        body = await request.body()
        script.seen.append(
            {"path": path, "method": request.method, "headers": dict(request.headers), "body": body}
        )
        status, body, headers = script.answers.pop(0) if script.answers else (200, {"id": "x"}, {})
        return JSONResponse(body, status, headers=headers)

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", script
    srv.should_exit = True
    thread.join(5)


def err(code: str) -> dict:
    return {"error": {"code": code, "message": f"{code} happened", "param": "p", "type": "t"}}


@pytest.mark.parametrize(
    ("status", "cls"),
    [(400, BadRequestError), (404, NotFoundError), (409, ConflictError), (422, UnprocessableEntityError)],
)
def test_status_maps_to_error_class(server, status, cls) -> None:
    url, script = server
    script.answers = [(status, err("boom"), {})]
    with pytest.raises(cls) as exc:
        Client(base_url=url, api_key="k", max_retries=2).jobs.get("j")
    assert exc.value.code == "boom" and exc.value.param == "p" and exc.value.status_code == status
    assert len(script.seen) == 1  # 4xx other than 408/429 is never retried


def test_retries_5xx_then_succeeds_with_same_idempotency_key(server) -> None:
    url, script = server
    script.answers = [
        (503, err("busy"), {}),
        (500, err("oops"), {}),
        (
            200,
            {
                "id": "file-1",
                "object": "file",
                "bytes": 1,
                "created_at": 1,
                "filename": "a",
                "purpose": "fine-tune",
            },
            {},
        ),
    ]
    client = Client(base_url=url, api_key="k", max_retries=2)
    assert client.post_json("/v1/files", {"a": 1})["id"] == "file-1"
    keys = {s["headers"]["idempotency-key"] for s in script.seen}
    assert len(script.seen) == 3 and len(keys) == 1
    assert script.seen[0]["headers"]["authorization"] == "Bearer k"


def test_gives_up_after_max_retries(server) -> None:
    url, script = server
    script.answers = [(500, err("oops"), {})] * 3
    with pytest.raises(InternalServerError):
        Client(base_url=url, api_key="k", max_retries=1).jobs.get("j")
    assert len(script.seen) == 2


def test_honours_retry_after_and_x_should_retry(server) -> None:
    url, script = server
    script.answers = [(429, err("slow"), {"retry-after": "0.2"}), (200, {"ok": True}, {})]
    started = time.monotonic()
    Client(base_url=url, api_key="k").get_json("/v1/x")
    assert time.monotonic() - started >= 0.2
    script.answers = [(429, err("quota"), {"x-should-retry": "false"})]
    with pytest.raises(RateLimitError):
        Client(base_url=url, api_key="k").get_json("/v1/x")


def test_connection_error() -> None:
    client = Client(base_url=f"http://127.0.0.1:{free_port()}", api_key="k", max_retries=0)
    with pytest.raises(APIConnectionError):
        client.files.list()


def test_create_job_builds_openai_method_object(server) -> None:
    url, script = server
    script.answers = [
        (
            200,
            {
                "id": "ftjob-1",
                "created_at": 1,
                "model": "m",
                "organization_id": "p",
                "status": "queued",
                "training_file": "f",
            },
            {},
        )
    ]
    job = Client(base_url=url, api_key="k").create_job(
        model="m", training_file="f", method="supervised", hyperparameters={"n_epochs": 2}
    )
    assert job.id == "ftjob-1"
    sent = json.loads(script.seen[0]["body"])
    # Only what the caller set travels; the server resolves the rest ("auto").
    assert sent == {
        "model": "m",
        "training_file": "f",
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    }


def test_errors_carry_the_request_id(server) -> None:
    url, script = server
    script.answers = [(404, err("gone"), {"x-request-id": "req_abc"})]
    with pytest.raises(NotFoundError) as exc:
        Client(base_url=url, api_key="k").jobs.get("j")
    assert exc.value.request_id == "req_abc" and "req_abc" in str(exc.value)


async def test_async_client_same_behaviour(server) -> None:
    url, script = server
    script.answers = [
        (503, err("busy"), {}),
        (
            200,
            {
                "object": "list",
                "data": [
                    {
                        "id": "file-1",
                        "object": "file",
                        "bytes": 1,
                        "created_at": 1,
                        "filename": "a",
                        "purpose": "fine-tune",
                    }
                ],
                "has_more": False,
            },
            {},
        ),
        (404, err("nope"), {"x-request-id": "req_1"}),
    ]
    async with AsyncClient(base_url=url, api_key="k") as client:
        files = await client.files.list()
        assert [f.id for f in files] == ["file-1"]
        with pytest.raises(NotFoundError) as exc:
            await client.jobs.get("j")
    assert exc.value.request_id == "req_1" and len(script.seen) == 3
