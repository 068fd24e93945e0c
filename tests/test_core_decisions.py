"""Decisions, importance and the survival bias (nemo_dmc.core.decisions)."""

import torch
import torch.nn.functional as F

from nemo_dmc.core import (
    DMCConfig,
    decision_logits,
    importance,
    make_decisions,
    sample_logistic_noise,
    zero_decision_channel,
)


def test_decision_logit_is_last_key_channel_minus_offset():
    key = torch.randn(2, 3, 5, 8)
    assert torch.equal(decision_logits(key, 5.0), key[..., -1] - 5.0)


def test_decision_scale_multiplies_logit_and_importance_argument():
    key, query = torch.randn(2, 3, 5, 8), torch.randn(2, 6, 5, 8)
    assert torch.equal(decision_logits(key, 5.0, scale=4.0), key[..., -1] * 4.0 - 5.0)
    mean = query[..., -1].view(2, 3, 2, 5).mean(dim=2)
    assert torch.allclose(importance(query, 3, 5.0, scale=4.0), torch.sigmoid(4.0 * mean + 5.0))
    assert torch.equal(importance(query, 3, 5.0, scale=1.0), importance(query, 3, 5.0))


def test_eval_decisions_are_hard_threshold_at_zero_and_first_token_appends():
    logits = torch.tensor([[[3.0, 2.0, -1.0, 0.5, -0.1]]])
    d = make_decisions(logits, DMCConfig(), training=False)
    assert d.hard.tolist() == [[[0.0, 1.0, 0.0, 1.0, 0.0]]]
    assert torch.equal(d.alpha, d.hard)


def test_eval_bias_discards_state_when_next_token_merges():
    logits = torch.tensor([[[-1.0, 2.0, -1.0, 2.0]]])  # decisions 0 1 0 1
    cfg = DMCConfig(hard_bias=-1e9)
    d = make_decisions(logits, cfg, training=False)
    # state i is dropped iff token i+1 merges; the last state always survives
    assert d.state_bias.tolist() == [[[-1e9, 0.0, -1e9, 0.0]]]


def test_relaxed_decisions_use_gumbel_sigmoid_with_temperature():
    logits = torch.randn(2, 2, 6)
    noise = sample_logistic_noise(logits.shape, logits.device)
    cfg = DMCConfig(temperature=0.3)
    d = make_decisions(logits, cfg, training=True, noise=noise)
    expected = torch.sigmoid((logits + noise) / 0.3)
    assert torch.allclose(d.alpha[..., 1:], expected[..., 1:])
    assert torch.all(d.alpha[..., 0] == 0)
    assert torch.all(d.hard[..., 1:] == (expected[..., 1:] > 0.5).float())


def test_relaxed_bias_is_log_survival_probability_and_finite():
    logits = torch.tensor([[[0.0, 80.0, -3.0, 1.0]]])
    noise = torch.zeros_like(logits)
    d = make_decisions(logits, DMCConfig(temperature=0.1), training=True, noise=noise)
    expected = F.logsigmoid(-logits / 0.1)
    assert torch.allclose(d.state_bias[..., :-1], expected[..., 1:])
    assert d.state_bias[..., -1].item() == 0.0
    assert torch.isfinite(d.state_bias).all()  # alpha rounds to 1.0 at logit 80


def test_noise_is_fp32_logistic_even_for_bf16_inputs():
    key = torch.randn(1, 1, 4, 8, dtype=torch.bfloat16)
    noise = sample_logistic_noise((4096,), torch.device("cpu"))
    assert noise.dtype == torch.float32
    assert abs(noise.mean().item()) < 0.15 and abs(noise.var().item() - torch.pi ** 2 / 3) < 0.4
    d = make_decisions(decision_logits(key, 5.0), DMCConfig(), training=True)
    assert d.alpha.dtype == torch.float32


def test_straight_through_forward_is_hard_and_backward_is_relaxed():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 8, 64, generator=g).requires_grad_()
    noise = sample_logistic_noise(logits.shape, logits.device, generator=g)
    d = make_decisions(logits, DMCConfig(), training=True, noise=noise)
    assert torch.equal(d.straight_through.detach(), d.hard)
    (g_st,) = torch.autograd.grad(d.straight_through.sum(), logits, retain_graph=True)
    (g_soft,) = torch.autograd.grad(d.alpha.sum(), logits)
    assert torch.allclose(g_st, g_soft)


def test_forced_decisions_override_logits():
    logits = torch.randn(1, 1, 5)
    merge = make_decisions(logits, DMCConfig(force_decision="merge"), training=True)
    append = make_decisions(logits, DMCConfig(force_decision="append"), training=True)
    assert merge.hard.tolist() == [[[0.0, 1.0, 1.0, 1.0, 1.0]]]
    assert append.hard.sum() == 0 and torch.all(append.state_bias == 0)


def test_importance_averages_decision_channel_over_gqa_group():
    q = torch.zeros(1, 4, 3, 8)
    q[:, 0, :, -1], q[:, 1, :, -1] = 1.0, 3.0      # group 0 -> mean 2
    q[:, 2, :, -1], q[:, 3, :, -1] = -4.0, 0.0     # group 1 -> mean -2
    omega = importance(q, num_kv_heads=2, init_offset=5.0)
    assert omega.shape == (1, 2, 3)
    assert torch.allclose(omega[0, 0], torch.sigmoid(torch.tensor(7.0)).expand(3))
    assert torch.allclose(omega[0, 1], torch.sigmoid(torch.tensor(3.0)).expand(3))


def test_zero_decision_channel_only_touches_last_channel():
    x = torch.randn(2, 3, 4, 6)
    z = zero_decision_channel(x)
    assert torch.all(z[..., -1] == 0) and torch.equal(z[..., :-1], x[..., :-1])
