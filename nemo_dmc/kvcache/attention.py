"""DMC attention of one layer against the paged cache (no megatron; the decode step's
kernels go through :mod:`nemo_dmc.kernels.dispatch`: Triton on CUDA, else pure torch).

:func:`prefill_attention` takes a chunk of tokens per sequence in parallel; :func:`decode_attention`
takes one token per sequence. Both take pre-RoPE ``query [b, hq, c, d]``, ``key``/``value``
``[b, hk, c, d]`` and return ``[b, hq, c, d]``; they update the cache rows as inference would
after those tokens. With ``decision_source="adapter"`` both also take the layer's decision
adapter ``signals [b, hk, c, 2]``, which give decisions and importance (q and k intact).
``rope`` is a :data:`nemo_dmc.core.RoPE` (``None``: no rotation); channel D-1 of the rotated
q/k is zeroed again with ``config.zero_after_rope`` (:func:`nemo_dmc.core.attended_rope`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from nemo_dmc.core import (
    DMCConfig,
    RoPE,
    attended,
    attended_rope,
    dmc_attention,
    normalize_sums,
    zeroes_after_rope,
)
from nemo_dmc.kernels import dispatch, references
from nemo_dmc.kvcache import ops
from nemo_dmc.kvcache.paged import PagedKVCache


def rotate(rope: Optional[RoPE], x: Tensor, positions: Tensor) -> Tensor:
    """RoPE of ``x [b, h, c, d]`` at per-sequence ``positions [b, c]``."""
    if rope is None:
        return x
    b, h, c, d = x.shape
    flat = x.permute(1, 0, 2, 3).reshape(h, b * c, d)
    return rope(flat, positions.reshape(-1)).view(h, b, c, d).permute(1, 0, 2, 3)


def prefill_attention(cache: PagedKVCache, layer: int, rows: Tensor, query: Tensor, key: Tensor,
                      value: Tensor, positions: Tensor, counts: Tensor, config: DMCConfig,
                      rope: Optional[RoPE], scale: float,
                      signals: Optional[Tensor] = None) -> Tensor:
    """A chunk of ``counts[b] <= c`` tokens per row at ``positions [b, c]`` (right padded).

    Decisions and partial accumulations of the whole chunk continue each head's open run;
    queries attend to the rows' cached slots (if any) and the chunk's states; the surviving
    states and the new open runs are written to the cache.
    """
    window = cache.layout.window
    head_dim = key.shape[-1]
    rope = attended_rope(rope, zeroes_after_rope(config))
    fresh = positions[:, 0] == 0
    decisions = ops.chunk_decisions(key, fresh, config, signals)
    query, entries = ops.chunk_entries(query, key, value, config, signals)
    runs = ops.chronological(cache.open_runs[rows, layer], cache.ring_next[rows, layer])
    sums = ops.accumulate_chunk(entries, decisions.merge, runs, window)
    states = normalize_sums(sums[..., runs.shape[-2]:, :]).to(key.dtype)
    keys = rotate(rope, states[..., :head_dim], positions)
    values = states[..., head_dim:]
    query = rotate(rope, query, positions)
    if bool(fresh.all()):
        out = dmc_attention(query, keys, values, decisions.state_bias, scale)
    else:
        lengths = cache.lengths[rows, layer]
        prior_k, prior_v, valid = references.gather_slots(cache.key_pool, cache.value_pool,
                                                          cache.block_tables[rows, layer],
                                                          lengths)
        slot = torch.arange(valid.shape[-1], device=valid.device)
        open_slot = slot == lengths.unsqueeze(-1) - 1
        prior_bias = torch.where(valid, open_slot * decisions.open_bias.unsqueeze(-1),
                                 float("-inf"))
        out = ops.prefix_chunk_attention(query, prior_k, prior_v, prior_bias, keys, values,
                                         decisions.state_bias, scale)
    cache.open_runs[rows, layer] = ops.open_runs_after_chunk(runs, entries, decisions.merge,
                                                             sums, counts, window)
    cache.ring_next[rows, layer] = 0
    cache.commit(rows, layer, keys, values, decisions.merge, counts)
    return out


def decode_attention(cache: PagedKVCache, layer: int, rows: Tensor, query: Tensor, key: Tensor,
                     value: Tensor, positions: Tensor, config: DMCConfig, rope: Optional[RoPE],
                     scale: float, tables: Optional[references.RopeTables] = None,
                     max_slots: Optional[int] = None,
                     signals: Optional[Tensor] = None) -> Tensor:
    """One token per row (``c = 1``) at ``positions [b, 1]``: append or merge per head, write
    the open slot (key rotated at this position), attend over each head's slots.

    Both steps go through :mod:`nemo_dmc.kernels.dispatch` (Triton on CUDA). ``tables``: the
    RoPE at ``positions`` (shared by all layers of a step; computed here when ``None``);
    ``max_slots``: a bound of the heads' lengths known without a device sync (e.g. the
    longest row's tokens), which sizes the Triton kernel's sequence splits.
    """
    head_dim = key.shape[-1]
    query, key, value = query[:, :, 0], key[:, :, 0], value[:, :, 0]
    if tables is None:
        tables = ops.rope_tables(rope, positions[:, 0], head_dim, key.dtype)
    tables = references.attended_tables(tables, zeroes_after_rope(config))
    free = cache.free_blocks_for_decode(rows, layer)
    if free is not None:  # else the pool is exhausted: cache.overflow is set, nothing written
        dispatch.decode_cache_update(
            query, key, value, positions[:, 0], rows, cache.open_runs[:, layer],
            cache.ring_next[:, layer], cache.lengths[:, layer], cache.block_tables[:, layer],
            cache.key_pool, cache.value_pool, free, tables, config, cache.layout.window,
            None if signals is None else signals[:, :, 0])
        cache.pop_taken_blocks(free)
    query = references.apply_rope_tables(attended(query, config), tables)
    out = dispatch.paged_decode_attention(query, cache.key_pool, cache.value_pool,
                                          cache.block_tables[:, layer].index_select(0, rows),
                                          cache.lengths[:, layer].index_select(0, rows), scale,
                                          cache.workspace, max_slots)
    return out.unsqueeze(2)
