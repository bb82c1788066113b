"""Adapter archives are unpacked only when every file matches its manifest's sha256."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from tuneforge import AdapterIntegrityError
from tuneforge._shared import unpack_verified


def make_archive(path: Path, files: dict[str, bytes], manifest: dict | None) -> Path:
    with tarfile.open(path, "w") as tar:
        entries = dict(files)
        if manifest is not None:
            entries["manifest.json"] = json.dumps(manifest).encode()
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_good_archive_unpacks(tmp_path: Path) -> None:
    files = {"adapter_model.safetensors": b"weights", "adapter_config.json": b"{}"}
    archive = make_archive(tmp_path / "a.tar", files, {"files": {k: sha(v) for k, v in files.items()}})
    out = unpack_verified(archive, tmp_path / "out")
    assert (out / "adapter_model.safetensors").read_bytes() == b"weights" and (
        out / "manifest.json"
    ).is_file()


@pytest.mark.parametrize("case", ["tampered", "missing_file", "no_manifest"])
def test_bad_archive_leaves_nothing(tmp_path: Path, case: str) -> None:
    files = {"adapter_model.safetensors": b"weights"}
    digests = {"adapter_model.safetensors": sha(b"other weights" if case == "tampered" else b"weights")}
    if case == "missing_file":
        digests["adapter_config.json"] = sha(b"{}")
    archive = make_archive(tmp_path / "a.tar", files, None if case == "no_manifest" else {"files": digests})
    with pytest.raises(AdapterIntegrityError):
        unpack_verified(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a.tar"]  # no staging folder left


def test_path_traversal_in_archive_is_refused(tmp_path: Path) -> None:
    archive = make_archive(tmp_path / "a.tar", {"../escape.txt": b"x"}, {"files": {}})
    with pytest.raises(tarfile.TarError):
        unpack_verified(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()
