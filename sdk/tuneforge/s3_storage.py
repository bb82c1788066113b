"""S3-compatible storage (AWS, MinIO, Ceph RGW), selected by ``s3://bucket/prefix``.

Endpoint, region and credentials come from the usual AWS environment and config files
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...). Objects appear atomically: a single PUT
or a completed multipart upload; a failed multipart upload is aborted, so no parts linger.
Missing keys raise ``FileNotFoundError``, as the file backend does.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from tuneforge.storage import check_key

PART_SIZE = 8 * 1024 * 1024  # S3's minimum part is 5 MiB; memory use is one part
_MISSING = {"404", "NoSuchKey", "NotFound"}


def _client() -> Any:
    # Some S3-compatible stores reject boto3's default request checksums.
    checksum = os.environ.get("TUNEFORGE_S3_CHECKSUM", "when_supported")
    config = Config(
        request_checksum_calculation=checksum,
        response_checksum_validation=checksum,
        retries={"max_attempts": 5, "mode": "standard"},
        signature_version="s3v4",  # else presigned URLs may use SigV2, which newer AWS regions refuse
    )
    return boto3.client("s3", config=config)


class S3Storage:
    def __init__(
        self, bucket: str, prefix: str = "", *, client: Any = None, part_size: int = PART_SIZE
    ) -> None:
        if not bucket:
            raise ValueError("s3:// URI needs a bucket: s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.uri = f"s3://{bucket}/{self.prefix}"
        self.part_size = part_size
        self._s3 = client or _client()

    def _key(self, key: str) -> str:
        return self.prefix + check_key(key)

    def put_file(self, key: str, path: Path) -> None:
        with open(path, "rb") as fh:
            self.put_fileobj(key, fh)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def put_fileobj(self, key: str, fh: BinaryIO) -> None:
        """Stream in parts of ``part_size``: one part in memory at a time, whatever the size."""
        first = fh.read(self.part_size)
        if len(first) < self.part_size:
            self.put_bytes(key, first)
            return
        full_key = self._key(key)
        upload_id = self._s3.create_multipart_upload(Bucket=self.bucket, Key=full_key)["UploadId"]
        try:
            parts, number, chunk = [], 1, first
            while chunk:
                part = self._s3.upload_part(
                    Bucket=self.bucket, Key=full_key, UploadId=upload_id, PartNumber=number, Body=chunk
                )
                parts.append({"PartNumber": number, "ETag": part["ETag"]})
                number += 1
                chunk = fh.read(self.part_size)
            self._s3.complete_multipart_upload(
                Bucket=self.bucket, Key=full_key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            self._s3.abort_multipart_upload(Bucket=self.bucket, Key=full_key, UploadId=upload_id)
            raise

    def open_spool(self) -> BinaryIO:
        """A local temp file for an object being received; removed when closed."""
        return tempfile.TemporaryFile()  # type: ignore[return-value]

    def put_spool(self, key: str, spool: BinaryIO) -> None:
        spool.seek(0)
        self.put_fileobj(key, spool)

    def get_file(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.open_read(key) as body, open(path, "wb") as out:
            while chunk := body.read(1 << 20):
                out.write(chunk)

    def get_bytes(self, key: str) -> bytes:
        with self.open_read(key) as body:
            return body.read()

    def open_read(self, key: str) -> BinaryIO:
        try:
            return self._s3.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as exc:
            raise _not_found(exc, key) from exc

    def exists(self, key: str) -> bool:
        try:
            self._s3.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if _is_missing(exc):
                return False
            raise

    def size(self, key: str) -> int:
        try:
            return int(self._s3.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except ClientError as exc:
            raise _not_found(exc, key) from exc

    def list(self, prefix: str) -> list[str]:
        keys = []
        paginator = self._s3.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
            keys += [obj["Key"][len(self.prefix) :] for obj in page.get("Contents", [])]
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._s3.delete_object(Bucket=self.bucket, Key=self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        keys = self.list(prefix)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self.prefix + k} for k in keys[start : start + 1000]]
            self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def presigned_get(self, key: str, expires_s: int = 3600) -> str:
        return self._s3.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires_s
        )


def _is_missing(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code")) in _MISSING


def _not_found(exc: ClientError, key: str) -> Exception:
    return FileNotFoundError(f"no object {key!r}") if _is_missing(exc) else exc
