"""PPO for RLHF, ours (TRL 1.16 has no PPOTrainer): rollouts, KL-shaped rewards, GAE, clipped updates.

One rollout step (InstructGPT §3.5; "The N Implementation Details of RLHF with PPO"):

1. **Generation phase**: ``rollout_batch_size`` prompts, left-padded, sampled from the policy
   with ``temperature`` over the full vocabulary (top_k=0, top_p=1) up to ``max_new_tokens``.
2. **EOS rule**: each answer is truncated after its first EOS (mask); an answer with no EOS
   loses ``missing_eos_penalty`` when set.
3. **Scoring** (no grad): log-probs of the policy and of the reference (temperature-scaled
   logits in both, as in sampling), values, and the reward model's score of the answer
   rendered as the RM saw answers in training (the chat template).
4. **Rewards**: per-token −kl_coef·(log π − log π_ref), plus the score on the last token;
   with ``score_norm`` the score is first standardised by the running mean and std
   of every score so far. With ``kl_target``, kl_coef adapts after each rollout (Ziegler et al.).
5. **GAE** (gamma, lam), returns = advantages + values, advantages whitened over the batch.
6. **Updates**: ``ppo_epochs`` passes over the rollout in shuffled minibatches of
   ``batch_size``: clipped policy loss (policy adapter), clipped value loss × vf_coef (value
   adapter and head), gradients clipped to norm 1, Adam (eps 1e-5).

The arithmetic is in ``ppo_math``; the model roles in ``roles``.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuneforge.types import RlhfHyperparameters
from tuneforge_trainer.config_mapping import learning_rate, resolve_hyperparameters
from tuneforge_trainer.rlhf import ppo_math as pm
from tuneforge_trainer.rlhf.prompts import PromptData
from tuneforge_trainer.rlhf.roles import (
    SharedBase,
    encode_right_padded,
    last_token_scores,
    render_for_reward,
)
from tuneforge_trainer.training import RunContext

MAX_GRAD_NORM = 1.0
ADAM_EPS = 1e-5


@dataclass
class Rollout:
    query: torch.Tensor  # [B, P] left-padded prompt ids
    query_mask: torch.Tensor
    responses: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] 1 up to and including the first EOS
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    stats: dict[str, float]


def encode_prompts(tokenizer: Any, prompts: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids (generation continues from the right end)."""
    ids = []
    for prompt in prompts:
        if isinstance(prompt, list):
            text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            ids.append(tokenizer(prompt)["input_ids"])
    width = max(len(i) for i in ids)
    query = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        query[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return query, mask


def _full(query: torch.Tensor, query_mask: torch.Tensor, responses: torch.Tensor, mask: torch.Tensor) -> dict:
    attention = torch.cat([query_mask, mask], dim=1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)  # left padding: positions count real tokens
    return {
        "input_ids": torch.cat([query, responses], dim=1),
        "attention_mask": attention,
        "position_ids": positions,
    }


def response_logits(
    shared: SharedBase, query, query_mask, responses, mask, temperature: float
) -> torch.Tensor:
    """Logits that predict each response token, divided by the sampling temperature.

    Memory: the vocabulary makes logits the largest tensors of a step. Only the last T + 1
    positions go through the LM head (``logits_to_keep``; the prompt's positions predict
    nothing we score), the division is in place (no second [B, T, vocab] copy; the LM head's
    matmul does not keep its output for backward), and no KV cache is built.
    """
    steps = responses.shape[1]
    out = shared.model(**_full(query, query_mask, responses, mask), logits_to_keep=steps + 1, use_cache=False)
    logits = out.logits[:, :-1].float()
    if temperature != 1.0:
        logits.div_(temperature)
    return logits


def response_values(shared: SharedBase, query, query_mask, responses, mask) -> torch.Tensor:
    hidden = shared.body(**_full(query, query_mask, responses, mask), use_cache=False).last_hidden_state
    p = query.shape[1]
    return shared.value_head(hidden[:, p - 1 : -1].float()).squeeze(-1)


@torch.no_grad()
def collect(
    shared: SharedBase,
    records: list[dict[str, Any]],
    hp: RlhfHyperparameters,
    kl_coef: float | None = None,
    moments: pm.RunningMoments | None = None,
) -> Rollout:
    """One generation phase, scored; ``kl_coef`` defaults to the spec's, ``moments`` (when given)
    normalise the scores."""
    kl_coef = hp.kl_coef if kl_coef is None else kl_coef
    tokenizer = shared.tokenizer
    query, query_mask = encode_prompts(tokenizer, [r["prompt"] for r in records])
    with shared.role("policy"):
        out = shared.model.generate(
            input_ids=query,
            attention_mask=query_mask,
            do_sample=True,
            temperature=hp.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=hp.max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    responses = out[:, query.shape[1] :]
    mask, has_eos = pm.truncate_after_eos(responses, tokenizer.eos_token_id)
    responses = torch.where(mask.bool(), responses, torch.full_like(responses, tokenizer.pad_token_id))
    # Each [B, T, vocab] logits tensor is reduced to per-token numbers and dropped before the next
    # forward pass, so at most one is alive at a time.
    with shared.role("policy"):
        logits = response_logits(shared, query, query_mask, responses, mask, hp.temperature)
    logprobs, token_entropy = pm.logprobs_and_entropy(logits, responses)
    entropy = pm.masked_mean(token_entropy, mask)
    del logits
    with shared.role("reference"):
        ref_logits = response_logits(shared, query, query_mask, responses, mask, hp.temperature)
    ref_logprobs, _ = pm.logprobs_and_entropy(ref_logits, responses)
    del ref_logits
    with shared.role("value"):
        values = response_values(shared, query, query_mask, responses, mask)
    answers = [
        tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(responses, mask, strict=True)
    ]
    texts = [render_for_reward(tokenizer, rec["prompt"], a) for rec, a in zip(records, answers, strict=True)]
    raw_scores = last_token_scores(shared, *encode_right_padded(tokenizer, texts))
    scores = pm.penalize_missing_eos(raw_scores, has_eos, hp.missing_eos_penalty)
    shaped = moments.normalise(scores) if moments is not None else scores
    rewards, kl = pm.kl_shaped_rewards(shaped, logprobs, ref_logprobs, mask.float(), kl_coef)
    advantages, returns = pm.gae(rewards, values, mask.float(), hp.gamma, hp.lam)
    advantages = pm.whiten(advantages, mask.float())
    shared.use("policy")
    stats = {
        "reward_mean": float(scores.mean()),
        "score_mean": float(raw_scores.mean()),
        "kl": float(kl.sum(-1).mean()),
        "non_score_reward": float((-kl_coef * kl).sum(-1).mean()),
        "kl_coef": kl_coef,
        "entropy": float(entropy),
        "response_length": float(mask.sum(-1).float().mean()),
        "eos_fraction": float(has_eos.float().mean()),
    }
    return Rollout(query, query_mask, responses, mask.float(), logprobs, values, advantages, returns, stats)


def update(
    shared: SharedBase,
    optimizer: Any,
    params: list[Any],
    rollout: Rollout,
    hp: RlhfHyperparameters,
    minibatch: int,
    generator: torch.Generator,
) -> dict[str, float]:
    sums: dict[str, float] = {}
    n = 0
    size = rollout.query.shape[0]
    for _ in range(hp.ppo_epochs):
        order = torch.randperm(size, generator=generator)
        for start in range(0, size, minibatch):
            idx = order[start : start + minibatch]
            q, qm, r, m = (
                rollout.query[idx],
                rollout.query_mask[idx],
                rollout.responses[idx],
                rollout.mask[idx],
            )
            optimizer.zero_grad(set_to_none=True)
            # Each role's loss is backpropagated right after its own forward (see roles.SharedBase.use).
            with shared.role("policy"):
                logits = response_logits(shared, q, qm, r, m.long(), hp.temperature)
                logprobs = pm.gather_logprobs(logits, r)
                pg_loss, pg_stats = pm.policy_loss(
                    logprobs, rollout.logprobs[idx], rollout.advantages[idx], m, hp.clip_range
                )
                pg_loss.backward()
            with shared.role("value"):
                values = response_values(shared, q, qm, r, m.long())
                vf_loss, vf_stats = pm.value_loss(
                    values, rollout.values[idx], rollout.returns[idx], m, hp.cliprange_value
                )
                (hp.vf_coef * vf_loss).backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            for key, value in {
                "policy_loss": pg_loss.item(),
                "value_loss": vf_loss.item(),
                **pg_stats,
                **vf_stats,
            }.items():
                sums[key] = sums.get(key, 0.0) + value
            n += 1
    shared.use("policy")
    return {k: v / max(n, 1) for k, v in sums.items()}


def train_ppo(ctx: RunContext, data: PromptData, shared: SharedBase) -> dict[str, Any]:
    """Run PPO over the prompts; save the policy adapter into ``ctx.adapter_dir``; return metrics."""
    spec = ctx.spec
    hp: RlhfHyperparameters = spec.method.rlhf.hyperparameters  # type: ignore[union-attr]
    resolved = resolve_hyperparameters(hp, len(data))
    lr = learning_rate(spec, resolved)
    rollout_size = min(hp.rollout_batch_size, len(data))
    minibatch = max(1, min(resolved.batch_size, rollout_size))
    per_epoch = math.ceil(len(data) / rollout_size)
    total = resolved.n_epochs * per_epoch
    groups = shared.trainable()
    params = groups["policy"] + groups["value"]
    optimizer = torch.optim.Adam(params, lr=lr, eps=ADAM_EPS)
    control = Control(hp.kl_coef, pm.RunningMoments() if hp.score_norm else None)
    start_step = _resume(ctx, shared, optimizer, control)
    generator = torch.Generator().manual_seed(spec.seed)
    print(
        f"[tuneforge-trainer] training: PPO on {len(data)} prompts, {total} rollouts of {rollout_size}, "
        f"ppo_epochs={hp.ppo_epochs} minibatch={minibatch} lr={lr:g} kl_coef={hp.kl_coef:g}",
        flush=True,
    )
    if ctx.resume is not None and ctx.reporter is not None:
        ctx.reporter.message(f"resumed from step {start_step} (attempt {spec.attempt})")
    history: list[dict[str, Any]] = []
    began = time.monotonic()
    tokens = 0
    for step in range(start_step + 1, total + 1):
        epoch, index = divmod(step - 1, per_epoch)
        order = list(range(len(data)))
        random.Random(spec.seed + epoch).shuffle(order)
        batch = [data.records[i] for i in order[index * rollout_size : (index + 1) * rollout_size]]
        torch.manual_seed(spec.seed * 100_003 + step)  # a resumed run samples what the first would have
        generator.manual_seed(spec.seed * 100_003 + step)
        rollout = collect(shared, batch, hp, control.kl_coef, control.moments)
        losses = update(shared, optimizer, params, rollout, hp, minibatch, generator)
        if hp.kl_target is not None:
            control.kl_coef = pm.adaptive_kl_coef(
                control.kl_coef, rollout.stats["kl"], hp.kl_target, len(batch), hp.kl_horizon
            )
        tokens += int(rollout.mask.sum()) + int(rollout.query_mask.sum())
        stats = {"step": step, "total_steps": total, **rollout.stats, **losses}
        stats["train_loss"] = losses["policy_loss"] + hp.vf_coef * losses["value_loss"]
        history.append(stats)
        _report(ctx, stats, began, step - start_step)
        # Every checkpoint_every rollouts (the last one is the published adapter); no epoch-end extra.
        every = hp.checkpoint_every
        if ctx.storage is not None and every and step % every == 0 and step < total:
            _checkpoint(ctx, shared, optimizer, step, stats, control)
    save_policy(shared, ctx.adapter_dir, base_model=spec.base_model)
    last = history[-1] if history else {}
    return {
        "first_loss": history[0]["train_loss"] if history else None,
        "final_loss": last.get("train_loss"),
        "trained_tokens": tokens,
        "steps": total,
        "train_runtime": time.monotonic() - began,
        "n_epochs": resolved.n_epochs,
        "batch_size": minibatch,
        "learning_rate": lr,
        "algorithm": "ppo",
        "first_reward_mean": history[0]["reward_mean"] if history else None,
        **{k: v for k, v in last.items() if k not in ("step", "total_steps")},
    }


def _report(ctx: RunContext, stats: dict[str, Any], began: float, done: int) -> None:
    step, total = stats["step"], stats["total_steps"]
    elapsed = time.monotonic() - began
    stats["eta_seconds"] = round(elapsed / done * (total - step), 1)
    line = (
        f"step {step}/{total}: reward={stats['reward_mean']:.3f} kl={stats['kl']:.3f} "
        f"entropy={stats['entropy']:.2f} clip_frac={stats['clip_frac']:.3f} "
        f"value_loss={stats['value_loss']:.4f} len={stats['response_length']:.1f}"
    )
    print(line, flush=True)
    if ctx.reporter is not None:
        ctx.reporter.metrics(f"step {step}/{total}: reward={stats['reward_mean']:.2f}", stats)


def save_policy(shared: SharedBase, adapter_dir: Path, *, base_model: str) -> None:
    """The policy adapter alone, as a plain peft adapter folder (loads with PeftModel.from_pretrained)."""
    tmp = adapter_dir.parent / (adapter_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shared.model.save_pretrained(str(tmp), selected_adapters=["policy"])
    source = tmp / "policy" if (tmp / "policy").is_dir() else tmp
    shutil.rmtree(adapter_dir, ignore_errors=True)
    adapter_dir.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(source / name, adapter_dir / name)
    shutil.rmtree(tmp, ignore_errors=True)
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(base_model_name_or_path=base_model, inference_mode=True)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shared.tokenizer.save_pretrained(str(adapter_dir))


@dataclass
class Control:
    """What PPO carries from one rollout to the next besides weights: the (adaptive) KL
    coefficient and the score moments. Checkpoints save it, so a resumed run continues alike."""

    kl_coef: float
    moments: pm.RunningMoments | None

    def state(self) -> dict[str, Any]:
        return {"kl_coef": self.kl_coef, "score_moments": self.moments.state() if self.moments else None}

    def load(self, state: dict[str, Any]) -> None:
        self.kl_coef = float(state.get("kl_coef", self.kl_coef))
        if self.moments is not None and state.get("score_moments"):
            self.moments = pm.RunningMoments(**state["score_moments"])


def _checkpoint(
    ctx: RunContext,
    shared: SharedBase,
    optimizer: Any,
    step: int,
    stats: dict[str, Any],
    control: Control,
) -> None:
    """Policy adapter at the top (from_checkpoint reads ``adapter_*``), value adapter + head, optimizer."""
    from safetensors.torch import save_file

    from tuneforge_trainer.checkpoint_store import upload_checkpoint

    folder = ctx.output_dir / f"checkpoint-{step}"
    shutil.rmtree(folder, ignore_errors=True)
    save_policy(shared, folder, base_model=ctx.spec.base_model)
    value = {n: p.detach().contiguous() for n, p in shared.model.named_parameters() if ".value." in n}
    save_file(value, folder / "value_adapter.safetensors")
    save_file(
        {k: v.contiguous() for k, v in shared.value_head.state_dict().items()},
        folder / "value_head.safetensors",
    )
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    (folder / "ppo_state.json").write_text(json.dumps({"step": step, **control.state()}))
    assert ctx.storage is not None
    metrics = {k: v for k, v in stats.items() if isinstance(v, int | float)}
    upload_checkpoint(ctx.storage, ctx.spec, folder, step=step, metrics=metrics)
    shutil.rmtree(folder, ignore_errors=True)
    print(f"[tuneforge-trainer] checkpoint step {step} uploaded", flush=True)
    if ctx.reporter is not None:
        ctx.reporter.metrics(f"checkpoint saved at step {step}", {"checkpoint": {"step": step}, "step": step})


def _resume(ctx: RunContext, shared: SharedBase, optimizer: Any, control: Control) -> int:
    """Load a PPO checkpoint of this job (a retried attempt); the step to continue after, or 0."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if ctx.resume is None or not (ctx.resume.dir / "ppo_state.json").is_file():
        return 0
    folder = ctx.resume.dir
    set_peft_model_state_dict(
        shared.model, load_file(folder / "adapter_model.safetensors"), adapter_name="policy"
    )
    value = load_file(folder / "value_adapter.safetensors")
    named = dict(shared.model.named_parameters())
    with torch.no_grad():
        for name, tensor in value.items():
            named[name].copy_(tensor)
    shared.value_head.load_state_dict(load_file(folder / "value_head.safetensors"))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    state = json.loads((folder / "ppo_state.json").read_text())
    control.load(state)
    return int(state["step"])
