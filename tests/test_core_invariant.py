"""The key invariant: parallel training formulation (hard decisions) == token-by-token inference."""

import pytest
import torch
import torch.nn.functional as F

from nemo_dmc.core import DMCConfig, dmc_self_attention, rotate_half_rope, simulate_inference


def _inputs(hq, hk, seq, merge_bias=0.0, batch=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, seq, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, hk, seq, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, hk, seq, dim, generator=g, dtype=torch.float64)
    k[..., -1] = 3.0 * k[..., -1] + 5.0 + merge_bias  # logit = k[D-1] - 5: ~half merge
    return q, k, v


@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2), (8, 2)], ids=["mha", "gqa2", "gqa4"])
@pytest.mark.parametrize("window", [None, 1, 3, 12], ids=lambda w: f"window{w}")
@pytest.mark.parametrize("seq", [1, 2, 7, 13])
@pytest.mark.parametrize("zero_after_rope", [True, False], ids=["zero_after", "zero_before"])
def test_parallel_equals_sequential_inference_with_random_decisions(hq, hk, window, seq,
                                                                     zero_after_rope):
    q, k, v = _inputs(hq, hk, seq)
    cfg, rope = DMCConfig(window=window, zero_after_rope=zero_after_rope), rotate_half_rope()
    out, decisions = dmc_self_attention(q, k, v, cfg, training=False, rope=rope)
    ref = simulate_inference(q, k, v, cfg, rope=rope)
    assert torch.equal(decisions.hard, ref.decisions)
    assert torch.allclose(out, ref.output, atol=1e-10)


@pytest.mark.parametrize("window", [None, 3])
def test_parallel_equals_sequential_with_decision_scale(window):
    q, k, v = _inputs(8, 2, 13)
    k[..., -1] = k[..., -1] / 4.0  # logit = 4 * k[D-1] - 5: still ~half merge
    cfg, rope = DMCConfig(window=window, decision_scale=4.0), rotate_half_rope()
    out, decisions = dmc_self_attention(q, k, v, cfg, training=False, rope=rope)
    ref = simulate_inference(q, k, v, cfg, rope=rope)
    assert torch.equal(decisions.hard, ref.decisions)
    assert 0 < ref.decisions.mean() < 1
    assert torch.allclose(out, ref.output, atol=1e-10)
    unscaled = simulate_inference(q, k, v, DMCConfig(window=window), rope=rope)
    assert not torch.equal(unscaled.decisions, ref.decisions)


@pytest.mark.parametrize("force", ["append", "merge"])
@pytest.mark.parametrize("window", [None, 4])
def test_parallel_equals_sequential_with_forced_decisions(force, window):
    q, k, v = _inputs(4, 2, 11)
    cfg, rope = DMCConfig(window=window, force_decision=force), rotate_half_rope()
    out, _ = dmc_self_attention(q, k, v, cfg, training=False, rope=rope)
    ref = simulate_inference(q, k, v, cfg, rope=rope)
    assert torch.allclose(out, ref.output, atol=1e-10)
    expected_len = 11 if force == "append" else 1
    assert torch.all(ref.cache_lengths == expected_len)


def test_long_merge_runs_match_inference():
    q, k, v = _inputs(4, 2, 40, merge_bias=4.0)  # mostly merges: runs longer than the window
    for window in (None, 12):
        cfg, rope = DMCConfig(window=window), rotate_half_rope()
        out, _ = dmc_self_attention(q, k, v, cfg, training=False, rope=rope)
        ref = simulate_inference(q, k, v, cfg, rope=rope)
        assert ref.cache_lengths.max() < 20
        assert torch.allclose(out, ref.output, atol=1e-10)


@pytest.mark.parametrize("zero_after_rope", [True, False])
def test_all_append_equals_vanilla_attention_with_decision_channel_zeroed(zero_after_rope):
    q, k, v = _inputs(8, 2, 9)
    rope = rotate_half_rope()
    cfg = DMCConfig(force_decision="append", zero_after_rope=zero_after_rope)
    out, _ = dmc_self_attention(q, k, v, cfg, training=False, rope=rope)
    pos = torch.arange(9)
    qz, kz = q.clone(), k.clone()
    qz[..., -1], kz[..., -1] = 0, 0
    qz, kz = rope(qz, pos), rope(kz, pos)
    if zero_after_rope:  # channel D-1 zeroed again after RoPE
        qz[..., -1], kz[..., -1] = 0, 0
    vanilla = F.scaled_dot_product_attention(qz, kz, v, is_causal=True, enable_gqa=True)
    assert torch.allclose(out, vanilla, atol=1e-10)


def test_decision_channel_never_reaches_scores():
    q, k, v = _inputs(4, 2, 6, merge_bias=-50.0)   # all append regardless of channel value
    cfg, rope = DMCConfig(window=None), rotate_half_rope()
    base, _ = dmc_self_attention(q, k, v, cfg, training=False, rope=rope)
    k2 = k.clone()
    k2[..., -1] -= 7.0            # still append, but a different channel value
    out, _ = dmc_self_attention(q, k2, v, cfg, training=False, rope=rope)
    assert torch.allclose(base, out, atol=1e-12)


def test_fused_attention_equals_dense_bias_reference_with_padding_mask():
    from nemo_dmc.core import DMCConfig, dmc_attention, dmc_score_bias, make_decisions

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, h, 6, 4, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    d = make_decisions(torch.randn(2, 2, 6, generator=g, dtype=torch.float64), DMCConfig(),
                       training=True, noise=torch.zeros(2, 2, 6, dtype=torch.float64))
    pad = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    pad[1, ..., :2] = True                      # second sequence: first two keys are padding
    pad[1, 0, :2, :2] = False                   # (padding rows still see themselves)
    out = dmc_attention(q, k, v, d.state_bias, mask=pad)
    bias = dmc_score_bias(d.state_bias, pad).repeat_interleave(2, dim=1)
    dense = torch.softmax(q @ k.repeat_interleave(2, 1).transpose(-1, -2) / 2.0 + bias, -1)
    assert torch.allclose(out, dense @ v.repeat_interleave(2, 1), atol=1e-12)
