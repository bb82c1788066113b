"""Publish the trained adapter (or, for full fine-tuning, the whole model folder) to storage, manifest last.

An adapter without a manifest does not exist (DESIGN.md, storage layout): readers look for
``adapter/manifest.json``, and it is written only after every file it lists is in place.
A retried attempt first clears whatever an earlier attempt left half-uploaded.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from tuneforge.storage import MANIFEST, Storage, adapter_prefix, put_dir
from tuneforge.types import JobSpec
from tuneforge_trainer.config_mapping import adapter_kind

MANIFEST_VERSION = 1


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_sha256(folder: Path) -> str:
    """Hash of tokenizer.json plus the chat template: what decides how text becomes tokens."""
    digest = hashlib.sha256((folder / "tokenizer.json").read_bytes())
    digest.update(b"\0")
    digest.update(_chat_template(folder).encode("utf-8"))
    return digest.hexdigest()


def _chat_template(folder: Path) -> str:
    # transformers 5 writes chat_template.jinja; older versions keep it in tokenizer_config.json.
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text("utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text("utf-8")).get("chat_template")
        return template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return ""


def manifest_header(spec: JobSpec) -> dict[str, Any]:
    """The fields every published manifest (adapter or samples) starts with."""
    return {
        "manifest_version": MANIFEST_VERSION,
        "job_id": spec.job_id,
        "project_id": spec.project_id,
        "attempt": spec.attempt,
        "created_at": int(time.time()),
        "method": spec.method.type.value,
        "base_model": spec.base_model,
    }


def build_manifest(spec: JobSpec, adapter_dir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    files = {
        p.relative_to(adapter_dir).as_posix(): sha256_file(p)
        for p in sorted(adapter_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    return {
        **manifest_header(spec),
        "quantization": spec.quantization,
        "adapter": adapter_kind(spec),  # "full": a model folder (config.json, model.safetensors)
        "lora": spec.lora.model_dump(mode="json") if adapter_kind(spec) == "lora" else None,
        "tokenizer_sha256": tokenizer_sha256(adapter_dir),
        "files": files,
        "metrics": metrics,
    }


def publish_adapter(
    storage: Storage, spec: JobSpec, adapter_dir: Path, metrics: dict[str, Any]
) -> dict[str, Any]:
    """Upload ``adapter_dir`` under the job's adapter prefix, then the manifest; returns the manifest."""
    prefix = adapter_prefix(spec.project_id, spec.job_id)
    manifest = build_manifest(spec, adapter_dir, metrics)
    storage.delete_prefix(prefix)
    put_dir(storage, adapter_dir, prefix, skip={MANIFEST})
    storage.put_bytes(prefix + MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))
    return manifest
