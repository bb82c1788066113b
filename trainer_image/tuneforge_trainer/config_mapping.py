"""JobSpec -> keyword arguments for peft, TRL and bitsandbytes: pure functions, no torch.

Everything here returns plain dicts (dtypes as strings), so the mapping is testable without
torch, and the trainer builds the library objects from them in one line each. DeepSpeed's
config lives in ``deepspeed_mapping`` (same rules).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from tuneforge.types import Hyperparameters, JobSpec, MethodType
from tuneforge_trainer.tiny_model import TINY_MODEL_ID

if TYPE_CHECKING:  # acceleration imports this module
    from tuneforge_trainer.acceleration import AccelerationPlan

DataFormat = Literal["messages", "prompt_completion"]
AdapterKind = Literal["lora", "full"]

# Methods this trainer runs; anything else is a non-retriable "unsupported_method".
SUPPORTED_METHODS = frozenset(MethodType)

# Base learning rates for LoRA, per method (the usual starting points of TRL's examples).
LORA_BASE_LR = {
    MethodType.supervised: 2e-4,
    MethodType.reward_model: 1e-4,
    MethodType.dpo: 5e-5,
    MethodType.rlhf: 1e-5,
}
# Full fine-tuning moves every weight: rates 10-100x below LoRA's (TRL's full-model examples).
FULL_BASE_LR = {
    MethodType.supervised: 2e-5,
    MethodType.reward_model: 1e-5,
    MethodType.dpo: 5e-7,
}
# A random tiny model barely moves at LoRA rates in a few dozen steps; 1e-2 makes tests and the demo visible.
TINY_MODEL_BASE_LR = 1e-2
TINY_MODEL_FULL_LR = 1e-3
DEFAULT_N_EPOCHS = 3
MAX_AUTO_BATCH_SIZE = 8
DEFAULT_MAX_LENGTH = 1024
DEFAULT_DPO_BETA = 0.1


@dataclass(frozen=True)
class ResolvedHyperparameters:
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


def resolve_hyperparameters(hp: Hyperparameters, n_examples: int) -> ResolvedHyperparameters:
    """Replace any "auto" left in the spec (the API should have resolved them; be defensive)."""
    n_epochs = DEFAULT_N_EPOCHS if hp.n_epochs == "auto" else int(hp.n_epochs)
    if hp.batch_size == "auto":
        batch_size = max(1, min(MAX_AUTO_BATCH_SIZE, n_examples // 8))
    else:
        batch_size = int(hp.batch_size)
    multiplier = 1.0 if hp.learning_rate_multiplier == "auto" else float(hp.learning_rate_multiplier)
    return ResolvedHyperparameters(n_epochs, batch_size, multiplier)


def adapter_kind(spec: JobSpec) -> AdapterKind:
    """``method.<type>.adapter``: "lora" (the default) or "full" (rlhf always trains adapters)."""
    return getattr(spec.method.params, "adapter", None) or "lora"


def base_learning_rate(spec: JobSpec) -> float:
    full = adapter_kind(spec) == "full"
    if spec.base_model == TINY_MODEL_ID:
        return TINY_MODEL_FULL_LR if full else TINY_MODEL_BASE_LR
    if full:
        return FULL_BASE_LR.get(spec.method.type, FULL_BASE_LR[MethodType.supervised])
    return LORA_BASE_LR.get(spec.method.type, LORA_BASE_LR[MethodType.supervised])


def learning_rate(spec: JobSpec, hp: ResolvedHyperparameters) -> float:
    return base_learning_rate(spec) * hp.learning_rate_multiplier


def dpo_beta(spec: JobSpec) -> float:
    beta = spec.method.params.hyperparameters.beta
    return DEFAULT_DPO_BETA if beta is None or beta == "auto" else float(beta)


def on_cpu(spec: JobSpec) -> bool:
    return spec.resources.gpus == 0


def compute_dtype(spec: JobSpec) -> str:
    # CPUs have no fast bf16 matmul path worth the precision loss; GPUs train in bf16.
    return "float32" if on_cpu(spec) else "bfloat16"


def lora_config_kwargs(spec: JobSpec) -> dict[str, Any]:
    """Arguments for ``peft.LoraConfig``.

    A reward model is a sequence classifier: task type SEQ_CLS makes peft train and save the
    new, randomly initialised ``score`` head with the adapter (``modules_to_save``).
    """
    lora = spec.lora
    target = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    task_type = "SEQ_CLS" if spec.method.type == MethodType.reward_model else "CAUSAL_LM"
    return {
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": target,
        "bias": "none",
        "task_type": task_type,
    }


def quantization_config_kwargs(spec: JobSpec, *, zero_stage: int | None = None) -> dict[str, Any] | None:
    """Arguments for ``transformers.BitsAndBytesConfig``, or None for an unquantized base.

    Under ZeRO-3 the 4-bit weights are sharded like any other parameter, which needs them
    stored in the compute dtype (``bnb_4bit_quant_storage``) rather than uint8.
    """
    if spec.quantization == "nf4":
        # QLoRA as in the paper: 4-bit NormalFloat, double quantization, bf16 compute (fp32 on CPU).
        kwargs: dict[str, Any] = {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": compute_dtype(spec),
        }
        if zero_stage == 3:
            kwargs["bnb_4bit_quant_storage"] = compute_dtype(spec)
        return kwargs
    if spec.quantization == "int8":
        return {"load_in_8bit": True}
    return None


def model_init_kwargs(
    spec: JobSpec, *, distributed: bool = False, acceleration: AccelerationPlan | None = None
) -> dict[str, Any]:
    """Arguments for ``from_pretrained`` of the base model (TRL's ``model_init_kwargs``); the
    acceleration plan adds the attention implementation it chose."""
    kwargs: dict[str, Any] = {"dtype": compute_dtype(spec)}
    if on_cpu(spec) and not distributed:  # accelerate/DeepSpeed place the model when distributed
        kwargs["device_map"] = "cpu"
    if acceleration is not None:
        kwargs.update(acceleration.model_init_kwargs())
    return kwargs


def schedule_kwargs(spec: JobSpec, *, has_eval: bool) -> dict[str, Any]:
    """When to evaluate and checkpoint: every N steps if the spec says so, else each epoch end.

    ``checkpoint_every`` also saves at each epoch end (``EpochEndCheckpoint`` callback), and
    the Trainer always evaluates and saves at the last step, so "at the end" is covered.
    """
    hp = spec.method.params.hyperparameters
    kwargs: dict[str, Any] = {}
    if hp.checkpoint_every:
        kwargs.update(save_strategy="steps", save_steps=hp.checkpoint_every)
    else:
        kwargs["save_strategy"] = "epoch"
    if not has_eval:
        kwargs["eval_strategy"] = "no"
    elif hp.eval_every:
        kwargs.update(eval_strategy="steps", eval_steps=hp.eval_every)
    else:
        kwargs["eval_strategy"] = "epoch"
    return kwargs


def training_args_kwargs(
    spec: JobSpec,
    hp: ResolvedHyperparameters,
    *,
    output_dir: str,
    has_eval: bool = False,
    deepspeed: dict[str, Any] | None = None,
    distributed: bool = False,
    acceleration: AccelerationPlan | None = None,
) -> dict[str, Any]:
    """What every method's TRL config shares (they all extend ``transformers.TrainingArguments``).

    ``acceleration`` (``acceleration.plan_acceleration``) sets attention, Liger, checkpointing and
    compile; without one, GPU runs checkpoint and use the libraries' defaults, as before.
    """
    cpu = on_cpu(spec)
    kwargs: dict[str, Any] = {
        "output_dir": output_dir,
        "num_train_epochs": hp.n_epochs,
        "per_device_train_batch_size": hp.batch_size,
        "per_device_eval_batch_size": hp.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": learning_rate(spec, hp),
        "seed": spec.seed,
        "data_seed": spec.seed,
        "logging_steps": 1,
        "save_total_limit": 1,  # each checkpoint is uploaded as soon as it is written; keep disk flat
        "prediction_loss_only": True,  # eval metrics come from the loss and the trainers' own logs
        "report_to": "none",
        "disable_tqdm": True,  # stdout is the run's log file; progress goes through our callback
        "include_num_input_tokens_seen": "non_padding",
        "dataloader_num_workers": 0,
        # TRL defaults bf16=True (even with use_cpu) and turns gradient checkpointing on: decide explicitly.
        "use_cpu": cpu,
        "bf16": not cpu,
        "fp16": False,
        "gradient_checkpointing": not cpu,
        "model_init_kwargs": model_init_kwargs(spec, distributed=distributed, acceleration=acceleration),
        **schedule_kwargs(spec, has_eval=has_eval),
    }
    if acceleration is not None:
        kwargs.update(acceleration.training_args_kwargs())
    if deepspeed is not None:
        kwargs["deepspeed"] = deepspeed
        zero3 = (deepspeed.get("zero_optimization") or {}).get("stage") == 3
        if zero3 and not cpu and kwargs["gradient_checkpointing"]:
            # peft + ZeRO-3 needs reentrant checkpointing (TRL forces it too; say it here, visibly).
            kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": True}
    if distributed and cpu:
        kwargs["ddp_backend"] = "gloo"  # NCCL needs GPUs
    return kwargs


@dataclass(frozen=True)
class SFTOptions:
    train_on_inputs: bool
    packing: bool
    max_seq_length: int | None  # None: the model's default (``modeling.max_length_for``)


def sft_options(spec: JobSpec) -> SFTOptions:
    hp = spec.method.params.hyperparameters
    return SFTOptions(bool(hp.train_on_inputs), bool(hp.packing), hp.max_seq_length)


def sft_config_kwargs(
    spec: JobSpec,
    hp: ResolvedHyperparameters,
    *,
    output_dir: str,
    data_format: DataFormat,
    max_length: int = DEFAULT_MAX_LENGTH,
    **common: Any,
) -> dict[str, Any]:
    """Arguments for ``trl.SFTConfig``.

    By default loss covers only what the model must produce: assistant turns for chat data
    (``assistant_only_loss``), the completion for prompt/completion data; ``train_on_inputs``
    puts it on every token. ``packing`` packs examples best-fit-decreasing into rows of
    ``max_length`` tokens without splitting any (TRL's "bfd"), which makes TRL's collator
    padding-free: one row per batch, sequence boundaries in ``position_ids``. FlashAttention
    reads them as varlen boundaries; transformers' sdpa and eager attention (CPU) build a
    block-diagonal causal mask from them, so packed examples never see each other either way.
    """
    options = sft_options(spec)
    kwargs = training_args_kwargs(spec, hp, output_dir=output_dir, **common)
    kwargs.update(
        max_length=max_length,
        assistant_only_loss=data_format == "messages" and not options.train_on_inputs,
        completion_only_loss=not options.train_on_inputs if data_format == "prompt_completion" else None,
        packing=options.packing,
    )
    if options.packing:
        kwargs.update(packing_strategy="bfd", padding_free=True)
    return kwargs


def reward_config_kwargs(
    spec: JobSpec,
    hp: ResolvedHyperparameters,
    *,
    output_dir: str,
    max_length: int = DEFAULT_MAX_LENGTH,
    **common: Any,
) -> dict[str, Any]:
    """Arguments for ``trl.RewardConfig`` (pairwise Bradley-Terry loss on a scalar head)."""
    kwargs = training_args_kwargs(spec, hp, output_dir=output_dir, **common)
    # TRL drops pairs longer than max_length instead of truncating them; see reward_model.py.
    kwargs["max_length"] = max_length
    return kwargs


def dpo_config_kwargs(
    spec: JobSpec,
    hp: ResolvedHyperparameters,
    *,
    output_dir: str,
    max_length: int = DEFAULT_MAX_LENGTH,
    **common: Any,
) -> dict[str, Any]:
    """Arguments for ``trl.DPOConfig``.

    The reference model is the base with the adapter disabled (the trainer gets no
    ``ref_model`` and a peft model), so it costs no second copy of the weights.
    """
    kwargs = training_args_kwargs(spec, hp, output_dir=output_dir, **common)
    kwargs.update(max_length=max_length, beta=dpo_beta(spec))
    return kwargs
