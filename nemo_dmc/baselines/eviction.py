"""Training-free KV-cache eviction baselines (H2O, TOVA, StreamingLLM) at a given ratio.

A causal layer's inputs at position t depend only on positions <= t, so simulating an
evicting cache token by token *inside* each layer's attention, from the full q/k/v of one
forward pass, gives exactly what token-by-token decoding with that cache would compute.

Cache protocol, per sequence and KV head, for token t (0-based; t+1 tokens seen after it):

1. insert: (k_t, v_t) enters the cache;
2. attend: query t attends to every cached slot (so the current token is always attended);
3. evict: while the cache holds more than ``budget(t + 1)`` slots, drop the slot the policy
   scores lowest (ties: the oldest). The budget grows by at most one per token, so at most
   one slot is dropped per step, and the cache holds ``min(t + 1, budget(t + 1))`` slots
   after token t (``budget(t + 1) + 1`` transiently during step 2).

``budget(n) = min(n, max(min_slots, ceil(n / ratio)))``: the cache grows ``ratio`` times
slower than a full one, like DMC's. Policy scores (lowest is evicted):

* ``"h2o"`` (Zhang et al. 2023, heavy hitters): each slot's attention mass accumulated over
  all queries so far (including the current one; a KV head's mass is the mean over its
  query-head group). The ``recent = budget - floor(heavy_fraction * budget)`` newest
  positions are never evicted; the others compete on accumulated mass.
* ``"tova"`` (Oren et al. 2024): the current query's attention weights averaged over all
  query heads of the layer; one position is dropped for every KV head alike (per-layer
  eviction as in the paper). The new token itself may be dropped.
* ``"streaming"`` (Xiao et al. 2023, StreamingLLM): the first ``sinks`` positions are never
  evicted; otherwise the oldest slot goes. ``min_slots`` defaults to ``sinks + 1`` so the
  sinks always fit.

With tensor parallelism each rank sees its own heads only (TOVA then averages the local
heads); evaluate at TP=1 for the paper's definitions.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

H2O = "h2o"
TOVA = "tova"
STREAMING = "streaming"
POLICIES = (H2O, TOVA, STREAMING)


@dataclass(frozen=True)
class EvictionPolicy:
    """One eviction baseline at one compression ratio (see module docstring).

    name: ``"h2o"``, ``"tova"`` or ``"streaming"``.
    ratio: >= 1; after n tokens a KV head holds at most ``budget(n)`` slots.
    sinks: streaming's always-kept first positions (attention sinks).
    heavy_fraction: h2o's share of the budget for heavy hitters (the rest is the recent window).
    min_slots: budget floor (``None``: ``sinks + 1`` for streaming, else 1).
    """

    name: str
    ratio: float
    sinks: int = 4
    heavy_fraction: float = 0.5
    min_slots: Optional[int] = None

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"eviction policy name must be one of {POLICIES}, got {self.name!r}")
        if not self.ratio >= 1:
            raise ValueError(f"eviction policy ratio must be >= 1, got {self.ratio}")
        if self.sinks < 0:
            raise ValueError(f"eviction policy sinks must be >= 0, got {self.sinks}")
        if not 0 <= self.heavy_fraction < 1:
            raise ValueError("eviction policy heavy_fraction must be in [0, 1) (h2o keeps a "
                             f"recent window of at least one token), got {self.heavy_fraction}")
        if self.min_slots is not None and self.min_slots < 1:
            raise ValueError(f"eviction policy min_slots must be >= 1, got {self.min_slots}")
        if self.name == STREAMING and self.floor <= self.sinks:
            raise ValueError(f"streaming needs min_slots > sinks ({self.sinks}) so the sinks "
                             f"and the newest token fit, got min_slots={self.min_slots}")

    @property
    def floor(self) -> int:
        """The budget floor actually used (``min_slots`` or its default)."""
        if self.min_slots is not None:
            return self.min_slots
        return self.sinks + 1 if self.name == STREAMING else 1

    def budget(self, tokens: int) -> int:
        """Slots a KV head may hold after ``tokens`` tokens."""
        # round() guards ceil against float error when tokens / ratio is an integer.
        return min(tokens, max(self.floor, math.ceil(round(tokens / self.ratio, 9))))

    def recent_window(self, budget: int) -> int:
        """h2o's protected recent window for a budget (the rest are heavy hitters)."""
        return budget - math.floor(self.heavy_fraction * budget)


def evicted_attention(query: Tensor, key: Tensor, value: Tensor, policy: EvictionPolicy,
                      scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Causal attention through an evicting KV cache, simulated step by step.

    Args:
        query: ``[b, hq, s, d]``; key, value: ``[b, hk, s, d]`` (RoPE applied; query heads
            ``j * hq/hk ...`` belong to KV head j, megatron's GQA layout).
        scale: softmax scale (default ``d ** -0.5``).

    Returns:
        ``(output [b, hq, s, d_v], kept [b, hk, s])``: kept[..., t] is the number of slots held
        after token t. Computed in at least fp32, returned in ``query.dtype``.
    """
    b, hq, s, d = query.shape
    hk = key.shape[1]
    if hq % hk:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hk})")
    group = hq // hk
    scale = d ** -0.5 if scale is None else scale
    dtype = torch.promote_types(query.dtype, torch.float32)
    q = query.to(dtype).reshape(b, hk, group, s, d) * scale
    k, v = key.to(dtype), value.to(dtype)
    positions = torch.arange(s, device=key.device)
    cached = torch.zeros(b, hk, s, dtype=torch.bool, device=key.device)
    mass = torch.zeros(b, hk, s, dtype=dtype, device=key.device)  # h2o's accumulated attention
    outputs, kept = [], []
    for t in range(s):
        n = t + 1
        cached[..., t] = True
        live = cached[..., :n]
        logits = torch.einsum("bkgd,bksd->bkgs", q[:, :, :, t], k[:, :, :n])
        probs = logits.masked_fill(~live[:, :, None], float("-inf")).softmax(dim=-1)
        outputs.append(torch.einsum("bkgs,bksd->bkgd", probs, v[:, :, :n]))
        held = min(t, policy.budget(t)) + 1
        budget = policy.budget(n)
        if policy.name == H2O:
            mass[..., :n] += probs.mean(dim=2)
        if held > budget:
            score, evictable = _eviction_scores(policy, probs, mass[..., :n], live,
                                                positions[:n], budget)
            victim = score.masked_fill(~evictable, float("inf")).argmin(dim=-1, keepdim=True)
            cached.scatter_(-1, victim, False)
        kept.append(cached.sum(dim=-1))
    out = torch.stack(outputs, dim=3).reshape(b, hq, s, value.shape[-1])
    return out.to(query.dtype), torch.stack(kept, dim=-1)


def _eviction_scores(policy: EvictionPolicy, probs: Tensor, mass: Tensor, live: Tensor,
                     positions: Tensor, budget: int) -> tuple[Tensor, Tensor]:
    """``(score, evictable)``, both ``[b, hk, n]``: the policy evicts the lowest score."""
    n = positions.shape[0]
    if policy.name == H2O:
        return mass, live & (positions < n - policy.recent_window(budget))
    if policy.name == TOVA:
        layer = probs.mean(dim=(1, 2), keepdim=True).squeeze(2)  # [b, 1, n]
        return layer.expand_as(live), live
    return positions.float().expand_as(live), live & (positions >= policy.sinks)


def policy_core_attention(module: nn.Module, query: Tensor, key: Tensor,
                          value: Tensor) -> Tensor:
    """Core attention of a ``DMCSelfAttention`` whose ``kv_policy`` is set.

    q ``[s, b, hq, d]``, k/v ``[s, b, hk, d]`` (after RoPE) -> ``[s, b, hq * d]``; stores the
    kept counts ``[b, hk, s]`` as ``module.last_kept``. Causal; explicit masks are ignored.
    """
    scale = getattr(module.core_attention, "softmax_scale", None)
    out, kept = evicted_attention(query.permute(1, 2, 0, 3), key.permute(1, 2, 0, 3),
                                  value.permute(1, 2, 0, 3), module.kv_policy, scale)
    module.last_kept = kept
    s, b = query.shape[0], query.shape[1]
    return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def _attention_modules(model: nn.Module) -> list:
    from nemo_dmc.megatron.stats import dmc_attention_modules

    modules = list(dmc_attention_modules(model))
    if not modules:
        raise ValueError("the model has no DMCSelfAttention layers: build it with "
                         "nemo_dmc.megatron.model.build_model(model_config, DMCConfig())")
    return modules


@contextmanager
def kv_policy(model: nn.Module, policy: Optional[EvictionPolicy]) -> Iterator[None]:
    """Run every DMC layer of ``model`` as plain attention (no DMC decisions, channel D-1
    used as is) through ``policy``'s evicting cache (``None``: full attention); restore the
    previous modes on exit. Each forward leaves ``module.last_kept`` (see
    :func:`policy_core_attention`) for :func:`realised_ratio`."""
    from nemo_dmc.megatron.attention import ZERO_OUT_MODE

    modules = _attention_modules(model)
    saved = [(m.dmc_mode, m.zero_out_scale, m.kv_policy) for m in modules]
    for m in modules:
        m.dmc_mode, m.zero_out_scale, m.kv_policy = ZERO_OUT_MODE, 1.0, policy
        m.last_kept = None
    try:
        yield
    finally:
        for m, (mode, scale, previous) in zip(modules, saved):
            m.dmc_mode, m.zero_out_scale, m.kv_policy = mode, scale, previous


def realised_ratio(model: nn.Module) -> float:
    """Tokens / slots held after the last position, averaged over batch, layers and KV
    heads, of the model's last forward under :func:`kv_policy` with a policy."""
    kept = [m.last_kept for m in _attention_modules(model)
            if getattr(m, "last_kept", None) is not None]
    if not kept:
        raise ValueError("no kept-slot counts: run a forward inside kv_policy(model, policy) "
                         "with a policy first")
    slots = torch.stack([k[..., -1].float().mean() for k in kept]).mean()
    return float(kept[0].shape[-1] / slots)
