"""API settings: environment variables with the ``TUNEFORGE_`` prefix."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRETS = {"changeme", "secret", "password", "tuneforge", ""}


def default_home() -> Path:
    return Path.home() / ".tuneforge"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_", extra="ignore")

    environment: str = Field(
        "development", description="development or production; production refuses weak secrets."
    )
    home: Path = Field(default_factory=default_home, description="State folder for the embedded defaults.")
    database_url: str | None = Field(
        None, description="SQLAlchemy async URL; default is a SQLite file in home."
    )
    storage_uri: str | None = Field(
        None, description="file:///dir or s3://bucket/prefix; default is home/storage."
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for the arq queue.")
    queue_name: str | None = Field(
        None,
        description="arq queue name; the default is derived from home, so services never share a queue.",
    )
    public_url: str = Field(
        "http://127.0.0.1:8000", description="How trainers reach this API to report events."
    )
    models_dir: Path | None = Field(
        None, description="Folder of local base models, one HF-format folder each."
    )
    api_key: SecretStr | None = Field(
        None, description="Admin key of the default project, set on first start."
    )
    max_upload_bytes: int = Field(512 * 1024 * 1024, description="Largest accepted upload.", gt=0)
    max_attempts: int = Field(3, description="Trainer attempts per job before it fails.", ge=1, le=20)
    executor: Literal["local", "kubernetes"] = Field(
        "local", description="Where trainers run; the API needs it to accept multi-node jobs."
    )
    presign: bool = Field(
        False,
        description="On s3:// storage, let clients download adapters by short-lived presigned URLs "
        "(GET .../adapter/urls); off: adapters stream through the API.",
    )
    presign_ttl_s: int = Field(300, description="Lifetime of a presigned URL, in seconds.", ge=1, le=3600)
    webhooks_allow_private: bool = Field(
        False, description="Let webhooks call loopback and private addresses (off: SSRF protection)."
    )
    # Resource limits (docs/security.md). 0 turns a limit off.
    rate_limit_per_s: float = Field(
        100.0, description="Sustained requests per second per project (token bucket); 0: off.", ge=0
    )
    rate_limit_burst: int = Field(1000, description="Requests a project may send at once.", ge=1)
    max_active_jobs: int = Field(
        100, description="Jobs per project not yet finished (validating, queued, running); 0: off.", ge=0
    )
    max_storage_bytes: int = Field(
        100 * 1024**3, description="Bytes of uploaded files a project may hold; 0: off.", ge=0
    )
    body_idle_timeout_s: float = Field(
        30.0, description="Longest wait for the next chunk of a request body.", gt=0
    )
    body_min_bytes_per_s: int = Field(
        1024, description="Slowest average body rate accepted once the idle timeout has passed.", ge=1
    )

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Settings:
        if self.environment == "production" and self.api_key is not None:
            if self.api_key.get_secret_value().lower() in PLACEHOLDER_SECRETS:
                raise ValueError("TUNEFORGE_API_KEY is a placeholder; set a real secret in production")
        return self

    @property
    def resolved_queue_name(self) -> str:
        if self.queue_name:
            return self.queue_name
        digest = hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:12]
        return f"tuneforge:{digest}"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.home / 'tuneforge.db'}"

    @property
    def resolved_storage_uri(self) -> str:
        return self.storage_uri or (self.home / "storage").resolve().as_uri()


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def load_settings(cls: type[SettingsT], **overrides: Any) -> SettingsT:
    """``cls(**overrides)`` for a process that starts: bad settings exit with one line per
    problem, each naming its variable. pydantic's own error would print the inputs, and with
    them any secret among the settings (a key, a database URL's password)."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise SystemExit(describe_settings_error(exc, cls.model_config.get("env_prefix") or "")) from None


def describe_settings_error(exc: ValidationError, prefix: str) -> str:
    lines = []
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        message = error["msg"].removeprefix("Value error, ")
        where = "__".join(str(part) for part in error["loc"]).upper()
        lines.append(f"  {prefix}{where}: {message}" if where else f"  {message}")
    return "Tuneforge cannot start, its settings are invalid:\n" + "\n".join(lines)
