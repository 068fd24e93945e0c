"""DMS (learned, delayed eviction): parallel training form with hard decisions == the
token-by-token reference == the paged cache policy (fp64), and its decisions and record."""

import pytest
import torch

from nemo_dmc.core import attended_rope, dmc_attention, rotate_half_rope
from nemo_dmc.methods import DMSConfig, DMSMethod, DMSRecord, settings_from_dict, settings_to_dict
from nemo_dmc.methods.dms import kept_slots
from nemo_dmc.methods.dms_reference import simulate_dms


def _inputs(hq, hk, seq, batch=2, dim=8, seed=0, evict_bias=0.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hq, seq, dim, generator=g, dtype=torch.float64)
    k = torch.randn(batch, hk, seq, dim, generator=g, dtype=torch.float64)
    v = torch.randn(batch, hk, seq, dim, generator=g, dtype=torch.float64)
    k[..., -1] = 3.0 * k[..., -1] + 5.0 + evict_bias  # logit = k[D-1] - 5: ~half evicted
    return q, k, v


def _parallel(q, k, v, settings, rope, training=False, noise=None):
    """The training form: the method's prepare, RoPE (channel D-1 zeroed again where the
    method asks), attention with the windowed bias."""
    method = DMSMethod(settings)
    prepared = method.prepare(q, k, v, training=training, noise=lambda: noise,
                              accumulate=None)
    positions = torch.arange(q.shape[2])
    rope = attended_rope(rope, prepared.zero_after_rope)
    query, key = rope(prepared.query, positions), rope(prepared.key, positions)
    out = dmc_attention(query, key, prepared.value, prepared.bias,
                        bias_window=prepared.bias_window)
    return out, method.record


@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2), (8, 2)], ids=["mha", "gqa2", "gqa4"])
@pytest.mark.parametrize("window", [1, 3, 8])
@pytest.mark.parametrize("seq", [1, 5, 14])
@pytest.mark.parametrize("zero_after_rope", [True, False], ids=["zero_after", "zero_before"])
def test_parallel_form_with_hard_decisions_equals_token_by_token_reference(hq, hk, window, seq,
                                                                           zero_after_rope):
    q, k, v = _inputs(hq, hk, seq)
    settings, rope = DMSConfig(window=window, zero_after_rope=zero_after_rope), rotate_half_rope()
    out, record = _parallel(q, k, v, settings, rope)
    ref = simulate_dms(q, k, v, settings, rope=rope)
    assert torch.equal(record.decisions.hard, ref.decisions)
    assert torch.allclose(out, ref.output, atol=1e-12, rtol=0)
    assert torch.equal(record.slots.long(), ref.cache_lengths)


@pytest.mark.parametrize("force", ["append", "evict"])
def test_forced_decisions_keep_everything_or_only_the_window(force):
    q, k, v = _inputs(4, 2, 11)
    settings, rope = DMSConfig(window=3, force_decision=force), rotate_half_rope()
    out, record = _parallel(q, k, v, settings, rope)
    ref = simulate_dms(q, k, v, settings, rope=rope)
    assert torch.allclose(out, ref.output, atol=1e-12, rtol=0)
    assert torch.all(ref.cache_lengths == (11 if force == "append" else 3))
    assert torch.equal(record.slots.long(), ref.cache_lengths)


def test_keys_inside_the_window_are_seen_even_when_marked_for_eviction():
    q, k, v = _inputs(2, 2, 6, evict_bias=100.0)  # every token marked
    settings, rope = DMSConfig(window=8), rotate_half_rope()
    out, record = _parallel(q, k, v, settings, rope)
    assert record.decisions.hard.all()
    q[..., -1], k[..., -1] = 0.0, 0.0
    q, k = rope(q, torch.arange(6)), rope(k, torch.arange(6))
    q[..., -1], k[..., -1] = 0.0, 0.0  # zero_after_rope (the default)
    plain = dmc_attention(q, k, v, torch.zeros(2, 2, 6, dtype=torch.float64))
    assert torch.allclose(out, plain, atol=1e-12)


def test_training_bias_is_log_keep_probability_only_beyond_the_window():
    q, k, v = _inputs(2, 2, 9)
    noise = torch.zeros(2, 2, 9, dtype=torch.float64)
    settings = DMSConfig(window=2)
    method = DMSMethod(settings)
    prepared = method.prepare(q, k, v, training=True, noise=lambda: noise, accumulate=None)
    z = (settings.decision_scale * k[..., -1] - settings.init_offset) / settings.temperature
    finite = z < 30  # log(1 - sigmoid(z)) rounds to -inf beyond; the bias stays finite
    assert torch.allclose(prepared.bias[finite], torch.log1p(-torch.sigmoid(z))[finite])
    assert torch.isfinite(prepared.bias).all()
    assert prepared.bias_window == 2
    d = method.record.decisions
    assert torch.equal(d.straight_through, d.hard) and torch.equal(d.hard, (z > 0).double())


def test_gradient_reaches_the_decision_channel_through_the_mask():
    q, k, v = _inputs(2, 2, 10)
    k.requires_grad_(True)
    settings = DMSConfig(window=2)
    out, _ = _parallel(q, k, v, settings, rotate_half_rope(), training=True,
                       noise=torch.zeros(2, 2, 10, dtype=torch.float64))
    out.square().sum().backward()
    assert k.grad[..., -1].abs().sum() > 0


def test_kept_slots_count_the_window_plus_the_survivors():
    evict = torch.tensor([[[1.0, 0.0, 1.0, 1.0, 0.0, 1.0]]])
    assert kept_slots(evict, 2).item() == 2 + 1  # tokens 0..3 left the window; token 1 kept
    assert kept_slots(evict, 10).item() == 6
    assert isinstance(DMSRecord, type)


def test_settings_round_trip_and_name_their_key():
    settings = DMSConfig(window=16, decision_scale=4.0)
    assert settings_from_dict(settings_to_dict(settings)) == settings
    with pytest.raises(ValueError, match="dms.window"):
        DMSConfig(window=0)
    with pytest.raises(ValueError, match="dms.force_decision"):
        DMSConfig(force_decision="merge")


def _paged_run(q, k, v, settings, prefill, chunk, block_size=2):
    """The engine's DMS cache policy in fp64: prefill in chunks, then decode one by one."""
    from nemo_dmc.kvcache import CacheLayout, LayerCacheView, PagedKVCache, policy_for
    from nemo_dmc.kvcache.policies import DecodeStep

    b, hk, seq, d = k.shape
    cache = PagedKVCache(CacheLayout(
        num_layers=1, kv_heads=hk, head_dim=d, window=None, block_size=block_size,
        num_blocks=b * hk * seq, max_sequences=b, max_sequence_length=seq,
        dtype=torch.float64, open_runs=False, slot_scores=True))
    rows, rope, scale = torch.arange(b), rotate_half_rope(), d ** -0.5
    policy, view = policy_for(DMSMethod(settings)), LayerCacheView(cache, 0, rows)
    outs, done = [], 0
    while done < seq:
        c = min(chunk, prefill - done) if done < prefill else 1
        pos, sl = (done + torch.arange(c)).expand(b, c), slice(done, done + c)
        if done < prefill:
            outs.append(policy.prefill(view, q[:, :, sl], k[:, :, sl], v[:, :, sl], pos,
                                       torch.full((b,), c), rope, scale))
        else:
            outs.append(policy.decode(view, q[:, :, sl], k[:, :, sl], v[:, :, sl], pos, rope,
                                      scale, DecodeStep(None, done + 1)))
        cache.positions[rows] += c
        done += c
    return torch.cat(outs, dim=2), cache


@pytest.mark.parametrize("hq,hk", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("window", [1, 3])
@pytest.mark.parametrize("prefill,chunk", [(1, 1), (13, 13), (9, 4)],
                         ids=["decode_only", "one_prefill", "chunked_then_decode"])
@pytest.mark.parametrize("zero_after_rope", [True, False], ids=["zero_after", "zero_before"])
def test_paged_cache_policy_equals_token_by_token_reference(hq, hk, window, prefill, chunk,
                                                            zero_after_rope):
    q, k, v = _inputs(hq, hk, 13)
    settings = DMSConfig(window=window, zero_after_rope=zero_after_rope)
    out, cache = _paged_run(q, k, v, settings, prefill, chunk)
    ref = simulate_dms(q, k, v, settings, rope=rotate_half_rope())
    assert 0.2 < ref.decisions.mean() < 0.8
    assert torch.equal(cache.lengths[:, 0], ref.cache_lengths)
    assert torch.allclose(out, ref.output, atol=1e-12, rtol=0)
    assert cache.num_used_blocks == int(((ref.cache_lengths + 1) // 2).sum())
