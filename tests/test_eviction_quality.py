"""Eviction quality (issue 18): keeping more never hurts, and H2O keeps its attention sink.

A fixed analytic language model stands in for a trained one (a real checkpoint takes far
longer than a unit test to load): one attention layer that behaves like an induction head
with an attention sink, on a fixed text with repeated structure, so the context in the
cache is what the predictions live on. The real-model figures are in BENCHMARKS.md
(``bench/h2o_check.py``).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from nemo_dmc.methods import evicted_attention, method_class

POLICIES = ("h2o", "tova", "streaming")
VOCAB, PERIOD, PERIODS = 32, 24, 8


def _method(name: str, ratio: float, **kwargs):
    return method_class(name)(method_class(name).settings_class(ratio=ratio, **kwargs))


def _text() -> torch.Tensor:
    """BOS (id VOCAB) then a fixed random period of distinct tokens, repeated."""
    g = torch.Generator().manual_seed(0)
    period = torch.randperm(VOCAB, generator=g)[:PERIOD]
    return torch.cat([torch.tensor([VOCAB]), period.repeat(PERIODS)])


def _toy_perplexity(policy) -> float:
    """Perplexity of the next token under an induction head with an attention sink.

    Query t is its token's embedding; key j (j >= 1) is the embedding of the token *before*
    j and value j the embedding of token j, so query t finds the position that followed the
    previous occurrence of its token and predicts that token. Position 0 (BOS) is the sink:
    every query gives it a moderate score and its value is zero, so with no match the output
    is ~0 (a uniform prediction), as in real models' sink heads. Two query heads share the
    single KV head (GQA), one sharper than the other.
    """
    x = _text()
    d = VOCAB + 1
    emb = torch.eye(d, dtype=torch.float64)[:, :VOCAB]  # token i -> e_i; dim VOCAB = sink
    sink = torch.eye(d, dtype=torch.float64)[VOCAB]
    tok = torch.cat([emb.T, sink[None]])                 # [VOCAB + 1, d], BOS -> sink dir
    q = tok[x] + 0.75 * sink                             # match score 1, sink score 0.75
    k = torch.cat([sink[None], tok[x[:-1]]]).clone()
    k[1:, VOCAB] = 0.0
    v = torch.cat([torch.zeros(1, d, dtype=torch.float64), tok[x[1:]]])
    query = torch.stack([q * 16.0, q * 12.0])[None]      # [1, 2, s, d]
    out, _ = evicted_attention(query, k[None, None], v[None, None], policy, scale=1.0)
    logits = 6.0 * out[0].mean(0)[:, :VOCAB]              # [s, VOCAB]
    loss = F.cross_entropy(logits[:-1], x[1:])
    return math.exp(float(loss))


@pytest.mark.parametrize("name", POLICIES)
def test_perplexity_does_not_improve_as_the_ratio_rises(name):
    ppl = [_toy_perplexity(_method(name, ratio)) for ratio in (1.0, 2.0, 4.0, 8.0)]
    assert all(a <= b * (1 + 1e-9) for a, b in zip(ppl, ppl[1:])), (name, ppl)
    assert ppl[-1] > ppl[0] * 1.05, (name, ppl)  # the cache size matters in this model


@pytest.mark.parametrize("ratio", [2.0, 4.0, 8.0])
def test_h2o_keeps_the_attention_sink_from_the_second_token_on(ratio):
    # Every query puts nearly all its mass on position 0, whose value is e_0: the output stays
    # e_0 exactly as long as position 0 is cached. With a one-slot budget for the first
    # `ratio` tokens (all of it the recent window) position 0 was evicted at the second token.
    s, d = 40, 8
    g = torch.Generator().manual_seed(1)
    key = torch.randn(1, 1, s, d, generator=g, dtype=torch.float64) * 0.1
    key[..., 0, :] = 0.0
    key[..., 0, 0] = 1.0
    query = torch.zeros(1, 2, s, d, dtype=torch.float64)
    query[..., 0] = 20.0
    value = torch.randn(1, 1, s, d, generator=g, dtype=torch.float64) * 0.1
    value[..., 0, :] = torch.eye(d, dtype=torch.float64)[0]
    out, kept = evicted_attention(query, key, value, _method("h2o", ratio), scale=1.0)
    assert (out[0, :, :, 0] > 0.9).all(), out[0, 0, :, 0]
    assert kept[0, 0, -1] == math.ceil(s / ratio)  # the same final budget as before


def test_h2o_budget_floor_leaves_room_for_one_heavy_hitter():
    settings = method_class("h2o").settings_class(ratio=8.0)
    assert [settings.budget(n) for n in (1, 2, 3, 8, 16, 17)] == [1, 2, 2, 2, 2, 3]
    assert settings.recent_window(2) == 1
    pure_recent = method_class("h2o").settings_class(ratio=8.0, heavy_fraction=0.0)
    assert pure_recent.budget(2) == 1
    assert method_class("h2o").settings_class(ratio=8.0, min_slots=1).budget(2) == 1
