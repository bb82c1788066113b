"""One base model in memory, four roles on it (the point of the design is memory).

- **policy**: a LoRA adapter named ``"policy"`` (fresh, or the starting SFT job's adapter);
- **value**: a second LoRA adapter ``"value"`` plus ``value_head``, a ``Linear(hidden, 1)`` on
  the last hidden state. Both start from the reward model (lm-human-preferences initialises the
  value function from the reward model): the RM's LoRA weights, loaded trainable, and its score
  head copied;
- **reference**: the base with every adapter disabled (``disable_adapter()``); when the policy
  starts from an SFT adapter, the reference is a frozen copy of that adapter (``"reference"``),
  because the KL penalty must hold the policy near where it started (InstructGPT's SFT model);
- **reward**: the reward_model job's adapter, loaded frozen as ``"reward"``, and its score head.

How the reward model's score head gets here: a reward_model job saves a peft ``SEQ_CLS``
adapter whose ``score`` Linear travels in ``modules_to_save`` (key ``base_model.model.score.weight``
in ``adapter_model.safetensors``). The shared base is a causal LM, which has no ``score``
module for peft to put those weights into. ``split_reward_adapter`` therefore writes a copy
of the adapter with only its LoRA weights and ``task_type: CAUSAL_LM`` (loaded with
``load_adapter(..., adapter_name="reward")``), and returns the score weights, which go into a
separate ``Linear`` applied to the last hidden state at the last token, exactly what
``LlamaForSequenceClassification`` does (a test checks the two agree).

``use(role)`` switches with ``set_adapter``. peft's ``set_adapter`` also flips
``requires_grad`` (active adapter on, others off), so ``use`` restores it: policy and value
weights stay trainable, reward and reference weights stay frozen. Each role's loss is
backpropagated right after its own forward pass, so the flip never meets a live graph.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.storage import Storage
from tuneforge.types import JobSpec
from tuneforge_trainer.checkpoint_store import CheckpointError, download_checkpoint
from tuneforge_trainer.config_mapping import lora_config_kwargs, model_init_kwargs
from tuneforge_trainer.errors import ConfigError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PARAM = "method.rlhf.reward_model"


def download_reward_model(spec: JobSpec, storage: Storage, dest: Path) -> Path:
    """Fetch the RM job's adapter bundle (checked against its manifest) and check it fits this job."""
    if not spec.reward_model_key:
        raise ConfigError(
            "reward_model_not_found", "the job names a reward model but no reward_model_key", PARAM
        )
    try:
        manifest = download_checkpoint(storage, spec.reward_model_key, dest)
    except CheckpointError as exc:
        raise ConfigError(
            "reward_model_not_found", f"the reward model's files are unusable: {exc}", PARAM
        ) from None
    check_reward_model(spec, dest, manifest)
    return dest


def check_reward_model(spec: JobSpec, rm_dir: Path, manifest: dict[str, Any]) -> None:
    if manifest.get("method") != "reward_model":
        raise ConfigError(
            "invalid_reward_model", f"job {manifest.get('job_id')} is a {manifest.get('method')} job", PARAM
        )
    if manifest.get("base_model") != spec.base_model:
        raise ConfigError(
            "reward_model_base_mismatch",
            f"the reward model was trained on {manifest.get('base_model')!r}, this job's base is "
            f"{spec.base_model!r}: both must share one base model",
            PARAM,
        )
    for name in ("adapter_config.json", ADAPTER_WEIGHTS):
        if not (rm_dir / name).is_file():
            raise ConfigError("reward_model_not_found", f"the reward model has no {name}", PARAM)


def split_reward_adapter(rm_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Write the RM's LoRA weights as a causal-LM adapter into ``out_dir``; return its score head state."""
    from safetensors.torch import load_file, save_file

    config = json.loads((rm_dir / "adapter_config.json").read_text())
    weights = load_file(rm_dir / ADAPTER_WEIGHTS)
    head = {k.rsplit(".", 1)[1]: v for k, v in weights.items() if k.rsplit(".", 2)[-2] == "score"}
    if "weight" not in head:
        raise ConfigError("invalid_reward_model", "the reward model's adapter has no score head", PARAM)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in weights.items() if ".score." not in k}, out_dir / ADAPTER_WEIGHTS
    )
    config.update(task_type="CAUSAL_LM", modules_to_save=None, inference_mode=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(config))
    return head


def linear_from(head: dict[str, Any], hidden_size: int) -> Any:
    import torch

    layer = torch.nn.Linear(hidden_size, 1, bias="bias" in head)
    with torch.no_grad():
        layer.weight.copy_(head["weight"].float().reshape(1, hidden_size))
        if "bias" in head:
            layer.bias.copy_(head["bias"].float().reshape(1))
    return layer


@dataclass
class SharedBase:
    """The peft model with its adapters, the two heads, and the tokenizer."""

    model: Any  # PeftModel
    value_head: Any
    score_head: Any
    tokenizer: Any
    has_reference_adapter: bool = False

    @property
    def body(self) -> Any:
        """The decoder stack without the LM head (LoRA layers are inside it): last hidden states."""
        return self.model.get_base_model().model

    def trainable(self) -> dict[str, list[Any]]:
        return {
            "policy": [p for n, p in self.model.named_parameters() if ".policy." in n],
            "value": [p for n, p in self.model.named_parameters() if ".value." in n]
            + list(self.value_head.parameters()),
        }

    def use(self, role: str) -> None:
        """Activate ``role``'s adapter; restore which weights train (see the module doc)."""
        if role in ("policy", "value", "reward"):
            self.model.set_adapter(role)
        elif role == "reference" and self.has_reference_adapter:
            self.model.set_adapter("reference")
        for name, param in self.model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(".policy." in name or ".value." in name)

    @contextmanager
    def role(self, role: str) -> Iterator[None]:
        """``use(role)``; the reference without its own adapter runs inside ``disable_adapter()``."""
        self.use(role)
        plain = role == "reference" and not self.has_reference_adapter
        with self.model.disable_adapter() if plain else nullcontext():
            yield


def load_shared_base(
    spec: JobSpec,
    base_model_dir: Path,
    tokenizer: Any,
    rm_dir: Path,
    work_dir: Path,
    *,
    init_adapter_dir: Path | None = None,
    quantization: Any = None,
) -> SharedBase:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, set_seed

    set_seed(spec.seed)
    kwargs = dict(model_init_kwargs(spec))
    kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    base = AutoModelForCausalLM.from_pretrained(base_model_dir, **kwargs)
    base.config.pad_token_id = tokenizer.pad_token_id
    if quantization is not None:
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    if init_adapter_dir is not None:
        model = PeftModel.from_pretrained(base, init_adapter_dir, adapter_name="policy", is_trainable=True)
        model.load_adapter(str(init_adapter_dir), adapter_name="reference", is_trainable=False)
    else:
        lora = lora_config_kwargs(spec)
        lora["lora_dropout"] = 0.0  # no dropout in RL: rollout and update log-probs must agree
        model = get_peft_model(base, LoraConfig(**lora), adapter_name="policy")
    reward_dir = work_dir / "reward_lora"
    head = split_reward_adapter(rm_dir, reward_dir)
    model.load_adapter(str(reward_dir), adapter_name="reward", is_trainable=False)
    model.load_adapter(str(reward_dir), adapter_name="value", is_trainable=True)
    hidden = base.config.hidden_size
    shared = SharedBase(
        model=model,
        value_head=linear_from(head, hidden),
        score_head=linear_from(head, hidden).requires_grad_(False),
        tokenizer=tokenizer,
        has_reference_adapter=init_adapter_dir is not None,
    )
    model.eval()  # no dropout anywhere (N implementation details: "disable dropout")
    shared.use("policy")
    return shared


def last_token_scores(shared: SharedBase, input_ids: Any, attention_mask: Any) -> Any:
    """Reward-model scores of right-padded sequences: the score head at each one's last real token."""
    import torch

    with torch.no_grad(), shared.role("reward"):
        hidden = shared.body(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
    last = attention_mask.sum(-1) - 1
    picked = hidden[torch.arange(hidden.shape[0]), last]
    return shared.score_head(picked.float()).squeeze(-1)


def render_for_reward(tokenizer: Any, prompt: Any, answer: str) -> str:
    """The text the reward model saw in training: the chat with the answer as the assistant turn."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(
            [*prompt, {"role": "assistant", "content": answer}], tokenize=False
        )
    return prompt + answer + (tokenizer.eos_token or "")


def encode_right_padded(tokenizer: Any, texts: list[str]) -> tuple[Any, Any]:
    import torch

    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(i) for i in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return input_ids, mask


class RewardModelScorer:
    """The RM job's model as a TRL reward function (GRPO / RLOO): ``f(prompts, completions) -> scores``.

    TRL's trainers own their policy model, so here the reward model is its own sequence
    classifier: the base plus the RM adapter with its score head, as the RM job trained it.
    """

    __name__ = "reward_model"

    def __init__(self, spec: JobSpec, base_model_dir: Path, rm_dir: Path, tokenizer: Any) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        kwargs = dict(model_init_kwargs(spec))
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
        base = AutoModelForSequenceClassification.from_pretrained(base_model_dir, num_labels=1, **kwargs)
        base.config.pad_token_id = tokenizer.pad_token_id
        self.model = PeftModel.from_pretrained(base, rm_dir).eval()
        self.tokenizer = tokenizer

    def __call__(self, prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        import torch

        from tuneforge_trainer.rlhf.rewards import text_of

        texts = [
            render_for_reward(self.tokenizer, p, text_of(c))
            for p, c in zip(prompts, completions, strict=True)
        ]
        input_ids, mask = encode_right_padded(self.tokenizer, texts)
        device = next(self.model.parameters()).device
        with torch.no_grad():
            logits = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        return [float(x) for x in logits[:, 0]]


def copy_tokenizer_files(tokenizer: Any, dest: Path) -> None:
    tokenizer.save_pretrained(str(dest))
    for name in ("README.md",):
        (dest / name).unlink(missing_ok=True)


def remove_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
