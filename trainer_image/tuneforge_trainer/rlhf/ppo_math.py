"""The arithmetic of PPO for language models, on plain tensors (unit-tested by hand).

Shapes: ``[batch, T]`` over response tokens; ``mask`` is 1 on the tokens of each answer
(up to and including its first EOS) and 0 after. References:

- InstructGPT (Ouyang et al. 2022), eq. 2: reward = r_θ(x, y) − β·log(π(y|x) / π_ref(y|x)).
- "The N Implementation Details of RLHF with PPO" (Huang et al. 2023), the details of
  OpenAI's lm-human-preferences: per-token KL penalty with the score on the last token,
  GAE, advantage whitening (shift mean), clipped surrogate, clipped value loss with the 0.5
  factor, approx-KL ``0.5·mean((log π − log π_old)²)``, truncation after the stop token.
"""

from __future__ import annotations

from typing import Any

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of the masked entries (Bessel's correction, as lm-human-preferences)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1) if n > 1 else var


def whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True) -> torch.Tensor:
    """Normalise to unit variance over the masked entries; keep the mean when ``shift_mean`` is False."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def truncate_after_eos(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, has_eos)``: mask keeps each answer up to and including its first EOS."""
    is_eos = responses == eos_id
    seen_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()  # EOS strictly before t
    mask = (seen_before == 0).long()
    return mask, is_eos.any(dim=-1)


def penalize_missing_eos(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """lm-human-preferences' ``penalty_reward_value``: an answer cut off at max length loses ``penalty``."""
    if penalty is None:
        return scores
    return torch.where(has_eos, scores, scores - penalty)


def kl_shaped_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rewards, kl)``: per token −β·(log π − log π_ref), plus the score at each answer's last token."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(dim=-1) - 1).clamp(min=0).long()
    rewards[torch.arange(rewards.shape[0]), last] += scores
    return rewards, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation; ``(advantages, returns)`` with returns = advantages + values.

    δ_t = r_t + γ·V_{t+1} − V_t and A_t = δ_t + γλ·A_{t+1}; past the end of an answer V and r are 0.
    """
    values = values * mask
    rewards = rewards * mask
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The clipped surrogate: mean of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = π/π_old."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clip_frac": float(masked_mean((clipped > unclipped).float(), mask)),
            "approx_kl": float(0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """0.5·mean(max((V − R)², (V_clip − R)²)), V_clip = V_old + clip(V − V_old, −ε_v, ε_v)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_loss, clipped_loss), mask)
    with torch.no_grad():
        stats = {"value_clip_frac": float(masked_mean((clipped_loss > unclipped_loss).float(), mask))}
    return loss, stats


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] as logit[token] − logsumexp(logits): no [.., vocab] log-softmax
    tensor is made, and autograd keeps only ``logits`` for the backward pass."""
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log-probs of tokens, entropy per position)`` without gradients, one row at a time: the
    [T, vocab] temporaries of one answer instead of [B, T, vocab] ones (the vocabulary dominates).
    The log-probs are computed as ``gather_logprobs`` does (logit − logsumexp), bit for bit, so
    the first update's probability ratio is exactly 1."""
    logprobs = torch.empty(tokens.shape, dtype=logits.dtype, device=logits.device)
    entropy = torch.empty(tokens.shape, dtype=logits.dtype, device=logits.device)
    for row in range(logits.shape[0]):
        logp = logits[row] - torch.logsumexp(logits[row], dim=-1, keepdim=True)
        logprobs[row] = logp.gather(-1, tokens[row].unsqueeze(-1)).squeeze(-1)
        entropy[row] = -(logp.exp() * logp).sum(dim=-1)
    return logprobs, entropy


class RunningMoments:
    """Running mean and variance of every score seen so far (Chan et al.'s parallel update), for
    reward normalisation: scores go into GAE as ``(s − mean) / std``, so the value function and
    the KL penalty see one scale whatever the reward model's, and a drifting mean does not
    masquerade as advantage. The state is three floats, saved in PPO checkpoints."""

    def __init__(self, count: float = 0.0, mean: float = 0.0, var: float = 1.0) -> None:
        self.count, self.mean, self.var = count, mean, var

    def update(self, x: torch.Tensor) -> None:
        n = float(x.numel())
        batch_mean = float(x.mean())
        batch_var = float(x.var(unbiased=False)) if n > 1 else 0.0
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.count, self.mean, self.var = total, self.mean + delta * n / total, m2 / total

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """Update with ``x``, then return it standardised by the moments so far."""
        self.update(x)
        return (x - self.mean) / (self.var**0.5 + 1e-8)

    def state(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "var": self.var}


def adaptive_kl_coef(coef: float, kl: float, target: float, n_steps: int, horizon: int) -> float:
    """Ziegler et al. (2019), §2.2: β ← β·(1 + K_β·e), e = clip(KL/target − 1, −0.2, 0.2), K_β = n/horizon.

    ``kl`` is this batch's mean KL per answer and ``n_steps`` the answers in it; the clip keeps one
    batch from moving β by more than 20%·n/horizon.
    """
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * n_steps / horizon)
