"""Cache policies: how one layer's attention reads and writes the paged cache at inference,
chosen from the layer's KV method (:func:`policy_for`).

Every policy takes one :class:`~nemo_dmc.kvcache.view.LayerCacheView` and pre-RoPE
``query [b, hq, c, d]``, ``key``/``value`` ``[b, hk, c, d]``, and returns ``[b, hq, c, d]``:

* :meth:`CachePolicy.prefill`: a chunk of ``counts[b] <= c`` tokens per row at ``positions
  [b, c]`` (right padded), appended after what the rows cache;
* :meth:`CachePolicy.decode`: one token per row (``c = 1``).

Both also take ``signals [b, hk, c, n]``: the layer's decision-adapter signals when its
method has an adapter (:attr:`~nemo_dmc.methods.KVMethod.adapter_outputs`), else ``None``.

Policies: :class:`DMCPolicy` (``dmc``: :mod:`nemo_dmc.kvcache.attention`), :class:`VanillaPolicy`
(``vanilla``: append-only plain attention), :class:`EvictionPolicy` (every
:class:`~nemo_dmc.methods.eviction.EvictionMethod`: plain attention through the method's
evicting cache, its own ``scores`` and ``budget``, blocks freed as heads shrink) and
:class:`DMSPolicy` (``dms``: each head's window plus the tokens that survived leaving it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from nemo_dmc.core import DMCConfig, RoPE, attended_rope, dmc_attention, zeroes_after_rope
from nemo_dmc.kernels import dispatch, references
from nemo_dmc.kvcache import ops
from nemo_dmc.kvcache.attention import decode_attention, prefill_attention, rotate
from nemo_dmc.kvcache.view import LayerCacheView
from nemo_dmc.methods import (
    DMCMethod,
    DMCPhase,
    DMSMethod,
    EvictionMethod,
    KVMethod,
    VanillaMethod,
    simulate_eviction,
)
from nemo_dmc.methods.dms import eviction_decisions
from nemo_dmc.methods.eviction import choose_victims


@dataclass
class DecodeStep:
    """What one decode step shares over all layers: the RoPE at this step's positions and a
    bound of every head's length known without a device sync (sizes the Triton splits)."""

    tables: references.RopeTables
    max_slots: int


def _attend_slots_and_new_token(view: LayerCacheView, slots: tuple[Tensor, Tensor, Tensor],
                                query: Tensor, key: Tensor, value: Tensor,
                                scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Decode attention of rotated ``query [b, hq, d]`` over each head's ``t`` cached slots
    (``slots``: :meth:`LayerCacheView.slot_index`) plus the new token (``key``/``value``
    ``[b, hk, d]``, as stored), in >= fp32.

    Returns ``(out [b, hk, group, d], probs [b, hk, group, t + 1], live [b, hk, t + 1])``;
    candidate ``t`` is the new token.
    """
    b, hq, d = query.shape
    hk = key.shape[1]
    cache = view.cache
    block, offset, valid = slots
    dtype = torch.promote_types(query.dtype, torch.float32)
    keys = torch.cat([cache.key_pool[block, offset], key.unsqueeze(2)], dim=2)
    values = torch.cat([cache.value_pool[block, offset], value.unsqueeze(2)], dim=2)
    live = F.pad(valid, (0, 1), value=True)
    q = query.to(dtype).view(b, hk, hq // hk, d) * scale
    logits = torch.einsum("bkgd,bktd->bkgt", q, keys.to(dtype))
    probs = logits.masked_fill(~live.unsqueeze(2), float("-inf")).softmax(dim=-1)
    return torch.einsum("bkgt,bktd->bkgd", probs, values.to(dtype)), probs, live


class CachePolicy:
    """One layer's attention against the paged cache (see module docstring).

    ``open_runs`` / ``slot_scores``: what the cache must keep for this policy (see
    :class:`~nemo_dmc.kvcache.paged.CacheLayout`).
    """

    open_runs: ClassVar[bool] = False
    slot_scores: ClassVar[bool] = False
    window: Optional[int] = None

    def prefill(self, view: LayerCacheView, query: Tensor, key: Tensor, value: Tensor,
                positions: Tensor, counts: Tensor, rope: Optional[RoPE], scale: float,
                signals: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError

    def decode(self, view: LayerCacheView, query: Tensor, key: Tensor, value: Tensor,
               positions: Tensor, rope: Optional[RoPE], scale: float,
               step: DecodeStep, signals: Optional[Tensor] = None) -> Tensor:
        raise NotImplementedError

    def blocks_for_next_token(self, view: LayerCacheView) -> int:
        """Blocks the next decode token of the view's rows may take from the pool."""
        return view.blocks_for_next_token()


class DMCPolicy(CachePolicy):
    """DMC: merge or append per head, attend over each head's slots (numerics of
    :mod:`nemo_dmc.kvcache.attention`, Triton decode on CUDA)."""

    open_runs = True

    def __init__(self, config: DMCConfig) -> None:
        self.config = config
        self.window = config.window

    def prefill(self, view, query, key, value, positions, counts, rope, scale, signals=None):
        return prefill_attention(view.cache, view.layer, view.rows, query, key, value,
                                 positions, counts, self.config, rope, scale, signals)

    def decode(self, view, query, key, value, positions, rope, scale, step, signals=None):
        return decode_attention(view.cache, view.layer, view.rows, query, key, value, positions,
                                self.config, rope, scale, step.tables, step.max_slots, signals)


class VanillaPolicy(CachePolicy):
    """Plain attention with a full cache: every token appends a slot (channel D-1 used as is)."""

    def prefill(self, view, query, key, value, positions, counts, rope, scale, signals=None):
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

    def decode(self, view, query, key, value, positions, rope, scale, step, signals=None):
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
    :func:`~nemo_dmc.methods.eviction.evicted_attention` simulates it: the new token joins
    the head's slots, the query attends to them all, and while that is more than
    ``budget(tokens)`` slots the one :func:`~nemo_dmc.methods.eviction.choose_victims` picks
    (the method's own ``scores``) is dropped; the new token then takes the dropped slot's
    place, or a new slot if the head was under budget. A head thus holds ``ceil(budget(n) /
    block_size)`` blocks after ``n`` tokens, never more.

    Prefill of rows that cache nothing yet runs the parallel simulator and keeps its final
    slots; a chunk continuing cached rows goes token by token through the decode step.
    """

    slot_scores = True

    def __init__(self, method: EvictionMethod) -> None:
        self.method = method

    def prefill(self, view, query, key, value, positions, counts, rope, scale, signals=None):
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

    def decode(self, view, query, key, value, positions, rope, scale, step, signals=None):
        query, key = rotate(rope, query, positions), rotate(rope, key, positions)
        return self._step(view, query[:, :, 0], key[:, :, 0], value[:, :, 0], positions[:, 0],
                          scale).unsqueeze(2)

    def blocks_for_next_token(self, view):
        tokens = view.cache.positions[view.rows] + 1
        return view.blocks_for_next_token(view.lengths < self._budgets(tokens).unsqueeze(1))

    def _budgets(self, tokens: Tensor) -> Tensor:
        """``[b]`` slots a head may hold after ``tokens [b]`` tokens."""
        budget = self.method.settings.budget
        return torch.tensor([budget(n) for n in tokens.tolist()], dtype=torch.int64,
                            device=tokens.device)

    def _step(self, view: LayerCacheView, query: Tensor, key: Tensor, value: Tensor,
              positions: Tensor, scale: float) -> Tensor:
        """One token per row: rotated ``query [b, hq, d]``, ``key``/``value`` ``[b, hk, d]``
        at ``positions [b]`` -> ``[b, hq, d]``."""
        b, hq, d = query.shape
        hk = key.shape[1]
        cache = view.cache
        block, offset, valid = view.slot_index()  # the head's cached slots, t of them
        t = valid.shape[-1]
        key, value = key.to(cache.layout.dtype), value.to(cache.layout.dtype)  # as stored
        out, probs, live = _attend_slots_and_new_token(view, (block, offset, valid), query, key,
                                                       value, scale)
        mass = F.pad(cache.slot_mass[block, offset].to(probs.dtype), (0, 1))
        if self.method.accumulates_mass:
            mass = mass + probs.mean(dim=2)
            cache.slot_mass[block[valid], offset[valid]] = mass[..., :t][valid].float()
        slot_positions = torch.cat([cache.slot_positions[block, offset].masked_fill(~valid, -1),
                                    positions.view(b, 1, 1).expand(b, hk, 1)], dim=-1)
        lengths = view.lengths
        budgets = self._budgets(positions + 1)
        evict = lengths + 1 > budgets.unsqueeze(1)
        victims = torch.full_like(lengths, t)
        for budget in budgets[evict.any(dim=1)].unique().tolist():
            rows = budgets == budget
            victims[rows] = choose_victims(self.method, probs[rows], mass[rows], live[rows],
                                           slot_positions[rows], budget).squeeze(-1)
        view.append(key.unsqueeze(2), value.unsqueeze(2), (~evict).unsqueeze(-1),
                    positions.view(b, 1), mass[..., t:])
        view.overwrite(victims, evict & (victims < t), key, value, positions, mass[..., t])
        return out.reshape(b, hq, d).to(query.dtype)


class DMSPolicy(CachePolicy):
    """DMS: each head holds its window (last ``w`` tokens) plus the older tokens that were not
    marked for eviction, exactly as :func:`~nemo_dmc.methods.dms_reference.simulate_dms`.

    Slots sit in the per-head paged pool, keys rotated at their own position, so slot order
    does not matter to attention. Beside each slot the cache keeps its token position and its
    decision (``slot_positions``; ``slot_mass`` holds 1.0 = marked for eviction). Token ``t``
    joins the head's slots and its queries attend to them all; then token ``t - w`` leaves the
    window: if marked, token ``t`` takes its slot, else token ``t`` appends one. A head thus
    holds ``min(n, w) + survivors`` slots after ``n`` tokens and blocks only for those.
    Prefill is one parallel pass per chunk (the training form with hard decisions; queries
    also see the cached slots still visible to them); the heads are then rewritten with the
    slots kept after the chunk, so blocks of slots that left the window are returned to the
    pool. Decode is pure torch (gather + softmax) like the eviction policies'.
    """

    slot_scores = True

    def __init__(self, method: DMSMethod) -> None:
        self.method = method
        self.dms_window = method.settings.window

    def _decide(self, query: Tensor, key: Tensor, positions: Tensor, rope: Optional[RoPE],
                signals: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Pre-RoPE q/k (and adapter signals) -> ``(evict [b, hk, c] bool, query, key)`` with
        hard decisions, q/k rotated at ``positions`` as attention sees them."""
        settings = self.method.settings
        logits, query, key = self.method.decision_logits(query, key, signals)
        evict = eviction_decisions(logits, settings, training=False).hard > 0
        rope = attended_rope(rope, zeroes_after_rope(settings))
        return evict, rotate(rope, query, positions), rotate(rope, key, positions)

    def prefill(self, view, query, key, value, positions, counts, rope, scale, signals=None):
        evict, query, key = self._decide(query, key, positions, rope, signals)
        w, hard_bias = self.dms_window, self.method.settings.hard_bias
        bias = evict.to(torch.float32) * hard_bias
        idx = torch.arange(key.shape[2], device=key.device)
        last = positions[:, :1] + counts.view(-1, 1) - 1  # [b, 1] the row's last position
        keep = (idx < counts.view(-1, 1, 1)) & ((last.unsqueeze(-1) + 1 - positions.unsqueeze(1)
                                                 <= w) | ~evict)
        if view.fresh:
            out = dmc_attention(query, key, value, bias, scale, bias_window=w)
            view.append(key, value, keep, positions, evict.float())
            return out.to(query.dtype)
        cache = view.cache
        block, offset, valid = view.slot_index()
        prior_k, prior_v = cache.key_pool[block, offset], cache.value_pool[block, offset]
        prior_pos = cache.slot_positions[block, offset]
        marked = cache.slot_mass[block, offset] > 0
        gone = (positions[:, None, :, None] - prior_pos.unsqueeze(2) > w) & marked.unsqueeze(2)
        prior_bias = torch.where(gone, hard_bias, 0.0).masked_fill(~valid.unsqueeze(2),
                                                                   float("-inf"))
        out = ops.prefix_chunk_attention(query, prior_k, prior_v, prior_bias, key, value, bias,
                                         scale, bias_window=w)
        prior_keep = valid & ((last.unsqueeze(-1) + 1 - prior_pos <= w) | ~marked)
        b, hk = valid.shape[:2]
        cache.release_heads(view.rows, view.layer)  # rewrite each head with its kept slots
        view.append(torch.cat([prior_k, key.to(prior_k.dtype)], dim=2),
                    torch.cat([prior_v, value.to(prior_v.dtype)], dim=2),
                    torch.cat([prior_keep, keep], dim=2),
                    torch.cat([prior_pos, positions.unsqueeze(1).expand(b, hk, -1)], dim=2),
                    torch.cat([marked, evict], dim=2).float())
        return out

    def decode(self, view, query, key, value, positions, rope, scale, step, signals=None):
        evict, query, key = self._decide(query, key, positions, rope, signals)
        return self._step(view, query[:, :, 0], key[:, :, 0], value[:, :, 0], evict[:, :, 0],
                          positions[:, 0], scale).unsqueeze(2)

    def blocks_for_next_token(self, view):
        leaving = self._leaving(view, view.cache.positions[view.rows])
        return view.blocks_for_next_token(~leaving.any(dim=-1))

    def _leaving(self, view: LayerCacheView, positions: Tensor,
                 slots: Optional[tuple[Tensor, Tensor, Tensor]] = None) -> Tensor:
        """``[b, hk, t]``: the slot of token ``positions - w`` if it is marked for eviction
        (it leaves the window when the token at ``positions [b]`` is processed)."""
        block, offset, valid = view.slot_index() if slots is None else slots
        cache = view.cache
        oldest = (positions - self.dms_window).view(-1, 1, 1)
        return valid & (cache.slot_positions[block, offset] == oldest) & (
            cache.slot_mass[block, offset] > 0)

    def _step(self, view: LayerCacheView, query: Tensor, key: Tensor, value: Tensor,
              evict: Tensor, positions: Tensor, scale: float) -> Tensor:
        """One token per row: rotated ``query [b, hq, d]``, ``key``/``value`` ``[b, hk, d]``,
        decisions ``evict [b, hk]`` at ``positions [b]`` -> ``[b, hq, d]``."""
        b, hq, d = query.shape
        key, value = key.to(view.layout.dtype), value.to(view.layout.dtype)  # as stored
        slots = view.slot_index()
        out, _, _ = _attend_slots_and_new_token(view, slots, query, key, value, scale)
        leaving = self._leaving(view, positions, slots)
        reuse = leaving.any(dim=-1)  # [b, hk]: token t takes the leaving token's slot
        flag = evict.float()
        if not view.append(key.unsqueeze(2), value.unsqueeze(2), (~reuse).unsqueeze(-1),
                           positions.view(b, 1), flag.unsqueeze(-1)):
            return torch.zeros_like(query)  # pool exhausted: cache.overflow is set
        view.overwrite(leaving.to(torch.int64).argmax(dim=-1), reuse, key, value, positions,
                       flag)
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
    if isinstance(method, DMSMethod):
        if method.phase is not DMCPhase.DECIDE:
            raise ValueError(f"the dms method is in the {method.phase.value} phase; inference "
                             "needs the decide phase")
        return DMSPolicy(method)
    if isinstance(method, EvictionMethod):
        return EvictionPolicy(method)
    if isinstance(method, VanillaMethod):
        return VanillaPolicy()
    raise ValueError(f"KV method {method.name!r} has no inference cache policy "
                     "(nemo_dmc.kvcache.policies.policy_for)")
