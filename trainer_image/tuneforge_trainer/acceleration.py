"""Which speed features a run switches on: a pure plan from the job and the machine, with reasons.

``plan_acceleration`` takes the JobSpec, what the machine offers (``Environment``: CUDA, the
GPU's compute capability and memory, which optional kernel packages import) and, when known,
the model's shape and the tokens of one micro-batch, and decides:

- attention: FlashAttention-2 when ``flash_attn`` (>= 2.3.3, transformers' own minimum) imports,
  the GPU is Ampere or newer (sm80+) and the compute dtype is bf16/fp16; otherwise transformers'
  default, which is sdpa (falling back to eager only for models without sdpa);
- Liger kernels (RMSNorm, RoPE, SwiGLU in Triton) when ``liger_kernel`` (> 0.6.4) imports and
  CUDA is present. Liger's fused linear cross-entropy stays off: TRL's SFT and DPO trainers
  refuse it, because they already compute the loss through their own fused, tiled LM head
  (so the full ``tokens x vocab`` logits are never materialised, with or without Liger);
- gradient checkpointing: off when ``estimate_memory`` says weights, trainable state and
  activations fit the GPU with a margin, on otherwise (and always under DeepSpeed, whose
  sharding the estimate does not model);
- torch.compile: only when asked (``TUNEFORGE_TRAINER_COMPILE=1``): compiling costs minutes
  up front, which short jobs never win back.

A CPU job resolves to the trainer's long-standing settings: default attention, no Liger,
no checkpointing, no compile. Nothing here imports torch; ``detect_environment`` (the one
impure function) imports it lazily.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from tuneforge.types import JobSpec, MethodType
from tuneforge_trainer.config_mapping import adapter_kind, compute_dtype, on_cpu

COMPILE_ENV = "TUNEFORGE_TRAINER_COMPILE"
FLASH_ATTENTION_2 = "flash_attention_2"
MIN_FLASH_ATTN = Version("2.3.3")  # transformers refuses older flash_attn builds
# transformers asks for >= 0.3.0, but Liger 0.6.4 and older predate transformers 5 support
# (linkedin/Liger-Kernel#1044; TRL xfails a Liger test for them, huggingface/trl#4898).
MIN_LIGER = Version("0.6.5")
AMPERE = (8, 0)  # FlashAttention-2 needs sm80+
# Liger's layer kernels only: TRL's fused LM head already computes the loss in tiles.
LIGER_KERNEL_CONFIG = {"fused_linear_cross_entropy": False, "cross_entropy": False}

# Memory estimate margins: the estimate is a sum of the big tensors; allocator fragmentation,
# cuBLAS workspaces, 4-bit dequantisation buffers and the CUDA context are in the margins.
SAFETY_FACTOR = 1.3
RESERVED_BYTES = 4 * 2**30
GIB = 2**30


@dataclass(frozen=True)
class Environment:
    """What the machine offers, as facts (``detect_environment`` fills it on a real run)."""

    cuda: bool = False
    compute_capability: tuple[int, int] | None = None
    gpu_memory_bytes: int | None = None  # free memory of GPU 0 when the run starts (it may be shared)
    gpu_name: str | None = None
    flash_attn: str | None = None  # version, when the package imports
    liger_kernel: str | None = None  # version, when the package imports
    compile_requested: bool = False


CPU_ENVIRONMENT = Environment()


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style decoder (what ``config.json`` says)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def kv_width(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def layer_linear_params(self) -> int:
        """Parameters of the attention and MLP projections of all layers (what 4-bit quantizes)."""
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_width  # q, o; k, v
        mlp = 3 * self.hidden * self.intermediate  # gate, up, down
        return self.layers * (attention + mlp)

    @property
    def other_params(self) -> int:
        """Embedding, LM head (unless tied) and norms: never quantized."""
        heads = 1 if self.tied else 2
        return heads * self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden

    @property
    def total_params(self) -> int:
        return self.layer_linear_params + self.other_params

    def lora_params(self, r: int) -> int:
        """LoRA parameters if every linear layer is adapted (an upper bound for narrower targets)."""
        h, kv, i = self.hidden, self.kv_width, self.intermediate
        widths = 2 * (h + h) + 2 * (h + kv) + 3 * (h + i)  # q, o; k, v; gate, up, down (d_in + d_out)
        return self.layers * r * widths

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape | None:
        """From a ``config.json`` dict; None when it is not a dense decoder we can size."""
        config = config.get("text_config") or config
        if any(config.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts")):
            return None  # mixture of experts: the dense formula would be wrong
        try:
            heads = int(config["num_attention_heads"])
            return cls(
                hidden=int(config["hidden_size"]),
                intermediate=int(config["intermediate_size"]),
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                vocab=int(config["vocab_size"]),
                tied=bool(config.get("tie_word_embeddings", False)),
            )
        except (KeyError, TypeError, ValueError):
            return None


def read_model_shape(model_dir: Path) -> ModelShape | None:
    """The shape from ``model_dir/config.json``, or None if it is missing or unreadable."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return ModelShape.from_config(config) if isinstance(config, dict) else None


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one GPU needs to train without gradient checkpointing (see ``estimate_memory``)."""

    weights: int
    trainable_state: int  # trained weights' fp32 copy, gradients and AdamW moments
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.trainable_state + self.activations

    @property
    def with_margin(self) -> int:
        return int(self.total * SAFETY_FACTOR) + RESERVED_BYTES


def estimate_memory(spec: JobSpec, shape: ModelShape, batch_tokens: int) -> MemoryEstimate:
    """Peak training memory with every activation kept, for ``batch_tokens`` tokens per micro-batch.

    Weights: nf4 stores ~0.53 bytes per quantized parameter (4 bits plus double-quantized block
    scales), int8 ~1.06; peft's k-bit preparation upcasts the rest (embedding, LM head, norms)
    to fp32, 4 bytes. Unquantized bases are bf16, 2 bytes.
    Trainable state: LoRA adapters are fp32 with fp32 gradients and two AdamW moments, 16 bytes
    per parameter; full fine-tuning keeps bf16 weights, gradients and moments (torch keeps the
    moments in the parameter's dtype), 8 bytes per parameter, 6 beyond the weights above; full
    DPO adds TRL's frozen reference copy, 2 more (with LoRA the reference is the base itself).
    Activations, per token and layer, in bytes (h hidden, kv key/value width, I MLP width,
    b = 4 when quantized since the upcast embedding makes the residual stream fp32, else 2):
    two RMSNorms keep their fp32 input and their output, 2·(4h + b·h); attention keeps q, k, v,
    rotated q, k and its output in bf16, 6h + 6kv (sdpa and FlashAttention keep no T² scores);
    the SwiGLU MLP keeps gate, up, silu(gate) and their product, 8I; LoRA dropout (when > 0)
    keeps a dropped copy of each adapted input, 5·b·h + 2h + 2I. TRL's fused LM head never holds
    the full logits, so the vocabulary adds no per-token term.
    """
    quantized = spec.quantization in ("nf4", "int8")
    full = adapter_kind(spec) == "full"
    if spec.quantization == "nf4":
        weights = shape.layer_linear_params * 0.53 + shape.other_params * 4
    elif spec.quantization == "int8":
        weights = shape.layer_linear_params * 1.06 + shape.other_params * 4
    else:
        weights = shape.total_params * 2
    if full and spec.method.type == MethodType.dpo:
        weights += shape.total_params * 2  # TRL keeps a frozen bf16 copy as the DPO reference
    trainable = shape.total_params * 6 if full else shape.lora_params(spec.lora.r) * 16

    h, kv, i = shape.hidden, shape.kv_width, shape.intermediate
    b = 4 if quantized else 2
    per_token_layer = 2 * (4 * h + b * h) + 6 * h + 6 * kv + 8 * i
    if not full and spec.lora.dropout > 0:
        per_token_layer += 5 * b * h + 2 * h + 2 * i
    activations = per_token_layer * shape.layers * batch_tokens
    return MemoryEstimate(int(weights), int(trainable), int(activations))


def batch_tokens_for(spec: JobSpec, batch_size: int, max_length: int) -> int:
    """Upper bound on the tokens of one training micro-batch: rows padded (or packed) to
    ``max_length``; DPO and reward models forward chosen and rejected together, twice the rows."""
    pairs = spec.method.type in (MethodType.dpo, MethodType.reward_model)
    return batch_size * max_length * (2 if pairs else 1)


@dataclass(frozen=True)
class AccelerationPlan:
    attn_implementation: str | None  # None: transformers' default (sdpa)
    liger: bool
    gradient_checkpointing: bool
    compile: bool
    reasons: dict[str, str] = field(default_factory=dict)  # decision -> why, for the event
    memory: MemoryEstimate | None = None
    gpu_memory_bytes: int | None = None

    def training_args_kwargs(self) -> dict[str, Any]:
        """Fields of ``TrainingArguments`` (every TRL config); only what differs from off is set."""
        kwargs: dict[str, Any] = {"gradient_checkpointing": self.gradient_checkpointing}
        if self.liger:
            kwargs.update(use_liger_kernel=True, liger_kernel_config=dict(LIGER_KERNEL_CONFIG))
        if self.compile:
            kwargs["torch_compile"] = True
        return kwargs

    def model_init_kwargs(self) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments: the attention implementation, when chosen."""
        return {"attn_implementation": self.attn_implementation} if self.attn_implementation else {}

    def summary(self) -> str:
        """One line for the run's log and events."""
        parts = [self.reasons[k] for k in ("attention", "liger", "gradient_checkpointing", "compile")]
        return "acceleration: " + ", ".join(parts)

    def as_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "attn_implementation": self.attn_implementation or "sdpa",
            "liger": self.liger,
            "gradient_checkpointing": self.gradient_checkpointing,
            "torch_compile": self.compile,
        }
        if self.memory is not None:
            data["estimated_memory_gib"] = round(self.memory.with_margin / GIB, 1)
        if self.gpu_memory_bytes is not None:
            data["gpu_memory_gib"] = round(self.gpu_memory_bytes / GIB, 1)
        return data


def plan_acceleration(
    spec: JobSpec,
    env: Environment,
    *,
    shape: ModelShape | None = None,
    batch_tokens: int | None = None,
    zero_stage: int | None = None,
) -> AccelerationPlan:
    """The speed features this run uses, each with the reason (see the module docstring)."""
    if on_cpu(spec):
        return AccelerationPlan(
            attn_implementation=None,
            liger=False,
            gradient_checkpointing=False,
            compile=False,
            reasons={
                "attention": "sdpa (transformers' default; CPU run)",
                "liger": "liger off (CPU run)",
                "gradient_checkpointing": "gradient checkpointing off (CPU run)",
                "compile": "torch.compile off (CPU run)",
            },
        )
    attention, attention_why = _attention(spec, env)
    liger, liger_why = _liger(env)
    checkpointing, memory, checkpointing_why = _checkpointing(spec, env, shape, batch_tokens, zero_stage)
    compile_on, compile_why = _compile(env)
    return AccelerationPlan(
        attn_implementation=attention,
        liger=liger,
        gradient_checkpointing=checkpointing,
        compile=compile_on,
        reasons={
            "attention": attention_why,
            "liger": liger_why,
            "gradient_checkpointing": checkpointing_why,
            "compile": compile_why,
        },
        memory=memory,
        gpu_memory_bytes=env.gpu_memory_bytes,
    )


def _attention(spec: JobSpec, env: Environment) -> tuple[str | None, str]:
    sdpa = "sdpa (transformers' default)"
    if not env.cuda:
        return None, f"{sdpa}: no CUDA device"
    if env.flash_attn is None:
        return None, f"{sdpa}: flash_attn not installed"
    if not _at_least(env.flash_attn, MIN_FLASH_ATTN):
        return None, f"{sdpa}: flash_attn {env.flash_attn} is older than {MIN_FLASH_ATTN}"
    capability = env.compute_capability or (0, 0)
    sm = f"sm{capability[0]}{capability[1]}"
    if capability < AMPERE:
        return None, f"{sdpa}: {sm} is older than Ampere (sm80)"
    dtype = compute_dtype(spec)
    if dtype not in ("bfloat16", "float16"):
        return None, f"{sdpa}: FlashAttention needs bf16/fp16, this run computes in {dtype}"
    return FLASH_ATTENTION_2, f"{FLASH_ATTENTION_2} (flash_attn {env.flash_attn}, {sm})"


def _liger(env: Environment) -> tuple[bool, str]:
    if not env.cuda:
        return False, "liger off (no CUDA device)"
    if env.liger_kernel is None:
        return False, "liger off (liger_kernel not installed)"
    if not _at_least(env.liger_kernel, MIN_LIGER):
        return False, f"liger off (liger_kernel {env.liger_kernel} is older than {MIN_LIGER})"
    return True, f"liger on (liger_kernel {env.liger_kernel}; loss via TRL's fused LM head)"


def _checkpointing(
    spec: JobSpec,
    env: Environment,
    shape: ModelShape | None,
    batch_tokens: int | None,
    zero_stage: int | None,
) -> tuple[bool, MemoryEstimate | None, str]:
    if zero_stage is not None:
        return True, None, f"gradient checkpointing on (DeepSpeed ZeRO-{zero_stage}: not estimated)"
    if shape is None or batch_tokens is None:
        return True, None, "gradient checkpointing on (model size unknown)"
    if not env.cuda or env.gpu_memory_bytes is None:
        return True, None, "gradient checkpointing on (GPU memory unknown)"
    memory = estimate_memory(spec, shape, batch_tokens)
    needed, have = memory.with_margin / GIB, env.gpu_memory_bytes / GIB
    if memory.with_margin <= env.gpu_memory_bytes:
        return False, memory, f"gradient checkpointing off (est. {needed:.0f} GiB of {have:.0f} GiB)"
    return True, memory, f"gradient checkpointing on (est. {needed:.0f} GiB without it, {have:.0f} GiB GPU)"


def _compile(env: Environment) -> tuple[bool, str]:
    if not env.compile_requested:
        return False, f"torch.compile off (opt-in, {COMPILE_ENV}=1: compile time hurts short jobs)"
    if not env.cuda:
        return False, "torch.compile off (requested, but no CUDA device)"
    return True, f"torch.compile on ({COMPILE_ENV}=1)"


def _at_least(version: str, minimum: Version) -> bool:
    try:
        return Version(version) >= minimum
    except InvalidVersion:
        return False


def compile_requested(environ: dict[str, str] | None = None) -> bool:
    value = (os.environ if environ is None else environ).get(COMPILE_ENV, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def detect_environment() -> Environment:
    """The facts of this process's machine: CUDA device 0 and the optional kernel packages."""
    import torch

    requested = compile_requested()
    if not torch.cuda.is_available():
        return Environment(compile_requested=requested)
    props = torch.cuda.get_device_properties(0)
    free, _total = torch.cuda.mem_get_info(0)  # another trainer may share the GPU (local executor)
    return Environment(
        cuda=True,
        compute_capability=(props.major, props.minor),
        gpu_memory_bytes=int(free),
        gpu_name=props.name,
        flash_attn=_importable_version("flash_attn", "flash-attn"),
        liger_kernel=_importable_version("liger_kernel", "liger-kernel"),
        compile_requested=requested,
    )


def _importable_version(module: str, distribution: str) -> str | None:
    """The distribution's version if its module imports (a build against another torch fails here)."""
    try:
        version = importlib.metadata.version(distribution)
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any failure to import means "not usable"
        return None
    return version
