"""Public types: the shared vocabulary of the SDK, the API, the scheduler and the trainer.

Request bodies forbid unknown fields (mass assignment, typos); response models
allow them so that an older SDK keeps working against a newer server.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Auto = Literal["auto"]
TINY_MODEL_ID = "tuneforge/tiny-llama"  # the built-in base model, built locally on first use
T = TypeVar("T")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class JobStatus(str, Enum):
    """OpenAI's job states; finer detail (cancelling, attempts, resume) goes into events."""

    validating_files = "validating_files"
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    def is_finished(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled)


class MethodType(str, Enum):
    supervised = "supervised"
    dpo = "dpo"
    reward_model = "reward_model"
    rlhf = "rlhf"
    # Internal: a feedback session's generation job (K answers per prompt); not a training
    # method, so POST /v1/fine_tuning/jobs refuses it.
    sample = "sample"


class Hyperparameters(_Request):
    """Training hyperparameters; "auto" is resolved from the dataset size, as OpenAI does."""

    n_epochs: int | Auto = Field("auto", description="Passes over the training file.")
    batch_size: int | Auto = Field("auto", description="Examples per optimizer step.")
    learning_rate_multiplier: float | Auto = Field(
        "auto", description="Multiplier on the method's base learning rate."
    )
    beta: float | Auto | None = Field(None, description="DPO temperature (dpo only).")
    # Tuneforge extensions (OpenAI has no such fields); None means the default.
    eval_every: int | None = Field(
        None, ge=1, description="Evaluate on the validation file every N steps (default: each epoch end)."
    )
    checkpoint_every: int | None = Field(
        None, ge=1, description="Save a resumable checkpoint every N steps (default: each epoch end)."
    )
    # Supervised only (as Axolotl names them); None means the default.
    train_on_inputs: bool | None = Field(
        None, description="Loss on every token, prompts included (default false: answers only; supervised)."
    )
    packing: bool | None = Field(
        None, description="Pack several examples into each max_seq_length row (default false; supervised)."
    )
    max_seq_length: int | None = Field(
        None,
        ge=16,
        le=131_072,
        description="Longest sequence in tokens; longer examples are truncated and reported (supervised; "
        "default: 1024 or the model's context, if shorter).",
    )

    @field_validator("n_epochs")
    @classmethod
    def _epochs_in_range(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 50:
            raise ValueError("n_epochs must be between 1 and 50")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch_in_range(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 256:
            raise ValueError("batch_size must be between 1 and 256")
        return v

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _lr_positive(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and not 0 < v <= 100:
            raise ValueError("learning_rate_multiplier must be in (0, 100]")
        return v

    @field_validator("beta")
    @classmethod
    def _beta_positive(cls, v: float | str | None) -> float | str | None:
        if isinstance(v, float | int) and not 0 < v <= 10:
            raise ValueError("beta must be in (0, 10]")
        return v


class MethodParams(_Request):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    adapter: Literal["lora", "full"] | None = Field(
        None, description="Train a LoRA adapter (default), or every weight of the model (full fine-tuning)."
    )


class RlhfHyperparameters(Hyperparameters):
    """PPO / GRPO / RLOO knobs; every field has a default that works on the tiny model."""

    kl_coef: float = Field(0.05, ge=0, le=10, description="Per-token KL penalty against the reference.")
    clip_range: float = Field(0.2, gt=0, le=1, description="PPO policy ratio clip.")
    vf_coef: float = Field(0.1, ge=0, le=10, description="Value loss weight (PPO).")
    cliprange_value: float = Field(0.2, gt=0, le=10, description="Value clip (PPO).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount (PPO).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (PPO).")
    rollout_batch_size: int = Field(8, ge=1, le=4096, description="Prompts per generation phase.")
    ppo_epochs: int = Field(2, ge=1, le=16, description="Optimisation passes over each rollout batch.")
    num_generations: int = Field(4, ge=2, le=64, description="Answers per prompt (GRPO, RLOO).")
    max_new_tokens: int = Field(24, ge=1, le=4096, description="Longest generated answer.")
    temperature: float = Field(1.0, gt=0, le=5, description="Sampling temperature for rollouts.")
    missing_eos_penalty: float | None = Field(
        None, description="Subtracted from the reward of an answer that does not end with EOS."
    )
    # Off by default: on the tiny model it helped one seed of three and hurt two (bench/RESULTS.md).
    score_norm: bool = Field(
        False, description="Normalise reward-model scores by their running mean and std (PPO)."
    )
    kl_target: float | None = Field(
        None,
        gt=0,
        le=100,
        description="Adaptive KL (Ziegler et al. 2019): steer kl_coef so the KL per answer nears this (PPO).",
    )
    kl_horizon: int = Field(10_000, ge=1, description="Adaptive KL horizon in answers (PPO).")


class RewardFunction(_Request):
    """A built-in, declarative reward (no user code runs in the trainer)."""

    type: Literal["exact_match", "contains", "json_valid", "length"]
    field: str = Field("answer", max_length=64, description="Prompt-record field holding the reference.")
    target_length: int | None = Field(None, ge=1, description="For 'length': the ideal length in tokens.")


class RlhfParams(_Request):
    algorithm: Literal["ppo", "grpo", "rloo"] = "ppo"
    reward_model: str | None = Field(
        None, max_length=64, description="A succeeded reward_model job on the same base."
    )
    reward_function: RewardFunction | None = Field(
        None, description="GRPO / RLOO only, instead of a reward model."
    )
    hyperparameters: RlhfHyperparameters = Field(default_factory=RlhfHyperparameters)

    @model_validator(mode="after")
    def _one_reward(self) -> RlhfParams:
        if (self.reward_model is None) == (self.reward_function is None):
            raise ValueError("give exactly one of reward_model and reward_function")
        if self.reward_function is not None and self.algorithm == "ppo":
            raise ValueError("ppo needs a reward_model; reward_function works with grpo and rloo")
        return self


class SampleParams(MethodParams):
    """A sample job (feedback sessions): ``k`` answers per prompt of the prompts file, seeded by
    the job's ``seed``. The inherited hyperparameters are unused."""

    k: int = Field(ge=2, le=9, description="Answers per prompt.")
    temperature: float = Field(1.0, gt=0, le=5, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Longest answer, in tokens.")


class Method(_Request):
    """OpenAI's method object: ``{"type": "supervised", "supervised": {"hyperparameters": ...}}``."""

    type: MethodType
    supervised: MethodParams | None = None
    dpo: MethodParams | None = None
    reward_model: MethodParams | None = None
    rlhf: RlhfParams | None = None
    sample: SampleParams | None = None

    @model_validator(mode="after")
    def _only_own_params(self) -> Method:
        for other in MethodType:
            if other != self.type and getattr(self, other.value) is not None:
                raise ValueError(f"method.{other.value} given but method.type is {self.type.value}")
        return self

    @property
    def params(self) -> MethodParams:
        return getattr(self, self.type.value) or MethodParams()

    def with_hyperparameters(self, hp: Hyperparameters) -> Method:
        """This method with ``hp``'s common fields set, keeping the rest of its parameters
        (an rlhf job's algorithm, reward model and RL knobs)."""
        params = self.params
        common = hp.model_dump(include=set(Hyperparameters.model_fields), exclude_unset=True)
        merged = params.hyperparameters.model_copy(update=common)
        return Method.model_validate(
            {"type": self.type, self.type.value: params.model_copy(update={"hyperparameters": merged})}
        )


class LoraConfigSpec(_Request):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(32, ge=1, le=4096, description="LoRA scaling numerator.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or every linear layer."
    )


class Resources(_Request):
    gpus: int = Field(0, ge=0, le=64, description="GPUs per node; 0 trains on the CPU.")
    nodes: int = Field(1, ge=1, le=64, description="Nodes; above 1 needs the kubernetes executor.")
    max_duration_s: int | None = Field(
        None, ge=60, description="Stop the attempt after this long (it can only lower the operator's limit)."
    )
    zero_stage: Literal[2, 3] | None = Field(
        None, description="DeepSpeed ZeRO stage of a multi-GPU run (default 2; 3 also shards the weights)."
    )


class JobCreate(_Request):
    """Body of ``POST /v1/fine_tuning/jobs``."""

    model: str = Field(min_length=1, max_length=256)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    method: Method | None = None
    # Deprecated by OpenAI in favour of method.*.hyperparameters, still accepted.
    hyperparameters: Hyperparameters | None = None
    suffix: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_.-]*$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = None
    lora: LoraConfigSpec = Field(default_factory=LoraConfigSpec)
    quantization: Literal["nf4", "int8"] | None = None
    resources: Resources = Field(default_factory=Resources)
    from_checkpoint: str | None = Field(
        None, max_length=128, description="Start from this checkpoint's adapter (an id from /checkpoints)."
    )

    @field_validator("metadata")
    @classmethod
    def _metadata_bounded(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and (len(v) > 16 or any(len(k) > 64 or len(x) > 512 for k, x in v.items())):
            raise ValueError("metadata allows 16 keys of at most 64 chars, values of at most 512")
        return v

    def resolved_method(self) -> Method:
        """The method object, with top-level hyperparameters folded in."""
        method = self.method or Method(type=MethodType.supervised)
        if self.hyperparameters is not None:
            if self.method is not None and self.method.params.hyperparameters != Hyperparameters():
                raise ValueError("give hyperparameters either at top level or in method, not both")
            method = method.with_hyperparameters(self.hyperparameters)
        return method


class ErrorInfo(_Response):
    code: str
    message: str
    param: str | None = None


class Job(_Response):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None = None
    model: str
    fine_tuned_model: str | None = None
    organization_id: str
    status: JobStatus
    training_file: str
    validation_file: str | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    method: dict[str, Any] = Field(default_factory=dict)
    result_files: list[str] = Field(default_factory=list)
    trained_tokens: int | None = None
    error: ErrorInfo | None = None
    seed: int | None = None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] = Field(default_factory=list)
    metadata: dict[str, str] | None = None
    user_provided_suffix: str | None = None
    lora: dict[str, Any] | None = None
    quantization: str | None = None
    resources: dict[str, Any] | None = None


class Checkpoint(_Response):
    """OpenAI's checkpoint object; ``id`` can be passed as ``from_checkpoint`` to a new job."""

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any] = Field(default_factory=dict)


class Event(_Response):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"] = "info"
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None


class FileProblem(_Response):
    """One problem in a dataset: its 1-based line (None for the whole file) and a stable code."""

    line: int | None = None
    code: str
    message: str
    excerpt: str = Field("", description="At most 80 characters of the offending value.")


class FileValidation(_Response):
    """What validation found in a file (a Tuneforge extension of OpenAI's file object)."""

    format: str | None = Field(None, description="chat, prompt_completion, preference, rankings or prompts.")
    n_examples: int = 0
    n_problems: int = Field(0, description="Every problem found; `problems` holds the first 100.")
    problem_counts: dict[str, int] = Field(default_factory=dict, description="Every problem, by code.")
    problems: list[FileProblem] = Field(default_factory=list)
    stats: dict[str, Any] = Field(
        default_factory=dict,
        description="Token statistics: tokens_per_example {min, mean, p95, max}, total_tokens, "
        "trained_tokens, max_seq_length, n_over_max_seq_length, tokenizer, estimated, method.",
    )


class FileObject(_Response):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    validation: FileValidation | None = Field(
        None, description="Tuneforge extension: the validation report, once the file is validated."
    )


class DryRunFile(_Response):
    """A file of a dry run: its report, and token statistics for the job's model."""

    id: str
    status: Literal["uploaded", "processed", "error"]
    validation: FileValidation | None = None
    model_stats: dict[str, Any] | None = Field(
        None, description="Token statistics with the job's model's tokenizer (see FileValidation.stats)."
    )


class TimeEstimate(_Response):
    seconds: float | None = None
    tokens_per_second: float | None = None
    hardware: str
    size_class: str
    measured: bool = Field(description="False when the throughput table has only a placeholder.")
    note: str


class JobValidation(_Response):
    """Answer of ``POST /v1/fine_tuning/jobs/validate``: what creating the job would do. Creates nothing."""

    object: Literal["fine_tuning.job.validation"] = "fine_tuning.job.validation"
    model: str
    method: MethodType
    ready: bool = Field(description="Every file is processed: a job would start without waiting.")
    training_file: DryRunFile
    validation_file: DryRunFile | None = None
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    estimated_trained_tokens: int | None = Field(
        None,
        description="What the job will report as trained_tokens: n_epochs x the file's tokens (every "
        "non-padding token, prompt included, as OpenAI bills them). The answer tokens that carry "
        "the loss are training_file.model_stats.trained_tokens, per epoch.",
    )
    estimate: TimeEstimate | None = None


class Model(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class Project(_Response):
    id: str
    object: Literal["project"] = "project"
    name: str
    created_at: int


class ApiKey(_Response):
    id: str
    object: Literal["api_key"] = "api_key"
    project_id: str
    name: str
    role: Literal["admin", "member", "labeler"]
    created_at: int
    key: str | None = Field(None, description="The secret; returned once, at creation.")


class Page(_Response, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class EventCreate(_Request):
    """What the trainer posts about its own job."""

    level: Literal["info", "warn", "error"] = "info"
    message: str = Field(max_length=4000)
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None


class JobSpec(_Request):
    """The contract between API, scheduler and trainer, handed to the trainer as JSON.

    Secrets (the job token, storage credentials) travel in the environment, never here.
    """

    job_id: str
    project_id: str
    attempt: int = Field(ge=1)
    base_model: str
    base_model_path: str | None = Field(
        None, description="Local folder in HF format; None for the built-in tiny model."
    )
    method: Method
    lora: LoraConfigSpec
    quantization: Literal["nf4", "int8"] | None = None
    resources: Resources = Field(default_factory=Resources)
    seed: int = 42
    training_file_key: str
    validation_file_key: str | None = None
    storage_uri: str
    api_base_url: str
    resume_from_key: str | None = Field(
        None, description="Storage prefix of a complete checkpoint of this job to resume (a retried attempt)."
    )
    init_adapter_key: str | None = Field(
        None,
        description="Storage prefix of a checkpoint whose adapter weights start this job (from_checkpoint).",
    )
    reward_model_key: str | None = Field(
        None,
        description="Storage prefix of the reward_model job's adapter bundle (rlhf with a reward model).",
    )
    samples_prefix: str | None = Field(
        None,
        description="Storage prefix where a sample job publishes samples.jsonl, then manifest.json.",
    )


# -- Feedback sessions: sample K answers, rank them, export rankings ------------------------


class SamplingParams(_Request):
    temperature: float = Field(1.0, gt=0, le=5, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Longest answer, in tokens.")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="None: one is drawn and echoed.")


class FeedbackSessionCreate(_Request):
    """Body of ``POST /v1/feedback/sessions``."""

    model: str = Field(min_length=1, max_length=256, description="A base model or an ft: model.")
    prompts_file: str = Field(min_length=1, max_length=64, description="A file of rlhf prompts.")
    k: int = Field(ge=2, le=9, description="Answers per prompt.")
    labels_per_item: int = Field(1, ge=1, le=100, description="Distinct labelers per item.")
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    resources: Resources = Field(default_factory=Resources)


class FeedbackProgress(_Response):
    prompts_total: int = 0
    prompts_generated: int = 0
    items_total: int = 0
    labels_needed: int = 0
    labels_done: int = 0


class FeedbackAgreement(_Response):
    mean_kendall_tau: float | None = Field(None, description="Mean over items of the mean pairwise tau-b.")
    items_with_multiple_labels: int = 0


class LabelerStats(_Response):
    labeler: str = Field(description="The labeling key's id.")
    name: str | None = None
    labels: int = 0
    skips: int = 0


class FeedbackSession(_Response):
    id: str
    object: Literal["feedback.session"] = "feedback.session"
    status: Literal["generating", "ready", "failed", "cancelled"]
    model: str
    prompts_file: str
    k: int
    labels_per_item: int
    sampling: SamplingParams
    job_id: str
    error: ErrorInfo | None = None
    progress: FeedbackProgress = Field(default_factory=FeedbackProgress)
    agreement: FeedbackAgreement = Field(default_factory=FeedbackAgreement)
    labelers: list[LabelerStats] = Field(default_factory=list)
    created_at: int


class LabelerKeyCreate(_Request):
    name: str = Field(min_length=1, max_length=128)


class LabelerKey(_Response):
    id: str
    name: str
    key: str | None = Field(None, description="The secret; returned once, at creation.")
    role: Literal["labeler"] = "labeler"
    created_at: int


class FeedbackMessage(_Response):
    role: str
    content: str


class FeedbackAnswer(_Response):
    id: str
    text: str


class FeedbackLabel(_Response):
    item_id: str
    labeler: str
    ranking: list[list[str]] = Field(default_factory=list)
    skipped: bool = False
    unsafe: list[str] = Field(default_factory=list)
    note: str = ""
    updated_at: int


class FeedbackItem(_Response):
    id: str
    index: int
    messages: list[FeedbackMessage]
    answers: list[FeedbackAnswer]
    label: FeedbackLabel | None = None


class LabelerProgress(_Response):
    done_by_me: int = 0
    remaining_for_me: int = 0
    items_total: int = 0


class NextItem(_Response):
    item: FeedbackItem | None = None
    progress: LabelerProgress = Field(default_factory=LabelerProgress)


class LabelCreate(_Request):
    """A labeler's ranking of one item: groups of answer ids, best first (a group of several is a tie)."""

    ranking: list[list[str]] = Field(default_factory=list, max_length=9)
    skipped: bool = False
    unsafe: list[str] = Field(default_factory=list, max_length=9)
    note: str = Field("", max_length=2000)


class FeedbackExport(_Request):
    min_labels: int = Field(1, ge=1, le=100, description="Export items with at least this many labels.")


class SampleRecord(_Request):
    """One line of a sample job's ``samples.jsonl``: a prompt and its K answers."""

    index: int = Field(ge=0, description="0-based line of the prompt in the prompts file.")
    prompt: str | list[dict[str, Any]]
    answers: list[str]


class Webhook(_Response):
    """A project's endpoint for job events. ``secret`` (for checking signatures) is returned
    once, by ``create``; lists leave it out."""

    id: str
    object: str = "webhook_endpoint"
    url: str
    events: list[str]
    created_at: int
    secret: str | None = None


class WebhookDelivery(_Response):
    """One event sent (or being retried) to a webhook."""

    id: str
    object: str = "webhook_delivery"
    event_type: str
    status: str
    attempts: int
    last_status_code: int | None = None
    last_error: str | None = None
    created_at: int
    delivered_at: int | None = None
    data: dict[str, Any] = Field(default_factory=dict)
