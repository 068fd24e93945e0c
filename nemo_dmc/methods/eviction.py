"""Training-free KV-cache eviction at a compression ratio: the shared simulator and settings.

A policy (``h2o``, ``tova``, ``streaming``: one file each) only says which slot to drop. A
causal layer's inputs at position t depend only on positions <= t, so simulating the evicting
cache token by token *inside* each layer's attention, from the full q/k/v of one forward pass,
gives exactly what token-by-token decoding with that cache would compute.

Cache protocol, per sequence and KV head, for token t (0-based; t+1 tokens seen after it):

1. insert: (k_t, v_t) enters the cache;
2. attend: query t attends to every cached slot (so the current token is always attended);
3. evict: while the cache holds more than ``budget(t + 1)`` slots, drop the slot the policy
   scores lowest (ties: the oldest). The budget grows by at most one per token, so at most
   one slot is dropped per step, and the cache holds ``min(t + 1, budget(t + 1))`` slots
   after token t (``budget(t + 1) + 1`` transiently during step 2).

``budget(n) = min(n, max(floor, ceil(n / ratio)))``: the cache grows ``ratio`` times slower
than a full one, like DMC's. With tensor parallelism each rank sees its own heads only
(TOVA then averages the local heads); evaluate at TP=1 for the papers' definitions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from nemo_dmc.core.attention import Accumulate
from nemo_dmc.methods.base import KVMethod, LayerRecord, Noise, Prepared


@dataclass(frozen=True)
class EvictionSettings:
    """What every eviction policy shares.

    ratio: >= 1; after n tokens a KV head holds at most ``budget(n)`` slots.
    min_slots: budget floor (``None``: the policy's :meth:`default_floor`).
    """

    ratio: float = 4.0
    min_slots: Optional[int] = None

    def __post_init__(self) -> None:
        if not self.ratio >= 1:
            raise ValueError(f"eviction ratio must be >= 1, got {self.ratio}")
        if self.min_slots is not None and self.min_slots < 1:
            raise ValueError(f"eviction min_slots must be >= 1, got {self.min_slots}")

    def default_floor(self) -> int:
        return 1

    @property
    def floor(self) -> int:
        """The budget floor actually used (``min_slots`` or the policy's default)."""
        return self.min_slots if self.min_slots is not None else self.default_floor()

    def budget(self, tokens: int) -> int:
        """Slots a KV head may hold after ``tokens`` tokens."""
        # round() guards ceil against float error when tokens / ratio is an integer.
        return min(tokens, max(self.floor, math.ceil(round(tokens / self.ratio, 9))))


@dataclass
class EvictionRecord(LayerRecord):
    """An eviction layer's forward: ``kept`` ``[b, hk, s]`` slots held after each token."""

    kept: Tensor


class EvictionMethod(KVMethod):
    """Base of the eviction policies: plain attention through an evicting cache."""

    simulates_cache = True
    accumulates_mass = False  # whether :meth:`scores` needs the accumulated attention mass

    def prepare(self, query: Tensor, key: Tensor, value: Tensor, *, training: bool,
                noise: Noise, accumulate: Accumulate,
                signals: Optional[Tensor] = None) -> Prepared:
        return Prepared(query, key, value)

    def attend(self, query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
        out, kept = evicted_attention(query, key, value, self, scale)
        self.record = EvictionRecord(slots=kept[..., -1], kept=kept)
        return out

    def scores(self, probs: Tensor, mass: Tensor, live: Tensor, positions: Tensor,
               budget: int) -> Tuple[Tensor, Tensor]:
        """``(score, evictable)``, both ``[b, hk, n]``: the cache drops the lowest score.

        probs: ``[b, hk, group, n]`` the current query heads' attention weights; mass:
        ``[b, hk, n]`` attention accumulated so far (when ``accumulates_mass``); live:
        ``[b, hk, n]`` which candidates are cached; positions: each candidate's absolute
        position, ``[n]`` in the simulator (candidate i is position i) or ``[b, hk, n]`` in
        the paged cache (slots in any order, the same order in every KV head of a layer while
        they hold the same positions; -1 where not live); the current token is always the
        newest live candidate. budget: slots to keep.
        """
        raise NotImplementedError


def choose_victims(policy: EvictionMethod, probs: Tensor, mass: Tensor, live: Tensor,
                   positions: Tensor, budget: int) -> Tensor:
    """``[b, hk, 1]`` index of the candidate each KV head drops: ``policy``'s lowest score
    among the evictable ones, ties to the oldest position (arguments as
    :meth:`EvictionMethod.scores`)."""
    score, evictable = policy.scores(probs, mass, live, positions, budget)
    score = score.masked_fill(~evictable, float("inf"))
    lowest = score == score.amin(dim=-1, keepdim=True)
    oldest = torch.where(lowest, positions.expand_as(lowest), torch.iinfo(torch.int64).max)
    return oldest.argmin(dim=-1, keepdim=True)


@dataclass
class EvictionState:
    """The simulated cache after each sequence's last real token (all ``[b, hk, s]``):
    ``cached`` positions and their accumulated attention ``mass``."""

    cached: Tensor
    mass: Tensor


def evicted_attention(query: Tensor, key: Tensor, value: Tensor, policy: EvictionMethod,
                      scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Causal attention through ``policy``'s evicting KV cache, simulated step by step.

    Args:
        query: ``[b, hq, s, d]``; key, value: ``[b, hk, s, d]`` (RoPE applied; query heads
            ``j * hq/hk ...`` belong to KV head j, megatron's GQA layout).
        scale: softmax scale (default ``d ** -0.5``).

    Returns:
        ``(output [b, hq, s, d_v], kept [b, hk, s])``: kept[..., t] is the number of slots held
        after token t. Computed in at least fp32, returned in ``query.dtype``.
    """
    out, kept, _ = simulate_eviction(query, key, value, policy, scale)
    return out, kept


def simulate_eviction(query: Tensor, key: Tensor, value: Tensor, policy: EvictionMethod,
                      scale: Optional[float] = None, counts: Optional[Tensor] = None
                      ) -> tuple[Tensor, Tensor, EvictionState]:
    """:func:`evicted_attention`, also returning the :class:`EvictionState` after each
    sequence's ``counts[b]`` first tokens (default: all ``s``; later tokens are padding)."""
    b, hq, s, d = query.shape
    hk = key.shape[1]
    if hq % hk:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hk})")
    settings = policy.settings
    group = hq // hk
    scale = d ** -0.5 if scale is None else scale
    dtype = torch.promote_types(query.dtype, torch.float32)
    q = query.to(dtype).reshape(b, hk, group, s, d) * scale
    k, v = key.to(dtype), value.to(dtype)
    positions = torch.arange(s, device=key.device)
    cached = torch.zeros(b, hk, s, dtype=torch.bool, device=key.device)
    mass = torch.zeros(b, hk, s, dtype=dtype, device=key.device)
    last = (torch.full((b,), s - 1, device=key.device) if counts is None
            else counts.to(key.device) - 1).view(b, 1, 1)
    state = EvictionState(cached.clone(), mass.clone())
    outputs, kept = [], []
    for t in range(s):
        n = t + 1
        cached[..., t] = True
        live = cached[..., :n]
        logits = torch.einsum("bkgd,bksd->bkgs", q[:, :, :, t], k[:, :, :n])
        probs = logits.masked_fill(~live[:, :, None], float("-inf")).softmax(dim=-1)
        outputs.append(torch.einsum("bkgs,bksd->bkgd", probs, v[:, :, :n]))
        held = min(t, settings.budget(t)) + 1
        budget = settings.budget(n)
        if policy.accumulates_mass:
            mass[..., :n] += probs.mean(dim=2)
        if held > budget:
            victim = choose_victims(policy, probs, mass[..., :n], live, positions[:n], budget)
            cached.scatter_(-1, victim, False)
        kept.append(cached.sum(dim=-1))
        if counts is not None or t == s - 1:
            now = last == t
            state.cached = torch.where(now, cached, state.cached)
            state.mass = torch.where(now, mass, state.mass)
    out = torch.stack(outputs, dim=3).reshape(b, hq, s, value.shape[-1])
    return out.to(query.dtype), torch.stack(kept, dim=-1), state
