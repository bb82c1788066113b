"""Hostile request bodies: oversize (413 while the body streams, nothing stored), slowloris
(cut off, 408), JSON bombs (bounded, 4xx) and compressed bodies (refused, 415: never inflated).

The slow and streaming cases go through a real uvicorn server on loopback with raw sockets, so
that the body really arrives in pieces. Loops are bounded by a watchdog deadline, which only
stops a hung test; nothing asserts a duration.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn

from tests.api.conftest import Harness, auth, chat_lines
from tests.conftest import ADMIN_KEY, free_port
from tests.security.world import snapshot
from tuneforge_api.app import create_app

WATCHDOG_S = 60


@pytest.fixture
def server(api: Harness) -> Iterator[int]:
    """The app on uvicorn, with a 1 s body idle timeout so that a slowloris is cut off quickly."""
    settings = api.settings.model_copy(update={"body_idle_timeout_s": 1.0, "body_min_bytes_per_s": 1024})
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(settings), port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.01)
    yield port
    srv.should_exit = True
    thread.join(5)


def _head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _trickle(port: int, head: bytes, pieces: Iterator[bytes], pause: float) -> tuple[bytes, int]:
    """Send ``head``, then ``pieces`` with a pause between each, until the server answers.
    Returns (what the server sent, body bytes sent before its answer)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(head)
    sock.settimeout(pause)
    received, sent = b"", 0
    deadline = time.monotonic() + WATCHDOG_S
    try:
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
                if b"\r\n\r\n" in received and received.split(b"\r\n\r\n", 1)[1].count(b"}") >= 2:
                    break  # a whole JSON error body
                continue
            except TimeoutError:
                pass
            except ConnectionResetError:
                break  # the server closed on a body it refused; what it answered is in `received`
            piece = next(pieces, None)
            if piece is None:
                sock.settimeout(WATCHDOG_S)  # all sent: wait for the answer
                continue
            try:
                sock.sendall(piece)
                sent += len(piece)
            except (BrokenPipeError, ConnectionResetError):
                sock.settimeout(5)
    finally:
        sock.close()
    assert received, "the server never answered (watchdog)"
    return received, sent


def _status_and_error(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, json.loads(body)["error"]


def test_slowloris_body_is_cut_off(api: Harness, server: int) -> None:
    head = _head(
        "POST",
        "/v1/fine_tuning/jobs",
        {
            "Authorization": f"Bearer {ADMIN_KEY}",
            "Content-Type": "application/json",
            "Content-Length": "4096",
        },
    )
    forever = iter(lambda: b" ", None)  # one byte at a time, for as long as the server listens
    raw, sent = _trickle(server, head, forever, pause=0.2)
    status, error = _status_and_error(raw)
    assert status == 408 and error["code"] == "request_timeout", raw[:300]
    assert sent < 4096


def test_stalled_upload_is_cut_off_and_stores_nothing(api: Harness, server: int) -> None:
    boundary = "x" * 16
    head = _head(
        "POST",
        "/v1/files",
        {
            "Authorization": f"Bearer {ADMIN_KEY}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": "100000",
        },
    )
    start = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
    raw, _ = _trickle(server, head, iter([start.encode(), chat_lines(2)]), pause=0.2)
    status, error = _status_and_error(raw)
    assert status == 408 and error["code"] == "request_timeout"
    assert api.stored_objects() == [] and api.client().files.list() == []


def test_oversize_chunked_upload_is_refused_while_streaming(api: Harness, server: int) -> None:
    boundary = "y" * 16
    head = _head(
        "POST",
        "/v1/files",
        {
            "Authorization": f"Bearer {ADMIN_KEY}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Transfer-Encoding": "chunked",
        },
    )
    total = 256 * 1024 * 1024  # a thousand times the harness's 256 KiB limit
    line = chat_lines(1)
    block = line * (65536 // len(line))
    start = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'.encode()
    )
    chunks = [start, *([block] * (total // len(block)))]
    pieces = (b"%x\r\n%s\r\n" % (len(c), c) for c in chunks)
    raw, sent = _trickle(server, head, pieces, pause=0.001)
    status, error = _status_and_error(raw)
    assert status == 413 and error["code"] == "request_too_large"
    assert sent < total // 8, f"the server read {sent} bytes before refusing"
    assert api.stored_objects() == [] and api.client().files.list() == []


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 500_000,  # deep nesting, under the 1 MiB body limit
        b'{"model": ' + b"9" * 900_000 + b"}",  # a number with 900k digits
        b'{"model": "' + b"a" * 900_000 + b'", "training_file": "f"}',  # a huge string
        json.dumps({f"k{i}": i for i in range(60_000)}).encode(),  # many keys
        b'{"model": "m", "training_file": "f", "metadata": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}",
    ],
    ids=["deep", "huge_number", "huge_string", "many_keys", "deep_in_field"],
)
def test_json_bombs_are_bounded_4xx(api: Harness, body: bytes) -> None:
    before = snapshot(api)
    r = api.http.post(
        "/v1/fine_tuning/jobs",
        content=body,
        headers={**auth(ADMIN_KEY), "Content-Type": "application/json"},
    )
    assert r.status_code == 400, r.text[:300]
    assert set(r.json()["error"]) == {"code", "message", "param", "type"}
    assert len(r.content) < 4096  # the error does not echo the bomb back
    assert snapshot(api) == before


def test_json_body_over_1_mib_is_413(api: Harness) -> None:
    body = b'{"model": "' + b"a" * (2 << 20) + b'"}'
    r = api.http.post(
        "/v1/fine_tuning/jobs", content=body, headers={**auth(ADMIN_KEY), "Content-Type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_chunked_json_body_over_1_mib_is_413(api: Harness) -> None:
    """No Content-Length to refuse early: the limit trips while FastAPI reads the body, and the
    answer is still the 413 (FastAPI alone would turn the read error into a 400)."""
    pieces = iter([b'{"model": "', *([b"a" * 65536] * 32), b'"}'])
    r = api.http.post(
        "/v1/fine_tuning/jobs",
        content=pieces,
        headers={**auth(ADMIN_KEY), "Content-Type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text[:200]


def test_compressed_bodies_are_refused_not_inflated(api: Harness) -> None:
    bomb = gzip.compress(b"\n" * (256 << 20), compresslevel=9)  # 256 MiB of newlines, ~250 KB
    assert len(bomb) < 1 << 20
    before = snapshot(api)
    for path, kwargs in (
        ("/v1/files", {"files": {"file": ("x.jsonl", bomb)}, "data": {"purpose": "fine-tune"}}),
        ("/v1/fine_tuning/jobs", {"content": bomb}),
    ):
        r = api.http.post(path, headers={**auth(ADMIN_KEY), "Content-Encoding": "gzip"}, **kwargs)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_content_encoding"
    assert snapshot(api) == before
    # Uncompressed, or labelled identity, is accepted as before.
    r = api.http.post(
        "/v1/files",
        files={"file": ("x.jsonl", chat_lines())},
        data={"purpose": "fine-tune"},
        headers={**auth(ADMIN_KEY), "Content-Encoding": "identity"},
    )
    assert r.status_code == 200, r.text
