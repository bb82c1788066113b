"""PPO arithmetic on hand-computed tensors, the built-in rewards, and the prompts file checks."""

from __future__ import annotations

import pytest
import torch

from tuneforge.types import RewardFunction
from tuneforge_trainer.data import DataError
from tuneforge_trainer.errors import ConfigError
from tuneforge_trainer.rlhf import ppo_math as pm
from tuneforge_trainer.rlhf.prompts import parse_prompt_lines
from tuneforge_trainer.rlhf.rewards import build_reward_function, check_references

T = torch.tensor


def test_eos_truncation_keeps_the_first_eos_and_flags_missing_ones() -> None:
    mask, has_eos = pm.truncate_after_eos(T([[5, 2, 7, 2], [5, 6, 7, 8]]), eos_id=2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert has_eos.tolist() == [True, False]
    assert pm.penalize_missing_eos(T([1.0, 1.0]), has_eos, 0.5).tolist() == [1.0, 0.5]
    assert pm.penalize_missing_eos(T([1.0, 1.0]), has_eos, None).tolist() == [1.0, 1.0]


def test_kl_penalty_per_token_and_score_on_the_last_token() -> None:
    logp = T([[-1.0, -2.0, -3.0]])
    ref = T([[-1.5, -1.0, -9.0]])
    mask = T([[1.0, 1.0, 0.0]])
    rewards, kl = pm.kl_shaped_rewards(T([2.0]), logp, ref, mask, kl_coef=0.1)
    assert kl.tolist() == [[0.5, -1.0, 0.0]]
    # -0.1 * 0.5 = -0.05; -0.1 * -1.0 + 2.0 = 2.1; nothing past the end
    assert torch.allclose(rewards, T([[-0.05, 2.1, 0.0]]))


def test_gae_by_hand() -> None:
    rewards, values, mask = T([[0.0, 1.0, 0.0]]), T([[0.5, 0.2, 9.0]]), T([[1.0, 1.0, 0.0]])
    adv, ret = pm.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # t=1: δ = 1 + 0.9*0 - 0.2 = 0.8, A = 0.8
    # t=0: δ = 0 + 0.9*0.2 - 0.5 = -0.32, A = -0.32 + 0.45*0.8 = 0.04
    assert torch.allclose(adv, T([[0.04, 0.8, 0.0]]))
    assert torch.allclose(ret, T([[0.54, 1.0, 0.0]]))


def test_whiten_over_the_mask_only() -> None:
    x, mask = T([[1.0, 3.0, 100.0]]), T([[1.0, 1.0, 0.0]])
    out = pm.whiten(x, mask)
    # mean 2, unbiased var 2 -> ±1/sqrt(2); the masked entry is zeroed
    assert torch.allclose(out, T([[-(0.5**0.5), 0.5**0.5, 0.0]]), atol=1e-6)
    assert torch.allclose(
        pm.whiten(x, mask, shift_mean=False), T([[2 - 0.5**0.5, 2 + 0.5**0.5, 0.0]]), atol=1e-6
    )


def test_clipped_policy_loss_by_hand() -> None:
    old = T([[0.0, 0.0]])
    new = torch.log(T([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    adv, mask = T([[1.0, -1.0]]), T([[1.0, 1.0]])
    loss, stats = pm.policy_loss(new, old, adv, mask, clip_range=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped)
    assert torch.isclose(loss, T(-0.2))
    assert stats["clip_frac"] == 1.0
    expected_kl = 0.5 * (torch.log(T(1.5)) ** 2 + torch.log(T(0.5)) ** 2) / 2
    assert stats["approx_kl"] == pytest.approx(float(expected_kl))
    same, stats = pm.policy_loss(old, old, adv, mask, clip_range=0.2)
    assert float(same) == 0.0 and stats["clip_frac"] == 0.0


def test_clipped_value_loss_by_hand() -> None:
    old, new, ret, mask = T([[1.0, 1.0]]), T([[2.0, 1.1]]), T([[3.0, 0.0]]), T([[1.0, 1.0]])
    loss, stats = pm.value_loss(new, old, ret, mask, clip_range_value=0.2)
    # token 0: unclipped (2-3)^2 = 1, clipped (1.2-3)^2 = 3.24 -> 3.24; token 1: (1.1)^2 = 1.21 both
    assert torch.isclose(loss, T(0.5 * (3.24 + 1.21) / 2))
    assert stats["value_clip_frac"] == 0.5


def test_builtin_rewards() -> None:
    contains = build_reward_function(RewardFunction(type="contains"))
    chat = [[{"role": "assistant", "content": "It is forgeville."}], [{"role": "assistant", "content": "No"}]]
    assert contains([None, None], chat, answer=["Forgeville", "Forgeville"]) == [1.0, 0.0]
    exact = build_reward_function(RewardFunction(type="exact_match", field="ref"))
    assert exact([None, None], [" forgeville ", "Forgeville!"], ref=["Forgeville", "Forgeville"]) == [
        1.0,
        0.0,
    ]
    valid = build_reward_function(RewardFunction(type="json_valid"))
    assert valid([None, None], ['{"a": 1}', "{a"]) == [1.0, 0.0]
    length = build_reward_function(RewardFunction(type="length", target_length=4))
    assert length([None, None], ["", ""], completion_ids=[[1, 2, 3, 4], [1, 2]]) == [0.0, -0.5]
    with pytest.raises(ConfigError, match="target_length"):
        build_reward_function(RewardFunction(type="length"))
    with pytest.raises(ConfigError, match="unknown reward function"):
        build_reward_function(
            RewardFunction.model_construct(type="python", field="answer", target_length=None)
        )
    with pytest.raises(ConfigError) as info:
        check_references(RewardFunction(type="contains"), [{"prompt": "q", "answer": "x"}, {"prompt": "q"}])
    assert info.value.code == "missing_reference" and "prompt(s) 2" in info.value.message


def test_prompts_file_checks() -> None:
    good = parse_prompt_lines([b'{"messages": [{"role": "user", "content": "Hi"}], "answer": "x"}'])
    assert good.conversational and good.records[0]["answer"] == "x"
    assert parse_prompt_lines([b'{"prompt": "Hi"}']).format == "prompt"
    with pytest.raises(DataError) as info:
        parse_prompt_lines(
            [
                b'{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}',
                b'{"prompt": "Q", "completion": "A"}',
                b'{"text": "Q"}',
            ]
        )
    message = info.value.message
    assert "line 1: the last message is the assistant's" in message and "(final_assistant_message)" in message
    assert "line 2:" in message and "(unexpected_answer)" in message
    assert "line 3:" in message and "(missing_prompt)" in message


def test_running_moments_match_the_moments_of_everything_seen() -> None:
    moments = pm.RunningMoments()
    first, second = T([1.0, 3.0]), T([5.0, 7.0, 9.0])
    # First batch: mean 2, variance 1 (population), so 1 -> -1 and 3 -> +1.
    assert moments.normalise(first).tolist() == pytest.approx([-1.0, 1.0])
    moments.update(second)
    # All five: mean 5, population variance (16+4+0+4+16)/5 = 8.
    assert (moments.count, moments.mean, moments.var) == pytest.approx((5.0, 5.0, 8.0))
    restored = pm.RunningMoments(**moments.state())
    assert restored.normalise(T([5.0])).item() == pytest.approx(0.0)  # a checkpoint resumes the moments
    assert restored.count == 6


def test_adaptive_kl_coefficient_follows_ziegler() -> None:
    # KL 9 vs target 6: error clip(0.5, ±0.2) = 0.2; 64 answers of a 10,000 horizon: β·(1 + 0.2·0.0064).
    assert pm.adaptive_kl_coef(0.1, kl=9.0, target=6.0, n_steps=64, horizon=10_000) == pytest.approx(
        0.1 * 1.00128
    )
    # KL 4.5: error −0.25 clipped to −0.2, β shrinks; KL on target: β unchanged.
    assert pm.adaptive_kl_coef(0.1, kl=4.5, target=6.0, n_steps=100, horizon=100) == pytest.approx(0.08)
    assert pm.adaptive_kl_coef(0.1, kl=6.0, target=6.0, n_steps=100, horizon=100) == pytest.approx(0.1)
    # KL 6.6 is inside the clip: error 0.1.
    assert pm.adaptive_kl_coef(0.1, kl=6.6, target=6.0, n_steps=50, horizon=100) == pytest.approx(0.105)


def test_logprobs_without_a_log_softmax_tensor_match_log_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    got = pm.gather_logprobs(logits, tokens)
    assert torch.allclose(got, expected)
    (grad_expected,) = torch.autograd.grad(expected.sum(), logits)
    (grad_got,) = torch.autograd.grad(got.sum(), logits)
    assert torch.allclose(grad_got, grad_expected)
    rowwise, entropy = pm.logprobs_and_entropy(logits.detach(), tokens)
    assert torch.allclose(rowwise, expected.detach())
    logp = torch.log_softmax(logits.detach(), dim=-1)  # the textbook entropy, over the whole batch
    assert torch.allclose(entropy, -(logp.exp() * logp).sum(dim=-1))
    # The rollout's log-probs equal the update's bit for bit: the first ratio is exactly 1.
    wide = torch.randn(4, 6, 50_000, dtype=torch.float32) * 8
    picks = torch.randint(0, 50_000, (4, 6))
    assert torch.equal(pm.logprobs_and_entropy(wide, picks)[0], pm.gather_logprobs(wide, picks))


def _tiny_causal_lm(vocab: int) -> object:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logits_compute_only_the_answer_positions(temperature: float) -> None:
    """The LM head runs on the T positions that predict the answer, not on the prompt's (the
    vocabulary makes those the largest tensors of a PPO step); values and gradients are those of
    the full forward pass, sliced."""
    from types import SimpleNamespace

    from tuneforge_trainer.rlhf.ppo import _full, response_logits

    vocab, batch, prompt_len, answer_len = 80, 2, 12, 4  # vocab unlike any other width
    model = _tiny_causal_lm(vocab)
    shared = SimpleNamespace(model=model)
    query = torch.randint(3, vocab, (batch, prompt_len))
    query_mask = torch.ones_like(query)
    query_mask[0, :5] = 0  # left padding
    responses = torch.randint(3, vocab, (batch, answer_len))
    mask = torch.ones_like(responses)
    mask[1, 2:] = 0  # an answer that ended early

    full = model(**_full(query, query_mask, responses, mask)).logits[:, prompt_len - 1 : -1] / temperature
    (grad_full,) = torch.autograd.grad(pm.gather_logprobs(full, responses).sum(), model.lm_head.weight)

    head_positions: list[int] = []  # how many positions each LM head call projects onto the vocab
    hook = model.lm_head.register_forward_hook(lambda _m, args, _o: head_positions.append(args[0].shape[1]))
    logits = response_logits(shared, query, query_mask, responses, mask, temperature)
    logprobs = pm.gather_logprobs(logits, responses)
    hook.remove()
    assert head_positions == [answer_len + 1]  # not prompt_len + answer_len
    assert logits.shape == (batch, answer_len, vocab)
    assert torch.allclose(logits, full, atol=1e-5)
    (grad,) = torch.autograd.grad(logprobs.sum(), model.lm_head.weight)
    assert torch.allclose(grad, grad_full, atol=1e-5)
