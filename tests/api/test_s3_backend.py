"""The API on S3-compatible storage: objects land in the bucket, and only complete ones."""

from __future__ import annotations

import uuid
from pathlib import Path

import boto3
from fastapi.testclient import TestClient

from tests.api.conftest import auth, chat_lines
from tests.conftest import ADMIN_KEY
from tuneforge_api.app import create_app
from tuneforge_api.settings import Settings


def test_upload_content_delete_on_s3(tmp_path: Path, redis_url: str, s3_bucket: str) -> None:
    settings = Settings(
        home=tmp_path,
        storage_uri=f"s3://{s3_bucket}/tf",
        redis_url=redis_url,
        queue_name=f"tf-test:{uuid.uuid4().hex}",
        api_key=ADMIN_KEY,
    )
    s3 = boto3.client("s3")
    with TestClient(create_app(settings)) as http:
        bad = http.post(
            "/v1/files",
            files={"file": ("x.jsonl", b"nope\n")},
            data={"purpose": "fine-tune"},
            headers=auth(ADMIN_KEY),
        )
        assert bad.status_code == 400 and s3.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0
        data = chat_lines(3)
        f = http.post(
            "/v1/files",
            files={"file": ("t.jsonl", data)},
            data={"purpose": "fine-tune"},
            headers=auth(ADMIN_KEY),
        ).json()
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]]
        assert keys == [f"tf/projects/{f['id'] and keys[0].split('/')[2]}/files/{f['id']}"]
        assert http.get(f"/v1/files/{f['id']}/content", headers=auth(ADMIN_KEY)).content == data
        assert http.delete(f"/v1/files/{f['id']}", headers=auth(ADMIN_KEY)).json()["deleted"] is True
        assert s3.list_objects_v2(Bucket=s3_bucket).get("KeyCount") == 0
