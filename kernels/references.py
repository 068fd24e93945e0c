"""PyTorch references of the decode-step kernels: the one-token cache update
(:func:`decode_cache_update`) and attention over the per-head paged cache
(:func:`paged_decode_attention`), with the types and helpers they take.

The Triton kernels beside them (:mod:`nemo_dmc.kernels.cache_update`,
:mod:`nemo_dmc.kernels.decode_attention`) compute the same; :mod:`nemo_dmc.kernels.dispatch`
picks one or the other. All decision, importance and accumulation math comes from
:mod:`nemo_dmc.core`; the cache itself is :class:`nemo_dmc.kvcache.paged.PagedKVCache`.

Shape letters: ``b`` sequences, ``hq`` query heads and ``hk`` KV heads (local to this
tensor-parallel rank), ``d`` head dim, ``e = 2d + 1`` a weighted entry
``[omega*k | omega*v | omega]`` (keys pre-RoPE, decision channel zeroed), ``r`` entries of an
open run (the merge window ``W``, or 1 for unbounded runs where the single entry is the
running sum), ``n`` blocks in the pool, ``bs`` block size, ``m`` blocks per head, ``t`` slots.

Open runs are kept in at least fp32 (like :func:`nemo_dmc.core.partial_accumulate`); an
unbounded run is ``[S | Z]`` with ``S = sum omega*[k|v]`` and ``Z = sum omega``; a windowed
run is a ring of the last ``W`` entries (zeros where the run is shorter) whose oldest entry
is at ``ring_next``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import torch
from torch import Tensor

from nemo_dmc.core import (
    DMCConfig,
    attended,
    decision_inputs,
    hard_merges,
    normalize_sums,
    source_logits,
    weighted_entries,
    zero_decision_channel,
)

Workspace = Union[Tuple[Tensor, Tensor], Callable[[int], Tuple[Tensor, Tensor]]]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of open runs and scores: at least fp32 (as core's accumulation)."""
    return torch.promote_types(dtype, torch.float32)


def weigh_chunk(query: Tensor, key: Tensor, value: Tensor, config: DMCConfig,
                signals: Optional[Tensor] = None) -> Tensor:
    """The weighted entries ``[b, hk, c, e]`` of a chunk (``query [b, hq, c, d]``; key,
    value ``[b, hk, c, d]`` pre-RoPE; ``signals [b, hk, c, 2]`` for the adapter source), as
    :func:`nemo_dmc.kvcache.ops.chunk_entries`."""
    _, omega = decision_inputs(query, key, config, signals)
    kv = torch.cat([attended(key, config), value], dim=-1)
    return weighted_entries(kv, omega)


def decode_merges(key: Tensor, positions: Tensor, config: DMCConfig,
                  signals: Optional[Tensor] = None) -> Tensor:
    """``[b, hk]`` bool hard decisions of one token per sequence (``key [b, hk, d]``
    pre-RoPE at ``positions [b]``; ``signals [b, hk, 2]`` for the adapter source):
    :func:`nemo_dmc.kvcache.ops.chunk_decisions`'s ``merge[..., 0]`` of a one-token
    chunk without its survival biases, which a decode step does not need (merge where
    the logit ``s * x - c > 0``, or as forced; position 0 appends)."""
    logits = source_logits(key, config, signals)
    return hard_merges(logits, config) & (positions != 0).unsqueeze(-1)


def advance_open_runs(open_runs: Tensor, ring_next: Tensor, entry: Tensor, merge: Tensor,
                      window: Optional[int]) -> Tuple[Tensor, Tensor]:
    """Incremental cache update of one token per head: ``S += omega*[k|v], Z += omega`` on
    merge, ``S = omega*[k|v], Z = omega`` on append (windowed: the new entry replaces the
    oldest of the ring, or resets it).

    Args:
        open_runs: ``[b, hk, r, e]``; ring_next: ``[b, hk]`` (windowed rings).
        entry: ``[b, hk, e]`` the new token's weighted entry; merge: ``[b, hk]`` bool.

    Returns:
        ``(open_runs, ring_next)`` after the token; the slot is ``normalize_sums(runs.sum(-2))``.
    """
    keep = merge.to(open_runs.dtype).view(*merge.shape, 1, 1)
    if window is None:
        return keep * open_runs + entry.unsqueeze(-2), ring_next
    index = ring_next * merge  # the oldest entry on merge, 0 on append (the run restarts)
    where = index.view(*index.shape, 1, 1).expand(*index.shape, 1, entry.shape[-1])
    runs = (open_runs * keep).scatter_(-2, where, entry.unsqueeze(-2))
    return runs, (index + 1) % window


@dataclass
class RopeTables:
    """RoPE at one position per sequence as ``y_j = x_j * cos_j + x_{partner_j} * sin_j``.

    cos, sin: ``[b, d]`` (>= fp32); partner: ``[b, d]`` int64 channel paired with ``j``.
    Every rotary embedding that rotates channel pairs (rotate-half, interleaved, partial)
    has this form; :func:`nemo_dmc.kvcache.ops.rope_tables` reads it off the model's own
    RoPE callable.
    """

    cos: Tensor
    sin: Tensor
    partner: Tensor


def attended_tables(tables: RopeTables, zero_after_rope: bool) -> RopeTables:
    """The tables of :func:`nemo_dmc.core.attended_rope`: with ``zero_after_rope``, output
    channel D-1 zeroed (``cos = sin = 0``), so whatever applies them (the decode kernels and
    these references) rotates and zeroes again in one step."""
    if not zero_after_rope:
        return tables
    return RopeTables(zero_decision_channel(tables.cos), zero_decision_channel(tables.sin),
                      tables.partner)


def apply_rope_tables(x: Tensor, tables: RopeTables) -> Tensor:
    """RoPE of ``x [b, h, d]`` (one position per sequence) computed in >= fp32, cast back."""
    dtype = tables.cos.dtype
    xf = x.to(dtype)
    mate = xf.gather(-1, tables.partner.unsqueeze(1).expand_as(x))
    return (xf * tables.cos.unsqueeze(1) + mate * tables.sin.unsqueeze(1)).to(x.dtype)


@dataclass
class FreeBlocks:
    """Blocks a decode step may take, prepared by the host
    (:class:`~nemo_dmc.kvcache.paged.PagedKVCache`).

    The ``k``-th block taken (``k`` counted by ``taken``, ``[1]`` int32, advanced by the
    update) is ``ids[top - 1 - k]``: the top of the cache's free stack. The host checks
    before the step that the stack holds enough blocks and pops ``taken`` blocks after it.
    """

    ids: Tensor
    top: int
    taken: Tensor


def decode_cache_update(query: Tensor, key: Tensor, value: Tensor, positions: Tensor,
                        rows: Tensor, open_runs: Tensor, ring_next: Tensor, lengths: Tensor,
                        block_tables: Tensor, key_pool: Tensor, value_pool: Tensor,
                        free: FreeBlocks, tables: RopeTables, config: DMCConfig,
                        window: Optional[int], signals: Optional[Tensor] = None) -> None:
    """One decode token per sequence into one layer's cache, in place: decide (hard, from
    ``s * k[D-1] - c``; position 0 appends), weigh (``omega`` from the group's mean ``q[D-1]``),
    append to or merge into the open run, write the open slot (key rotated at ``positions``,
    channel D-1 zeroed before RoPE, and after it when ``tables`` are :func:`attended_tables`)
    into its block, taking a new block from ``free`` when an
    append crosses into one, and advance the lengths. With ``decision_source="adapter"`` the
    decision and importance come from the adapter's ``signals [b, hk, 2]`` instead, and the
    key keeps channel D-1.

    Args:
        query: ``[b, hq, d]``; key, value: ``[b, hk, d]`` (pre-RoPE); positions, rows: ``[b]``.
        open_runs: ``[R, hk, r, e]``; ring_next, lengths: ``[R, hk]``; block_tables:
            ``[R, hk, m]`` (one layer's views of the cache, indexed by ``rows``).
        key_pool, value_pool: ``[n, bs, d]``; tables: RoPE at ``positions``.
    """
    d, bs = key.shape[-1], key_pool.shape[1]
    merge = decode_merges(key, positions, config, signals)
    entry = weigh_chunk(query.unsqueeze(2), key.unsqueeze(2), value.unsqueeze(2), config,
                        None if signals is None else signals.unsqueeze(2))
    runs, ring = advance_open_runs(open_runs.index_select(0, rows),
                                   ring_next.index_select(0, rows), entry[..., 0, :], merge,
                                   window)
    open_runs.index_copy_(0, rows, runs)
    if window is not None:
        ring_next.index_copy_(0, rows, ring)
    slot = normalize_sums(runs.sum(-2))  # [b, hk, 2d]
    keys = apply_rope_tables(slot[..., :d], tables)
    # Every head computes the block of its open slot (no boolean-mask indexing, which
    # costs a nonzero() and a host sync); a head growing into a new block takes the k-th
    # block from the top of the free stack, k counted over the growing heads in order.
    appends = ~merge
    old = lengths.index_select(0, rows)
    new = old + appends
    index, offset = (new - 1).div(bs, rounding_mode="floor"), (new - 1) % bs
    grow = appends & (old % bs == 0)  # an append into a full (or no) last block
    at = (rows.unsqueeze(1), torch.arange(key.shape[1], device=key.device), index)
    block = block_tables[at]
    if free.top > 0:  # else nothing may grow (the host checked)
        taken = torch.cumsum(grow.view(-1), 0).view_as(grow) + free.taken  # k + 1
        top = (free.top - taken).clamp_(0, free.ids.numel() - 1)  # top - 1 - k
        block = torch.where(grow, free.ids[top], block)
        block_tables.index_put_(at, block)
        free.taken += grow.sum()
    key_pool.index_put_((block, offset), keys.to(key_pool.dtype))
    value_pool.index_put_((block, offset), slot[..., d:].to(value_pool.dtype))
    lengths.index_copy_(0, rows, new)


def gather_slots(key_pool: Tensor, value_pool: Tensor, block_tables: Tensor, lengths: Tensor,
                 workspace: Optional[Workspace] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Copy each head's slots out of the paged pool into padded tensors.

    Args:
        key_pool, value_pool: ``[n, bs, d]``.
        block_tables: ``[b, hk, m]`` block ids (< 0 where unused); lengths: ``[b, hk]`` slots.
        workspace: optional flat buffers (each >= ``b * hk * t * d`` elements) to copy into,
            saving an allocation per call, or a callable giving such buffers for a size.

    Returns:
        ``keys [b, hk, t, d], values [b, hk, t, d], valid [b, hk, t]`` with ``t`` the longest
        head's length rounded up to whole blocks (cost scales with the compressed lengths).
    """
    b, hk, _ = block_tables.shape
    bs, d = key_pool.shape[1], key_pool.shape[2]
    blocks = max(1, -(-int(lengths.max()) // bs)) if lengths.numel() else 1
    ids = block_tables[..., :blocks].clamp_min(0).reshape(-1)
    shape, numel = (b, hk, blocks * bs, d), b * hk * blocks * bs * d
    if callable(workspace):
        with torch.inference_mode(False):  # kept buffers stay usable outside inference mode
            workspace = workspace(numel)
    if workspace is not None and workspace[0].numel() >= numel:
        keys = torch.index_select(key_pool, 0, ids, out=workspace[0][:numel].view(-1, bs, d))
        values = torch.index_select(value_pool, 0, ids, out=workspace[1][:numel].view(-1, bs, d))
    else:
        keys, values = key_pool.index_select(0, ids), value_pool.index_select(0, ids)
    valid = torch.arange(blocks * bs, device=lengths.device) < lengths.unsqueeze(-1)
    return keys.view(shape), values.view(shape), valid


def paged_decode_attention(query: Tensor, key_pool: Tensor, value_pool: Tensor,
                           block_tables: Tensor, lengths: Tensor, scale: float,
                           workspace: Optional[Workspace] = None) -> Tensor:
    """One query token per sequence over each KV head's own slots (GQA: the ``hq / hk``
    query heads of a group read their KV head's slots).

    Args:
        query: ``[b, hq, d]`` (RoPE applied, decision channel zeroed).
        key_pool, value_pool: ``[n, bs, d]`` (keys rotated); block_tables: ``[b, hk, m]``;
        lengths: ``[b, hk]`` (a head of length 0 gives a zero output; the engine's heads
        always hold their open slot); workspace: see :func:`gather_slots`.

    Returns:
        ``[b, hq, d]`` in the pool's dtype (scores and softmax in >= fp32).
    """
    b, hq, d = query.shape
    hk = block_tables.shape[1]
    keys, values, valid = gather_slots(key_pool, value_pool, block_tables, lengths, workspace)
    dtype = acc_dtype(query.dtype)
    q = query.view(b, hk, hq // hk, d).to(dtype) * scale
    scores = torch.matmul(q, keys.to(dtype).transpose(-1, -2))
    scores.masked_fill_(~valid.unsqueeze(2), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)  # [b, hk, g, t]
    out = torch.matmul(probs, values)  # NaN for a head of length 0 (all slots masked)
    return out.masked_fill_((lengths == 0).view(b, hk, 1, 1), 0.0).view(b, hq, d)
