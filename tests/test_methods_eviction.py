"""Eviction methods: the per-layer simulation equals decoding with an evicting cache."""

import math
from dataclasses import dataclass, replace
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from megatron_utils import TINY_GQA
from nemo_dmc.core import DMCConfig
from nemo_dmc.megatron.cpu_shims import causal_attention_mask
from nemo_dmc.megatron.model import build_model
from nemo_dmc.megatron.stats import layer_methods, layer_slots
from nemo_dmc.methods import (
    EvictionMethod,
    EvictionRecord,
    VanillaSettings,
    evicted_attention,
    method_class,
)

POLICIES = ("h2o", "tova", "streaming")


def _qkv(b=2, hq=4, hk=2, s=24, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, s, d, generator=g, dtype=dtype) for h in (hq, hk, hk))


def _settings(name: str, ratio: float, **kwargs):
    """Settings of eviction method ``name`` (``sinks`` only where the policy has them)."""
    cls = method_class(name).settings_class
    if name != "streaming":
        kwargs.pop("sinks", None)
    return cls(ratio=ratio, **kwargs)


def EvictionPolicy(name: str, ratio: float, **kwargs) -> EvictionMethod:
    """One layer's eviction method object."""
    return method_class(name)(_settings(name, ratio, **kwargs))


def _budget(policy: EvictionMethod, n: int) -> int:
    """The budget rule, computed exactly (independently of the implementation)."""
    settings = policy.settings
    sinks = getattr(settings, "sinks", 0)
    default = {"streaming": sinks + 1,
               "h2o": 2 if getattr(settings, "heavy_fraction", 0) > 0 else 1}
    floor = settings.min_slots or default.get(policy.name, 1)
    return min(n, max(floor, math.ceil(Fraction(n) / Fraction(settings.ratio))))


@dataclass
class Slot:
    pos: int
    key: torch.Tensor
    value: torch.Tensor
    mass: float = 0.0


def _naive_decode(query, key, value, policy: EvictionMethod):
    """Token-by-token decoding with an explicit evicting cache: lists of slots per KV head."""
    b, hq, s, d = query.shape
    hk = key.shape[1]
    group = hq // hk
    out = torch.zeros_like(query)
    kept = torch.zeros(b, hk, s, dtype=torch.long)
    for bi in range(b):
        caches = [[] for _ in range(hk)]
        for t in range(s):
            layer_probs = []
            for h, cache in enumerate(caches):
                cache.append(Slot(t, key[bi, h, t], value[bi, h, t]))
                keys = torch.stack([slot.key for slot in cache])
                values = torch.stack([slot.value for slot in cache])
                probs = []
                for j in range(group):
                    p = torch.softmax(keys @ query[bi, h * group + j, t] / math.sqrt(d), dim=0)
                    out[bi, h * group + j, t] = p @ values
                    probs.append(p)
                group_probs = torch.stack(probs).mean(dim=0)
                for slot, p in zip(cache, group_probs):
                    slot.mass += float(p)
                layer_probs.append(group_probs)
            budget = _budget(policy, t + 1)
            if policy.name == "tova":  # one score per position for the whole layer
                scores = torch.stack(layer_probs).mean(dim=0).tolist()
                while len(caches[0]) > budget:
                    i = min(range(len(scores)), key=lambda i: (scores[i], caches[0][i].pos))
                    scores.pop(i)
                    for cache in caches:
                        cache.pop(i)
            for h, cache in enumerate(caches):
                while len(cache) > budget:
                    if policy.name == "streaming":
                        victim = min((sl for sl in cache if sl.pos >= policy.settings.sinks),
                                     key=lambda sl: sl.pos)
                    else:  # h2o: heavy hitters outside the protected recent window
                        recent = budget - math.floor(policy.settings.heavy_fraction * budget)
                        victim = min((sl for sl in cache if sl.pos <= t - recent),
                                     key=lambda sl: (sl.mass, sl.pos))
                    cache.remove(victim)
                kept[bi, h, t] = len(cache)
    return out, kept


def _one_hot_values(b, hk, s):
    """Values that make the attention output the attention distribution over positions."""
    return torch.eye(s, dtype=torch.float64).expand(b, hk, s, s).clone()


@pytest.mark.parametrize("ratio", [2.0, 3.5])
@pytest.mark.parametrize("name", POLICIES)
def test_simulation_equals_decoding_with_an_evicting_cache(name, ratio):
    q, k, v = _qkv()
    policy = EvictionPolicy(name, ratio, sinks=2)
    out, kept = evicted_attention(q, k, v, policy)
    ref_out, ref_kept = _naive_decode(q, k, v, policy)
    assert torch.equal(kept, ref_kept)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    full, _ = evicted_attention(q, k, v, EvictionPolicy(name, 1.0))
    assert not torch.allclose(out, full)  # eviction happened and mattered


@pytest.mark.parametrize("name", POLICIES)
def test_ratio_one_is_full_causal_attention(name):
    q, k, v = _qkv(dtype=torch.float32)
    out, kept = evicted_attention(q, k, v, EvictionPolicy(name, 1.0))
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                         is_causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(kept, torch.arange(1, 25).expand(2, 2, 24))


@pytest.mark.parametrize("ratio", [1.5, 4.0, 7.0])
@pytest.mark.parametrize("name", POLICIES)
def test_budget_is_respected_after_every_token(name, ratio):
    q, k, _ = _qkv(s=40)
    policy = EvictionPolicy(name, ratio)
    out, kept = evicted_attention(q, k, _one_hot_values(2, 2, 40), policy)
    for t in range(40):
        assert (kept[..., t] == _budget(policy, t + 1)).all()
        assert (kept[..., t] <= max(policy.settings.floor, math.ceil((t + 1) / ratio))).all()
        # Query t attends the slots kept after t-1 plus itself.
        attended = (out[..., t, :] > 0).sum(dim=-1)
        expected = kept[..., t - 1] + 1 if t else torch.ones_like(kept[..., 0])
        assert (attended == expected.repeat_interleave(2, dim=1)).all()


@pytest.mark.parametrize("name", POLICIES)
def test_current_token_is_always_attended(name):
    q, k, _ = _qkv(s=32)
    out, _ = evicted_attention(q, k, _one_hot_values(2, 2, 32), EvictionPolicy(name, 8.0))
    assert (out.diagonal(dim1=-2, dim2=-1) > 0).all()


def test_streaming_keeps_exactly_the_sinks_and_the_most_recent_tokens():
    s, sinks = 40, 3
    q, k, _ = _qkv(s=s)
    policy = EvictionPolicy("streaming", 4.0, sinks=sinks)
    out, _ = evicted_attention(q, k, _one_hot_values(2, 2, s), policy)
    for t in range(1, s):
        held = _budget(policy, t)  # slots held before token t enters
        expected = set(range(min(sinks, held))) | set(range(t - (held - min(sinks, held)), t + 1))
        support = (out[..., t, :] > 0)
        for row in support.reshape(-1, s):
            assert set(row.nonzero().flatten().tolist()) == expected


def test_h2o_never_evicts_its_recent_window():
    s = 48
    q, k, _ = _qkv(s=s, seed=3)
    policy = EvictionPolicy("h2o", 4.0)
    out, _ = evicted_attention(q, k, _one_hot_values(2, 2, s), policy)
    for t in range(1, s):
        recent = policy.settings.recent_window(_budget(policy, t))
        assert (out[..., t, t - recent + 1:t + 1] > 0).all()


def test_tova_evicts_the_same_positions_in_every_kv_head_and_h2o_per_head():
    s = 32
    q, k, _ = _qkv(hq=8, hk=4, s=s, seed=1)
    support = {}
    for name in ("tova", "h2o"):
        out, _ = evicted_attention(q, k, _one_hot_values(2, 4, s), EvictionPolicy(name, 4.0))
        support[name] = out[:, :, -1] > 0  # [b, hq, s]
    assert (support["tova"] == support["tova"][:, :1]).all()
    assert not (support["h2o"] == support["h2o"][:, :1]).all()


def test_gqa_kv_head_scores_are_the_mean_over_its_query_group():
    # Three query heads per KV head; the naive decoder averages their probabilities explicitly.
    q, k, v = _qkv(hq=6, hk=2, s=20, seed=5)
    policy = EvictionPolicy("h2o", 3.0)
    out, kept = evicted_attention(q, k, v, policy)
    ref_out, ref_kept = _naive_decode(q, k, v, policy)
    assert torch.equal(kept, ref_kept)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "lru", "ratio": 2.0}, "lru"),
    ({"name": "h2o", "ratio": 0.5}, "ratio"),
    ({"name": "h2o", "ratio": 2.0, "heavy_fraction": 1.0}, "heavy_fraction"),
    ({"name": "streaming", "ratio": 2.0, "sinks": 4, "min_slots": 4}, "min_slots"),
])
def test_invalid_policies_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EvictionPolicy(**kwargs)


# ---- inside a megatron model --------------------------------------------------------------

CFG = replace(TINY_GQA, seq_length=32)


def _forward(model, seq=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CFG.vocab_size, (2, CFG.seq_length), generator=g)[:, :seq]
    positions = torch.arange(seq).expand(2, seq)
    with torch.no_grad():
        return model(tokens, positions, causal_attention_mask(seq))


def _model(settings, like=None):
    """A model running ``settings``' method with the weights of ``like`` (if given)."""
    model = build_model(CFG, settings).eval()
    if like is not None:
        model.load_state_dict(like.state_dict())
    return model


@pytest.fixture
def plain_model(megatron_tp1):
    return _model(VanillaSettings())


def test_eviction_changes_outputs_only_when_it_evicts(plain_model):
    plain = _forward(plain_model)
    dmc = _model(DMCConfig(), like=plain_model)
    assert not torch.allclose(_forward(dmc), plain, atol=1e-3)  # DMC decides, vanilla does not
    full = _model(_settings("h2o", 1.0), like=plain_model)
    torch.testing.assert_close(_forward(full), plain, rtol=1e-5, atol=1e-5)
    tova = _model(_settings("tova", 4.0), like=plain_model)
    evicted = _forward(tova)
    assert not torch.allclose(evicted, plain, atol=1e-3)
    assert all(isinstance(m.record, EvictionRecord) for m in layer_methods(tova))


@pytest.mark.parametrize("name", POLICIES)
def test_model_logits_equal_decoding_prefix_by_prefix(plain_model, name):
    # Causality end to end: the logits at position t of the full forward equal the last
    # logits of a forward over the prefix [0, t], i.e. what decoding would produce.
    model = _model(_settings(name, 3.0, sinks=2), like=plain_model)
    full = _forward(model, seq=20)
    for t in (4, 11, 19):
        prefix = _forward(model, seq=t + 1)
        torch.testing.assert_close(prefix[:, -1], full[:, t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio", [2.0, 4.0])
@pytest.mark.parametrize("name", POLICIES)
def test_realised_ratio_matches_the_requested_ratio(plain_model, name, ratio):
    model = _model(_settings(name, ratio), like=plain_model)
    _forward(model, seq=32)
    kept = [m.record.kept for m in layer_methods(model)]
    assert all(k.shape == (2, CFG.kv_heads, 32) for k in kept)
    slots = layer_slots(model)
    assert slots.shape == (2, CFG.num_layers, CFG.kv_heads)
    assert 32 / slots.float().mean().item() == pytest.approx(ratio)


def test_layer_slots_need_a_forward(plain_model):
    with pytest.raises(ValueError, match="forward"):
        layer_slots(plain_model)
    _forward(plain_model)
    assert (layer_slots(plain_model) == 32).all()  # plain attention keeps every token


def test_a_model_without_method_layers_is_rejected_by_name(megatron_tp1):
    with pytest.raises(ValueError, match="KV-method attention"):
        layer_methods(build_model(CFG, method=None))


def test_victims_are_the_lowest_score_with_ties_to_the_oldest_position_in_any_slot_order():
    from nemo_dmc.methods.eviction import choose_victims

    policy = EvictionPolicy("tova", 2.0)
    probs = torch.tensor([0.25, 0.25, 0.3, 0.2, 0.2]).view(1, 1, 1, 5)
    positions = torch.tensor([7, 3, 9, 8, 5]).view(1, 1, 5)  # slots in no particular order
    live = torch.ones(1, 1, 5, dtype=torch.bool)
    mass = torch.zeros(1, 1, 5)
    assert choose_victims(policy, probs, mass, live, positions, 4).item() == 4  # 0.2 at pos 5
    probs[..., 3:] = 0.5
    assert choose_victims(policy, probs, mass, live, positions, 4).item() == 1  # 0.25 at pos 3
