"""Names and mass assignment (OWASP API3).

- An uploaded file's name is metadata only: path traversal, NUL and control bytes and very long
  unicode are stored cleaned, and the object's key in storage is built from ids alone.
- Unknown fields in a JSON body are refused (400 in the envelope), on every JSON body the spec
  documents, and fields the server owns (status, project, trained_tokens, ...) cannot be set.
"""

from __future__ import annotations

import re

import pytest

from tests.api.conftest import Harness, auth, chat_lines
from tests.conftest import ADMIN_KEY
from tests.security.world import snapshot

NASTY_NAMES = [
    "../../etc/passwd",
    "..\\..\\windows\\system32\\config",
    "/etc/shadow",
    "a\x00b.jsonl",
    "new\nline\r.jsonl",
    "é" * 1000 + ".jsonl",  # kept, cut to 255 characters
    "é" * 5000 + ".jsonl",  # a 10 KB header line: the multipart parser refuses it
    "\u202egnp.jsonl",  # right-to-left override
    "..",
    "",
]


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    """A multipart body written by hand: httpx would refuse or escape some of these names."""
    boundary = "tfboundary7c1e"
    disposition = b'Content-Disposition: form-data; name="file"; filename="' + name.encode() + b'"'
    body = b"".join(
        [
            b"--" + boundary.encode() + b"\r\n" + disposition + b"\r\n\r\n" + data + b"\r\n",
            b"--"
            + boundary.encode()
            + b'\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n',
            b"--" + boundary.encode() + b"--\r\n",
        ]
    )
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.parametrize("name", NASTY_NAMES, ids=range(len(NASTY_NAMES)))
def test_file_names_are_metadata_never_paths(api: Harness, name: str) -> None:
    body, content_type = _multipart(name, chat_lines())
    r = api.http.post("/v1/files", content=body, headers={**auth(ADMIN_KEY), "Content-Type": content_type})
    if r.status_code == 400:  # NUL, line breaks or a 10 KB name break the part's header: refused
        assert r.json()["error"]["code"] == "invalid_multipart" and api.stored_objects() == []
        assert "\x00" in name or "\n" in name or len(name.encode()) > 4096
        return
    assert r.status_code == 200, r.text
    f = r.json()
    stored = f["filename"]
    assert "/" not in stored and "\\" not in stored and stored not in ("", ".", "..")
    assert not any(ord(c) < 32 or 0x7F <= ord(c) < 0xA0 or c == "\u202e" for c in stored)
    assert len(stored) <= 255
    # The object lives under its id, whatever the name said, and no path anywhere took the name.
    [key] = api.stored_objects()
    assert re.fullmatch(rf"projects/[a-z]+-[0-9a-f]+/files/{f['id']}", key), key
    for path in api.settings.home.rglob("*"):
        assert not {"passwd", "shadow", "system32", "windows"} & set(path.parts), path
        assert "é" not in str(path) and "gnp" not in str(path), path
    assert api.http.get(f"/v1/files/{f['id']}", headers=auth(ADMIN_KEY)).json()["filename"] == stored
    assert api.http.get(f"/v1/files/{f['id']}/content", headers=auth(ADMIN_KEY)).content == chat_lines()


SERVER_OWNED_JOB_FIELDS = {
    "id": "ftjob-mine",
    "status": "succeeded",
    "organization_id": "proj-other",
    "project_id": "proj-other",
    "trained_tokens": 10**9,
    "fine_tuned_model": "ft:tuneforge/tiny-llama:proj-other:x:ftjob-1",
    "created_at": 1,
    "finished_at": 2,
    "error": {"code": "x", "message": "y"},
    "result_files": ["file-x"],
    "estimated_finish": 3,
    "attempt": 7,
    "token_hash": "0" * 64,
    "cancel_requested": True,
    "init_adapter_key": "projects/proj-other/jobs/ftjob-1/adapter/",
}


@pytest.mark.parametrize("field", sorted(SERVER_OWNED_JOB_FIELDS))
def test_server_owned_job_fields_cannot_be_set(api: Harness, field: str) -> None:
    f = api.upload()
    body = {"model": "tuneforge/tiny-llama", "training_file": f["id"], field: SERVER_OWNED_JOB_FIELDS[field]}
    before = snapshot(api)
    r = api.http.post("/v1/fine_tuning/jobs", json=body, headers=auth(ADMIN_KEY))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_request" and error["param"] == field, error
    assert snapshot(api) == before


def test_nested_unknown_fields_are_refused(api: Harness) -> None:
    f = api.upload()
    base = {"model": "tuneforge/tiny-llama", "training_file": f["id"]}
    for extra in (
        {"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "lr": 9}}}},
        {"lora": {"r": 8, "owner": "x"}},
        {"resources": {"gpus": 0, "priority": "high"}},
    ):
        r = api.http.post("/v1/fine_tuning/jobs", json={**base, **extra}, headers=auth(ADMIN_KEY))
        assert r.status_code == 400 and "unknown field" in r.json()["error"]["message"], r.text


def _request_schemas(spec: dict) -> list[tuple[str, dict]]:
    """Every JSON request body schema in the spec, with the operation that takes it."""
    found = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            content = (op.get("requestBody") or {}).get("content", {})
            if "application/json" in content:
                found.append((f"{method.upper()} {path}", content["application/json"]["schema"]))
    return found


def _closed(schema: dict, spec: dict, seen: set[str], where: str, open_maps: list[str]) -> list[str]:
    """Object schemas with named properties that still accept other keys."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        if name in seen:
            return []
        seen.add(name)
        return _closed(spec["components"]["schemas"][name], spec, seen, name, open_maps)
    bad = []
    if schema.get("properties") and schema.get("additionalProperties", True) is not False:
        bad.append(where)
    if schema.get("additionalProperties") not in (None, False, True) and not schema.get("properties"):
        open_maps.append(where)  # a free map of values (metadata): allowed, listed for review
    for key in ("properties",):
        for prop, sub in (schema.get(key) or {}).items():
            bad += _closed(sub, spec, seen, f"{where}.{prop}", open_maps)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            bad += _closed(schema[key], spec, seen, f"{where}[]", open_maps)
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key, []):
            bad += _closed(sub, spec, seen, where, open_maps)
    return bad


def test_every_request_body_refuses_unknown_fields(api: Harness) -> None:
    """On every operation the app has now or later: each object with named fields in a
    request body is closed (``additionalProperties: false``), so mass assignment has no door."""
    spec = api.http.get("/openapi.json").json()
    bodies = _request_schemas(spec)
    assert len(bodies) >= 8
    open_maps: list[str] = []
    bad = [f"{op}: {where}" for op, schema in bodies for where in _closed(schema, spec, set(), op, open_maps)]
    assert not bad, f"request schemas that accept unknown fields: {bad}"
