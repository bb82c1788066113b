"""ORM tables. Rows become SDK models in ``store/``, never deeper in the code.

Each table has an integer ``seq`` primary key for stable newest-first cursors, and a
public string ``id``. Every tenant row carries ``project_id``.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
SeqType = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    pass


class ProjectRow(Base):
    __tablename__ = "projects"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)


class FileRow(Base):
    __tablename__ = "files"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))
    status_details: Mapped[str | None] = mapped_column(Text, nullable=True)
    n_examples: Mapped[int] = mapped_column(Integer, default=0)
    data_format: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # The validation report returned on the file object: format, counts, first problems, stats.
    validation: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Per-example sizes (validation.report.SizeProfile), to rescale token stats for another
    # tokenizer in a dry run; loaded only when asked for.
    size_profile: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True, deferred=True)

    __table_args__ = (
        Index("ix_files_project_seq", "project_id", "seq"),
        Index("ix_files_status", "status"),
    )


class JobRow(Base):
    __tablename__ = "jobs"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    estimated_finish: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    model: Mapped[str] = mapped_column(String(256))
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512), nullable=True)
    status: Mapped[str] = mapped_column(String(32))
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    method: Mapped[dict[str, Any]] = mapped_column(JSON)
    lora: Mapped[dict[str, Any]] = mapped_column(JSON)
    quantization: Mapped[str | None] = mapped_column(String(16), nullable=True)
    resources: Mapped[dict[str, Any]] = mapped_column(JSON)
    seed: Mapped[int] = mapped_column(BigInteger)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    metadata_: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    token_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Storage prefix of the checkpoint whose adapter starts this job (from_checkpoint).
    init_adapter_key: Mapped[str | None] = mapped_column(String(512), nullable=True)

    __table_args__ = (
        Index("ix_jobs_project_seq", "project_id", "seq"),
        Index("ix_jobs_status", "status"),
    )


class JobEventRow(Base):
    __tablename__ = "job_events"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    created_at: Mapped[int] = mapped_column(BigInteger)
    level: Mapped[str] = mapped_column(String(8))
    type: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)

    __table_args__ = (Index("ix_job_events_job_seq", "job_id", "seq"),)


class IdempotencyRow(Base):
    """The response to a POST, kept per project and key so that a retry gets it again."""

    __tablename__ = "idempotency_keys"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    response: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)

    __table_args__ = (UniqueConstraint("project_id", "key", name="uq_idempotency_project_key"),)


class WebhookRow(Base):
    """A project's endpoint for job events. The signing secret must be kept readable to sign
    with (it cannot be hashed like an API key); it is returned once, at creation."""

    __tablename__ = "webhooks"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    secret: Mapped[str] = mapped_column(String(128))
    events: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[int] = mapped_column(BigInteger)


class WebhookDeliveryRow(Base):
    """One event for one endpoint: written in the transaction that finishes the job (an
    outbox), then sent and retried by the scheduler until delivered or given up."""

    __tablename__ = "webhook_deliveries"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    webhook_id: Mapped[str] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"), index=True)
    project_id: Mapped[str] = mapped_column(String(64))
    event_type: Mapped[str] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    next_attempt_at: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger)
    delivered_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)

    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)


class FeedbackSessionRow(Base):
    """A human-feedback session: a sample job generates K answers per prompt, labelers rank them."""

    __tablename__ = "feedback_sessions"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    status: Mapped[str] = mapped_column(String(16))  # generating | ready | failed | cancelled
    model: Mapped[str] = mapped_column(String(256))
    prompts_file: Mapped[str] = mapped_column(String(64))
    k: Mapped[int] = mapped_column(Integer)
    labels_per_item: Mapped[int] = mapped_column(Integer)
    sampling: Mapped[dict[str, Any]] = mapped_column(JSON)
    job_id: Mapped[str] = mapped_column(String(64), index=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_feedback_sessions_project_seq", "project_id", "seq"),)


class FeedbackItemRow(Base):
    """One prompt of a session, as chat messages; written once, when the samples are ingested."""

    __tablename__ = "feedback_items"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("feedback_sessions.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    # The prompt as in the prompts file: a string, or a list of messages.
    prompt: Mapped[Any] = mapped_column(JSON)

    __table_args__ = (UniqueConstraint("session_id", "index", name="uq_feedback_items_session_index"),)


class FeedbackAnswerRow(Base):
    __tablename__ = "feedback_answers"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    item_id: Mapped[str] = mapped_column(ForeignKey("feedback_items.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)  # order of generation
    text: Mapped[str] = mapped_column(Text)

    __table_args__ = (UniqueConstraint("item_id", "index", name="uq_feedback_answers_item_index"),)


class FeedbackLabelRow(Base):
    """One labeler on one item: opened (an assignment), then labelled or skipped; upserted."""

    __tablename__ = "feedback_labels"
    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("feedback_sessions.id", ondelete="CASCADE"))
    item_id: Mapped[str] = mapped_column(ForeignKey("feedback_items.id", ondelete="CASCADE"))
    labeler: Mapped[str] = mapped_column(String(64))  # the API key's id
    state: Mapped[str] = mapped_column(String(16))  # open | labelled | skipped
    ranking: Mapped[list[list[str]] | None] = mapped_column(JSON, nullable=True)
    unsafe: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    note: Mapped[str] = mapped_column(Text, default="")
    opened_at: Mapped[int] = mapped_column(BigInteger)
    updated_at: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        UniqueConstraint("item_id", "labeler", name="uq_feedback_labels_item_labeler"),
        Index("ix_feedback_labels_session_labeler", "session_id", "labeler"),
    )
