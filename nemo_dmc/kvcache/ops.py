"""Pure-torch DMC prefill over the paged per-head cache: decisions of a chunk of new tokens,
its weighted entries and partial accumulations continuing each head's open run (the
open-slot, running-average state), and attention over cached slots plus the chunk.

The decode step's two operations and the types they take (:class:`RopeTables`,
:class:`FreeBlocks`) live beside their Triton kernels in :mod:`nemo_dmc.kernels.references`.
All decision, importance and accumulation math comes from :mod:`nemo_dmc.core`.

Shape letters: ``b`` sequences, ``hq`` query heads and ``hk`` KV heads (local to this
tensor-parallel rank), ``c`` tokens of a chunk, ``d`` head dim, ``e = 2d + 1`` a weighted
entry ``[omega*k | omega*v | omega]`` (keys pre-RoPE, decision channel zeroed for the channel
decision source), ``r`` entries
of an open run (the merge window ``W``, or 1 for unbounded runs where the single entry is the
running sum), ``t`` slots. Open runs are kept as described in :mod:`nemo_dmc.kernels.references`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from nemo_dmc.core import (
    DMCConfig,
    RoPE,
    attended,
    dmc_score_bias,
    linear_scan,
    make_decisions,
    source_logits,
    windowed_scan,
)
from nemo_dmc.kernels.references import (
    RopeTables,
    acc_dtype,
    apply_rope_tables,
    weigh_chunk,
)

def run_entries(window: Optional[int]) -> int:
    """Entries ``r`` of an open run: ``W`` for a windowed average, 1 (the running sum) otherwise."""
    return 1 if window is None else window


@dataclass
class ChunkDecisions:
    """Hard decisions of a chunk of new tokens (all ``[b, hk, c]`` unless noted).

    merge: 1 = the token merges into the head's last slot, 0 = it appends a slot.
    state_bias: score bias of chunk state ``i`` for later queries of the chunk (``hard_bias``
        where token ``i + 1`` merges into it, else 0), as :func:`nemo_dmc.core.make_decisions`.
    open_bias: ``[b, hk]`` score bias of the cached open slot for this chunk's queries
        (``hard_bias`` when the chunk's first token merges into it).
    """

    merge: Tensor
    state_bias: Tensor
    open_bias: Tensor


def chunk_decisions(key: Tensor, starts_sequence: Tensor, config: DMCConfig,
                    signals: Optional[Tensor] = None) -> ChunkDecisions:
    """Decisions of a chunk that starts a sequence or continues a cached one.

    Args:
        key: ``[b, hk, c, d]`` pre-RoPE keys of the chunk.
        starts_sequence: ``[b]`` bool, True where the chunk holds the sequence's first token
            (which always appends); otherwise the chunk's first token may merge into the
            cached open slot.
        signals: ``[b, hk, c, 2]`` decision-adapter signals (``decision_source="adapter"``).
    """
    logits = source_logits(key, config, signals)
    # A leading stand-in for the cached open slot lets make_decisions see the chunk's first
    # token as a continuation (and gives the open slot's survival bias at index 0).
    cont = make_decisions(F.pad(logits, (1, 0)), config, training=False)
    merge, state_bias = cont.hard[..., 1:], cont.state_bias[..., 1:]
    if bool(starts_sequence.any()):
        fresh = make_decisions(logits, config, training=False)
        first = starts_sequence.view(-1, 1, 1)
        merge = torch.where(first, fresh.hard, merge)
        state_bias = torch.where(first, fresh.state_bias, state_bias)
    return ChunkDecisions(merge=merge, state_bias=state_bias, open_bias=cont.state_bias[..., 0])


def chunk_entries(query: Tensor, key: Tensor, value: Tensor, config: DMCConfig,
                  signals: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The queries attention sees and the weighted entries of a chunk.

    Args:
        query: ``[b, hq, c, d]``; key, value: ``[b, hk, c, d]`` (pre-RoPE); signals:
            ``[b, hk, c, 2]`` decision-adapter signals (``decision_source="adapter"``).

    Returns:
        ``(query [b, hq, c, d] with the decision channel zeroed for the channel source,
        entries [b, hk, c, e])``.
    """
    return attended(query, config), weigh_chunk(query, key, value, config, signals)


def chronological(open_runs: Tensor, ring_next: Tensor) -> Tensor:
    """Entries of open runs ``[b, hk, r, e]`` oldest first (the ring starts at ``ring_next``)."""
    r = open_runs.shape[-2]
    if r == 1:
        return open_runs
    order = (ring_next.unsqueeze(-1) + torch.arange(r, device=open_runs.device)) % r
    return open_runs.gather(-2, order.unsqueeze(-1).expand_as(open_runs))


def accumulate_chunk(entries: Tensor, merge: Tensor, open_runs: Tensor,
                     window: Optional[int]) -> Tensor:
    """Weighted sums of every state of a chunk, continuing each head's open run.

    The open run's entries (oldest first) are prepended as one run, so the chunk's first
    token continues it when it merges; core's scan then gives the same sums as a scan over
    the whole sequence (truncated to the last ``W`` terms when windowed).

    Args:
        entries: ``[b, hk, c, e]`` weighted entries of the chunk.
        merge: ``[b, hk, c]`` hard decisions.
        open_runs: ``[b, hk, r, e]`` chronological open runs (zeros for new sequences).

    Returns:
        ``[b, hk, r + c, e]`` unnormalised sums over the open run and the chunk.
    """
    b, hk, r, _ = open_runs.shape
    alpha_open = torch.ones(r, dtype=entries.dtype, device=entries.device)
    alpha_open[0] = 0.0
    alpha = torch.cat([alpha_open.expand(b, hk, r), merge.to(entries.dtype)], dim=-1)
    x = torch.cat([open_runs, entries], dim=-2)
    return linear_scan(alpha, x) if window is None else windowed_scan(alpha, x, window)


def open_runs_after_chunk(open_runs: Tensor, entries: Tensor, merge: Tensor, sums: Tensor,
                          counts: Tensor, window: Optional[int]) -> Tensor:
    """Each head's open run after the first ``counts[b]`` tokens of a chunk, in canonical
    form (chronological; a windowed ring then has its oldest entry at index 0).

    Args:
        open_runs: ``[b, hk, r, e]`` chronological runs before the chunk.
        entries, merge: the chunk's ``[b, hk, c, e]`` entries and ``[b, hk, c]`` decisions.
        sums: ``[b, hk, r + c, e]`` from :func:`accumulate_chunk`.
        counts: ``[b]`` real (unpadded) tokens per sequence, >= 1.
    """
    b, hk, r, e = open_runs.shape
    end = (r + counts - 1).view(b, 1, 1, 1)  # index of each sequence's last token
    if window is None:
        return sums.gather(-2, end.expand(b, hk, 1, e))
    ext = torch.cat([open_runs, entries], dim=-2)
    steps = ext.shape[-2]
    alpha = F.pad(merge.to(ext.dtype), (r, 0), value=1.0)
    idx = torch.arange(steps, device=ext.device)
    # start of the last run: the latest append at or before `end` (index 0 always "appends")
    appends = (alpha == 0) | (idx == 0)
    start = torch.where(appends & (idx <= end.view(b, 1, 1)), idx, -1).amax(-1, keepdim=True)
    pos = end.view(b, 1, 1) - window + 1 + torch.arange(window, device=ext.device)  # [b, 1, W]
    valid = (pos >= start) & (pos >= 0)
    pos = pos.clamp_min(0).expand(b, hk, window)
    ring = ext.gather(-2, pos.unsqueeze(-1).expand(b, hk, window, e))
    return ring * valid.unsqueeze(-1)


def rope_tables(rope: Optional[RoPE], positions: Tensor, dim: int, dtype: torch.dtype,
                check: bool = False) -> RopeTables:
    """:class:`RopeTables` of ``rope`` at ``positions [b]`` (``rope=None``: the identity).

    The rotation of each position is probed on the ``dim`` unit vectors; ``check`` verifies
    on a random vector that it moves at most one partner channel into each channel.
    """
    b, device = positions.shape[0], positions.device
    dtype = acc_dtype(dtype)
    channels = torch.arange(dim, device=device).expand(b, dim)
    if rope is None:
        ones = torch.ones(b, dim, dtype=dtype, device=device)
        return RopeTables(ones, torch.zeros_like(ones), channels.clone())
    eye = torch.eye(dim, dtype=dtype, device=device).unsqueeze(1)
    # probe[i, b, j] = the j-th output of the unit vector e_i
    probe = rope(eye.expand(dim, b, dim).contiguous(), positions).to(dtype)
    cos = probe.diagonal(dim1=0, dim2=2).contiguous()  # [b, d]
    off = probe.masked_fill(eye.bool(), 0.0)
    partner = off.abs().max(dim=0).indices  # [b, d] (the first on ties, as argmax; faster)
    sin = off.gather(0, partner.unsqueeze(0)).squeeze(0)
    tables = RopeTables(cos, sin, partner)
    if check:
        x = torch.randn(1, b, dim, dtype=dtype, device=device,
                        generator=torch.Generator(device).manual_seed(0))
        expected = rope(x, positions).to(dtype)[0]
        if not torch.allclose(apply_rope_tables(x[0].unsqueeze(1), tables)[:, 0], expected,
                              atol=1e-4, rtol=1e-4):
            raise ValueError("the model's rotary embedding does not rotate channel pairs; "
                             "DMC decode cannot fuse it (use a rotate-half or interleaved RoPE)")
    return tables


def prefix_chunk_attention(query: Tensor, prior_keys: Tensor, prior_values: Tensor,
                           prior_bias: Tensor, keys: Tensor, values: Tensor, state_bias: Tensor,
                           scale: float, bias_window: int = 0) -> Tensor:
    """Chunk queries over the cached slots of earlier chunks plus the chunk's own states.

    The chunk part follows :func:`nemo_dmc.core.dmc_score_bias` (causal, survival bias where
    ``t - i > bias_window``: DMC's exempt own state, or DMS's window).

    Args:
        query: ``[b, hq, c, d]``; prior_keys, prior_values: ``[b, hk, t, d]`` cached slots;
        prior_bias: ``[b, hk, t]`` (0, ``hard_bias`` for a superseded open slot, ``-inf``
        for padding), or ``[b, hk, c, t]`` per query (DMS: a marked slot out of the query's
        window); keys, values: ``[b, hk, c, d]`` chunk states; state_bias: ``[b, hk, c]``.

    Returns:
        ``[b, hq, c, d]``.
    """
    b, hq, c, d = query.shape
    hk, t = prior_keys.shape[1], prior_keys.shape[2]
    g = hq // hk
    dtype = acc_dtype(query.dtype)
    q = query.reshape(b, hk, g * c, d).to(dtype) * scale
    prior = torch.matmul(q, prior_keys.to(dtype).transpose(-1, -2)).view(b, hk, g, c, t)
    per_query = prior_bias.dim() == 4  # [b, hk, c, t] rather than [b, hk, t]
    prior = prior + prior_bias.to(dtype).view(b, hk, 1, c if per_query else 1, t)
    own = torch.matmul(q, keys.to(dtype).transpose(-1, -2)).view(b, hk, g, c, c)
    own = own + dmc_score_bias(state_bias.to(dtype), bias_window=bias_window).unsqueeze(2)
    probs = torch.softmax(torch.cat([prior, own], dim=-1), dim=-1).to(values.dtype)
    probs = probs.view(b, hk, g * c, t + c)
    out = (torch.matmul(probs[..., :t], prior_values)
           + torch.matmul(probs[..., t:], values))
    return out.view(b, hq, c, d)
