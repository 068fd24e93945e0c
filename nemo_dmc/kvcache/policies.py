"""Cache policies: how one layer's attention reads and writes the paged cache at inference,
chosen from the layer's KV method (:func:`policy_for`).

Every policy takes one :class:`~nemo_dmc.kvcache.view.LayerCacheView` and pre-RoPE
``query [b, hq, c, d]``, ``key``/``value`` ``[b, hk, c, d]``, and returns ``[b, hq, c, d]``:

* :meth:`CachePolicy.prefill`: a chunk of ``counts[b] <= c`` tokens per row at ``positions
  [b, c]`` (right padded), appended after what the rows cache;
* :meth:`CachePolicy.decode`: one token per row (``c = 1``).

Policies: :class:`DMCPolicy` (``dmc``: :mod:`nemo_dmc.kvcache.attention`), :class:`VanillaPolicy`
(``vanilla``: append-only plain attention) and :class:`EvictionPolicy` (every
:class:`~nemo_dmc.methods.eviction.EvictionMethod`: plain attention through the method's
evicting cache, its own ``scores`` and ``budget``, blocks freed as heads shrink).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Optional

import torch
from torch import Tensor

from nemo_dmc.core import DMCConfig, RoPE
from nemo_dmc.kernels import dispatch, references
from nemo_dmc.kvcache import ops
from nemo_dmc.kvcache.attention import decode_attention, prefill_attention, rotate
from nemo_dmc.kvcache.view import LayerCacheView
from nemo_dmc.methods import (
    DMCMethod,
    DMCPhase,
    EvictionMethod,
    KVMethod,
    VanillaMethod,
    simulate_eviction,
)
from nemo_dmc.methods.eviction import choose_victims


@dataclass
class DecodeStep:
    """What one decode step shares over all layers: the RoPE at this step's positions and a
    bound of every head's length known without a device sync (sizes the Triton splits)."""

    tables: references.RopeTables
    max_slots: int


class CachePolicy:
    """One layer's attention against the paged cache (see module docstring).

    ``open_runs`` / ``slot_scores``: what the cache must keep for this policy (see
    :class:`~nemo_dmc.kvcache.paged.CacheLayout`).
    """

    open_runs: ClassVar[bool] = False
    slot_scores: ClassVar[bool] = False
    window: Optional[int] = None

    def prefill(self, view: LayerCacheView, query: Tensor, key: Tensor, value: Tensor,
                positions: Tensor, counts: Tensor, rope: Optional[RoPE], scale: float) -> Tensor:
        raise NotImplementedError

    def decode(self, view: LayerCacheView, query: Tensor, key: Tensor, value: Tensor,
               positions: Tensor, rope: Optional[RoPE], scale: float,
               step: DecodeStep) -> Tensor:
        raise NotImplementedError


class DMCPolicy(CachePolicy):
    """DMC: merge or append per head, attend over each head's slots (numerics of
    :mod:`nemo_dmc.kvcache.attention`, Triton decode on CUDA)."""

    open_runs = True

    def __init__(self, config: DMCConfig) -> None:
        self.config = config
        self.window = config.window

    def prefill(self, view, query, key, value, positions, counts, rope, scale):
        return prefill_attention(view.cache, view.layer, view.rows, query, key, value,
                                 positions, counts, self.config, rope, scale)

    def decode(self, view, query, key, value, positions, rope, scale, step):
        return decode_attention(view.cache, view.layer, view.rows, query, key, value, positions,
                                self.config, rope, scale, step.tables, step.max_slots)


class VanillaPolicy(CachePolicy):
    """Plain attention with a full cache: every token appends a slot (channel D-1 used as is)."""

    def prefill(self, view, query, key, value, positions, counts, rope, scale):
        b, hk, c, d = key.shape
        query, key = rotate(rope, query, positions), rotate(rope, key, positions)
        if view.fresh:
            prior_k = prior_v = key.new_zeros(b, hk, 0, d)
            valid = torch.zeros(b, hk, 0, dtype=torch.bool, device=key.device)
        else:
            prior_k, prior_v, valid = references.gather_slots(
                view.cache.key_pool, view.cache.value_pool, view.block_tables, view.lengths)
        prior_bias = torch.zeros(valid.shape, device=key.device).masked_fill(~valid, float("-inf"))
        out = ops.prefix_chunk_attention(query, prior_k, prior_v, prior_bias, key, value,
                                         key.new_zeros(b, hk, c), scale)
        real = torch.arange(c, device=key.device) < counts.view(b, 1, 1)
        view.append(key, value, real.expand(b, hk, c))
        return out

    def decode(self, view, query, key, value, positions, rope, scale, step):
        query, key = rotate(rope, query, positions), rotate(rope, key, positions)
        if not view.append(key, value, torch.ones(key.shape[:3], dtype=torch.bool,
                                                  device=key.device)):
            return torch.zeros_like(query)  # pool exhausted: cache.overflow is set
        out = dispatch.paged_decode_attention(query[:, :, 0], view.cache.key_pool,
                                              view.cache.value_pool, view.block_tables,
                                              view.lengths, scale, view.cache.workspace,
                                              step.max_slots)
        return out.unsqueeze(2).to(query.dtype)


class EvictionPolicy(CachePolicy):
    """Plain attention through an eviction method's cache, exactly as
    :func:`~nemo_dmc.methods.eviction.evicted_attention` simulates it: insert, attend, then
    evict the slot :func:`~nemo_dmc.methods.eviction.choose_victims` picks while a head holds
    more than ``budget(tokens)`` slots. Blocks are taken as heads grow and returned as they
    shrink, so a head holds ``ceil(budget(n) / block_size)`` blocks after ``n`` tokens.

    Prefill of rows that cache nothing yet runs the parallel simulator and keeps its final
    slots; a chunk continuing cached rows goes token by token through the decode step.
    """

    slot_scores = True

    def __init__(self, method: EvictionMethod) -> None:
        self.method = method

    def prefill(self, view, query, key, value, positions, counts, rope, scale):
        query, key = rotate(rope, query, positions), rotate(rope, key, positions)
        if view.fresh:
            out, _, state = simulate_eviction(query, key, value, self.method, scale, counts)
            view.append(key, value, state.cached, positions, state.mass)
            return out
        out = torch.zeros_like(query)
        for i in range(query.shape[2]):
            active = counts > i
            sub = view.select(active)
            out[active, :, i] = self._step(sub, query[active, :, i], key[active, :, i],
                                           value[active, :, i], positions[active, i], scale)
        return out

    def decode(self, view, query, key, value, positions, rope, scale, step):
        query, key = rotate(rope, query, positions), rotate(rope, key, positions)
        return self._step(view, query[:, :, 0], key[:, :, 0], value[:, :, 0], positions[:, 0],
                          scale).unsqueeze(2)

    def _step(self, view: LayerCacheView, query: Tensor, key: Tensor, value: Tensor,
              positions: Tensor, scale: float) -> Tensor:
        """One token per row: rotated ``query [b, hq, d]``, ``key``/``value`` ``[b, hk, d]``
        at ``positions [b]`` -> ``[b, hq, d]``."""
        b, hq, d = query.shape
        hk = key.shape[1]
        keep = torch.ones(b, hk, 1, dtype=torch.bool, device=key.device)
        if not view.append(key.unsqueeze(2), value.unsqueeze(2), keep, positions.view(b, 1)):
            return torch.zeros_like(query)  # pool exhausted: cache.overflow is set
        cache = view.cache
        block, offset, valid = view.slot_index()
        dtype = torch.promote_types(query.dtype, torch.float32)
        keys, values = cache.key_pool[block, offset].to(dtype), cache.value_pool[block, offset]
        q = query.to(dtype).view(b, hk, hq // hk, d) * scale
        logits = torch.einsum("bkgd,bktd->bkgt", q, keys)
        probs = logits.masked_fill(~valid.unsqueeze(2), float("-inf")).softmax(dim=-1)
        out = torch.einsum("bkgt,bktd->bkgd", probs, values.to(dtype))
        mass = cache.slot_mass[block, offset].to(dtype)
        if self.method.accumulates_mass:
            mass = mass + probs.mean(dim=2)
            cache.slot_mass[block[valid], offset[valid]] = mass[valid].float()
        slot_positions = cache.slot_positions[block, offset].masked_fill(~valid, -1)
        lengths = view.lengths
        budgets = torch.tensor([self.method.settings.budget(n) for n in (positions + 1).tolist()],
                               device=lengths.device)
        for budget in budgets.unique().tolist():
            rows = budgets == budget
            evict = rows.unsqueeze(1) & (lengths > budget)
            if not bool(evict.any()):
                continue
            victims = torch.zeros_like(lengths)
            victims[rows] = choose_victims(self.method, probs[rows], mass[rows], valid[rows],
                                           slot_positions[rows], budget).squeeze(-1)
            view.evict(victims, evict)
        return out.reshape(b, hq, d).to(query.dtype)


def policy_for(method: KVMethod, force_decision: Optional[str] = None) -> CachePolicy:
    """The cache policy of a layer's method object (``force_decision``: DMC only, see
    :class:`~nemo_dmc.core.DMCConfig`)."""
    if force_decision is not None and not isinstance(method, DMCMethod):
        raise ValueError(f"engine.force_decision={force_decision!r} applies to the dmc method "
                         f"only, not {method.name!r}")
    if isinstance(method, DMCMethod):
        if method.phase is not DMCPhase.DECIDE:
            raise ValueError(f"the dmc method is in the {method.phase.value} phase; inference "
                             "needs the decide phase")
        config = method.settings
        return DMCPolicy(config if force_decision is None
                         else replace(config, force_decision=force_decision))
    if isinstance(method, EvictionMethod):
        return EvictionPolicy(method)
    if isinstance(method, VanillaMethod):
        return VanillaPolicy()
    raise ValueError(f"KV method {method.name!r} has no inference cache policy "
                     "(nemo_dmc.kvcache.policies.policy_for)")
