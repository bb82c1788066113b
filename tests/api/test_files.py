"""/v1/files: happy path, bad input (nothing stored), size limits, and another project."""

from __future__ import annotations

import pytest

from tests.api.conftest import UPLOAD_LIMIT, Harness, auth, chat_lines
from tests.conftest import ADMIN_KEY
from tuneforge import BadRequestError, NotFoundError


def test_upload_list_get_content_delete(api: Harness, tmp_path) -> None:
    client = api.client()
    path = tmp_path / "train.jsonl"
    path.write_bytes(chat_lines(5))
    seen: list[int] = []
    f = client.files.upload(path, on_progress=lambda done, total: seen.append(done))
    assert f.status == "processed" and f.bytes == path.stat().st_size and f.filename == "train.jsonl"
    assert seen and seen[-1] == f.bytes
    assert [x.id for x in client.files.list()] == [f.id]
    assert client.files.get(f.id) == f
    assert client.files.content(f.id) == path.read_bytes()
    assert client.files.delete(f.id) is True
    assert client.files.list() == []
    assert api.stored_objects() == []
    with pytest.raises(NotFoundError):
        client.files.get(f.id)


def test_list_pages_newest_first(api: Harness) -> None:
    ids = [api.upload()["id"] for _ in range(3)]
    r = api.http.get("/v1/files", params={"limit": 2}, headers=auth(ADMIN_KEY)).json()
    assert [x["id"] for x in r["data"]] == ids[::-1][:2] and r["has_more"] is True
    r2 = api.http.get(
        "/v1/files", params={"limit": 2, "after": r["data"][-1]["id"]}, headers=auth(ADMIN_KEY)
    ).json()
    assert [x["id"] for x in r2["data"]] == [ids[0]] and r2["has_more"] is False


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"this is not json\n", "invalid_file"),
        (b'{"messages": [{"role": "wizard", "content": "x"}]}\n', "invalid_file"),
        (b"[1, 2]\n", "invalid_file"),
        (b"", "invalid_file"),
        (b'\xff\xfe{"a": 1}\n', "invalid_file"),
    ],
)
def test_bad_dataset_is_rejected_and_nothing_stored(api: Harness, body: bytes, code: str) -> None:
    r = api.http.post(
        "/v1/files", files={"file": ("x.jsonl", body)}, data={"purpose": "fine-tune"}, headers=auth(ADMIN_KEY)
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == code and err["param"] == "file" and err["type"] == "invalid_request_error"
    assert api.stored_objects() == [] and api.client().files.list() == []


def test_error_names_the_line(api: Harness) -> None:
    body = chat_lines(2) + b"{broken\n"
    with pytest.raises(BadRequestError) as exc:
        api.client().files.upload(_write(api, body))
    assert "line 3" in exc.value.message and "not_json" in exc.value.message


def _write(api: Harness, body: bytes):
    path = api.settings.home / "upload.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    return path


@pytest.mark.parametrize(
    ("files", "data", "code"),
    [
        ({"file": ("x.jsonl", chat_lines())}, {"purpose": "assistants"}, "invalid_purpose"),
        ({"file": ("x.jsonl", chat_lines())}, {}, "invalid_purpose"),
        (None, {"purpose": "fine-tune"}, "missing_file"),
    ],
)
def test_bad_form(api: Harness, files, data, code) -> None:
    r = api.http.post("/v1/files", files=files, data=data, headers=auth(ADMIN_KEY))
    assert r.status_code == 400 and r.json()["error"]["code"] == code


@pytest.mark.parametrize(("extra_bytes", "code"), [(10, "file_too_large"), (200_000, "request_too_large")])
def test_oversize_upload_is_refused_with_413(api: Harness, extra_bytes: int, code: str) -> None:
    """Just over the file limit: the route refuses it; far over: the body limit stops the stream."""
    line = chat_lines(1)
    big = line * (UPLOAD_LIMIT // len(line)) + b" " * (UPLOAD_LIMIT % len(line) + extra_bytes)
    r = api.http.post(
        "/v1/files",
        files={"file": ("big.jsonl", big)},
        data={"purpose": "fine-tune"},
        headers=auth(ADMIN_KEY),
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == code
    assert api.stored_objects() == []
    assert api.http.get("/readyz").status_code == 200


def test_oversize_chunked_upload_without_length_is_refused(api: Harness) -> None:
    def body():
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jsonl"\r\n\r\n'
        for _ in range(UPLOAD_LIMIT // 1024 + 200):
            yield b"x" * 1024

    r = api.http.post(
        "/v1/files",
        content=body(),
        headers={**auth(ADMIN_KEY), "content-type": "multipart/form-data; boundary=b"},
    )
    assert r.status_code == 413
    assert api.stored_objects() == []


def _form(data: bytes, *, closed: bool = True) -> bytes:
    head = b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jsonl"\r\n\r\n' + data
    return head + part + (b"\r\n--b--\r\n" if closed else b"")


def test_a_body_cut_before_its_closing_boundary_is_refused(api: Harness) -> None:
    """A short Content-Length or a dropped chunked stream ends the body early: the file part may
    look whole, but without the closing boundary nothing says it is, so nothing is stored."""
    headers = {**auth(ADMIN_KEY), "content-type": "multipart/form-data; boundary=b"}
    r = api.http.post("/v1/files", content=_form(chat_lines(), closed=False), headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_multipart"
    assert (
        api.stored_objects() == [] and api.http.get("/v1/files", headers=auth(ADMIN_KEY)).json()["data"] == []
    )
    r = api.http.post("/v1/files", content=_form(chat_lines()), headers=headers)  # the same, whole
    assert r.status_code == 200, r.text


def test_a_storage_failure_while_receiving_is_a_server_error(
    api: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk is the service's fault: it reaches the app's catch-all handler (a logged 500
    internal_error; the test client re-raises it), not a 400 telling the client its form is wrong."""

    def full_disk():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(api.app.state.services.storage, "open_spool", full_disk)
    headers = {**auth(ADMIN_KEY), "content-type": "multipart/form-data; boundary=b"}
    with pytest.raises(OSError, match="No space left"):
        api.http.post("/v1/files", content=_form(chat_lines()), headers=headers)
    assert api.stored_objects() == []


def test_filename_is_display_only(api: Harness) -> None:
    f = api.upload(name="../../etc/pass\x00wd\u202e.jsonl")
    assert "/" not in f["filename"] and "\x00" not in f["filename"] and "\u202e" not in f["filename"]
    assert f["filename"].startswith("pass") and f["filename"].endswith(".jsonl")
    assert all(obj.startswith("projects/") for obj in api.stored_objects())


def test_another_project_sees_nothing(api: Harness, other_key: str) -> None:
    f = api.upload()
    for method, path in [
        ("GET", f"/v1/files/{f['id']}"),
        ("GET", f"/v1/files/{f['id']}/content"),
        ("DELETE", f"/v1/files/{f['id']}"),
    ]:
        r = api.http.request(method, path, headers=auth(other_key))
        assert r.status_code == 404, (method, path)
        assert r.json()["error"]["code"] == "file_not_found"
    assert api.http.get("/v1/files", headers=auth(other_key)).json()["data"] == []
    r = api.http.get("/v1/files", params={"after": f["id"]}, headers=auth(other_key))
    assert r.status_code == 400
    assert api.client().files.get(f["id"]).id == f["id"]  # untouched
