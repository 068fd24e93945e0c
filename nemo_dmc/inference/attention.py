"""DMC attention of one layer against the paged cache (pure torch, no megatron).

:func:`prefill_attention` takes a chunk of tokens per sequence in parallel; :func:`decode_attention`
takes one token per sequence. Both take pre-RoPE ``query [b, hq, c, d]``, ``key``/``value``
``[b, hk, c, d]`` and return ``[b, hq, c, d]``; they update the cache rows as inference would
after those tokens. ``rope`` is a :data:`nemo_dmc.core.RoPE` (``None``: no rotation).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from nemo_dmc.core import DMCConfig, RoPE, dmc_attention, normalize_sums
from nemo_dmc.inference import ops
from nemo_dmc.inference.cache import PagedKVCache


def rotate(rope: Optional[RoPE], x: Tensor, positions: Tensor) -> Tensor:
    """RoPE of ``x [b, h, c, d]`` at per-sequence ``positions [b, c]``."""
    if rope is None:
        return x
    b, h, c, d = x.shape
    flat = x.permute(1, 0, 2, 3).reshape(h, b * c, d)
    return rope(flat, positions.reshape(-1)).view(h, b, c, d).permute(1, 0, 2, 3)


def prefill_attention(cache: PagedKVCache, layer: int, rows: Tensor, query: Tensor, key: Tensor,
                      value: Tensor, positions: Tensor, counts: Tensor, config: DMCConfig,
                      rope: Optional[RoPE], scale: float) -> Tensor:
    """A chunk of ``counts[b] <= c`` tokens per row at ``positions [b, c]`` (right padded).

    Decisions and partial accumulations of the whole chunk continue each head's open run;
    queries attend to the rows' cached slots (if any) and the chunk's states; the surviving
    states and the new open runs are written to the cache.
    """
    window = cache.layout.window
    head_dim = key.shape[-1]
    fresh = positions[:, 0] == 0
    decisions = ops.chunk_decisions(key, fresh, config)
    query, entries = ops.chunk_entries(query, key, value, config)
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
        prior_k, prior_v, valid = ops.gather_slots(cache.key_pool, cache.value_pool,
                                                   cache.block_tables[rows, layer], lengths)
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
                     scale: float) -> Tensor:
    """One token per row (``c = 1``) at ``positions [b, 1]``: append or merge per head, write
    the open slot (key rotated at this position), attend over each head's slots."""
    window = cache.layout.window
    head_dim = key.shape[-1]
    decisions = ops.chunk_decisions(key, positions[:, 0] == 0, config)
    query, entries = ops.chunk_entries(query, key, value, config)
    runs, ring_next = ops.advance_open_runs(cache.open_runs[rows, layer],
                                            cache.ring_next[rows, layer], entries[..., 0, :],
                                            decisions.merge[..., 0], window)
    cache.open_runs[rows, layer] = runs
    cache.ring_next[rows, layer] = ring_next
    slot = normalize_sums(runs.sum(-2)).to(key.dtype).unsqueeze(-2)  # [b, hk, 1, 2d]
    heads = query.shape[1]  # one RoPE call for the queries and the open slots' keys
    rotated = rotate(rope, torch.cat([query, slot[..., :head_dim]], dim=1), positions)
    query, keys = rotated[:, :heads, 0], rotated[:, heads:]
    cache.commit(rows, layer, keys, slot[..., head_dim:], decisions.merge, torch.ones_like(rows))
    lengths = cache.lengths[rows, layer]
    bs = cache.layout.block_size
    slots = -(-int(lengths.max()) // bs) * bs
    workspace = cache.workspace(lengths.numel() * slots * head_dim)
    out = ops.paged_decode_attention(query, cache.key_pool, cache.value_pool,
                                     cache.block_tables[rows, layer], lengths, scale, workspace)
    return out.unsqueeze(2)
