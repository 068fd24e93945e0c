"""Fused DMC cache update of one decode step in Triton.

One program per (sequence, KV head) does, in place on one layer's cache: the hard decision
(``s * k[D-1] - c > 0``; position 0 appends), the importance
``omega = sigmoid(s * mean_g q[D-1] + c)`` over the GQA group (``s`` = ``decision_scale``),
append-or-merge into the open run (a ring of ``W`` entries, or the running sum ``[S | Z]``),
the open slot ``S / Z`` with its key rotated at the token's position (channel D-1 zeroed
before RoPE, and after it through the RoPE tables with ``zero_after_rope``:
:func:`~nemo_dmc.kernels.references.attended_tables`), the write into its block (popping a new block from the host's free stack
through an atomic counter when an append crosses into one) and the new length. With
``decision_source="adapter"`` (constexpr ``ADAPTER``) the decision logit ``s * x0 - c`` and
the importance ``sigmoid(s * x1 + c)`` come from the decision adapter's signals ``[x0, x1]`` of
the (sequence, KV head), and the key keeps channel D-1.

Reference: :func:`nemo_dmc.kernels.references.decode_cache_update` (same arguments). Blocks taken
in one launch may be handed to heads in a different order than the reference's (the atomic
counter orders them); the slots each head reads are the same.
"""

from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

_FORCE = {None: -1, "append": 0, "merge": 1}


@triton.jit
def _update_kernel(q_ptr, k_ptr, v_ptr, sig_ptr, pos_ptr, rows_ptr, runs_ptr, ring_ptr, len_ptr,
                   table_ptr, k_pool, v_pool, free_ptr, taken_ptr, cos_ptr, sin_ptr, mate_ptr,
                   free_top, init_offset, decision_scale, sq_b, sq_h, sk_b, sk_h, sv_b, sv_h,
                   ss_b, ss_h, sr_row, sr_h, sr_r, sg_row, sg_h, sl_row, sl_h, st_row, st_h,
                   sp_n, sp_s, s_tab, D: tl.constexpr, BLOCK_D: tl.constexpr, G: tl.constexpr,
                   BLOCK_G: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr,
                   WINDOWED: tl.constexpr, FORCE: tl.constexpr, BS: tl.constexpr,
                   ADAPTER: tl.constexpr):
    i, h = tl.program_id(0), tl.program_id(1)
    row = tl.load(rows_ptr + i)
    pos = tl.load(pos_ptr + i)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mate = tl.load(mate_ptr + i * s_tab + cols, mask=cmask, other=0)  # RoPE partner channels
    # decision and importance
    k_row = k_ptr + i * sk_b + h * sk_h
    if ADAPTER:
        sig = sig_ptr + i * ss_b + h * ss_h
        logit = tl.load(sig).to(tl.float32) * decision_scale - init_offset
        omega = tl.sigmoid(tl.load(sig + 1).to(tl.float32) * decision_scale + init_offset)
    else:
        logit = tl.load(k_row + D - 1).to(tl.float32) * decision_scale - init_offset
        g = tl.arange(0, BLOCK_G)
        q_last = tl.load(q_ptr + i * sq_b + (h * G + g) * sq_h + D - 1, mask=g < G, other=0.0)
        omega = tl.sigmoid(tl.sum(q_last.to(tl.float32), 0) / G * decision_scale + init_offset)
    if FORCE == 1:
        merge = pos > 0
    elif FORCE == 0:
        merge = pos < 0
    else:
        merge = (logit > 0) & (pos > 0)
    # the new weighted entry [omega * k (channel D-1 zeroed, intact with ADAPTER) | omega * v
    # | omega]
    key = tl.load(k_row + cols, mask=cmask & ((cols < D - 1) | ADAPTER),
                  other=0.0).to(tl.float32)
    key_mate = tl.load(k_row + mate, mask=cmask & ((mate < D - 1) | ADAPTER),
                       other=0.0).to(tl.float32)
    val = tl.load(v_ptr + i * sv_b + h * sv_h + cols, mask=cmask, other=0.0).to(tl.float32)
    # the open run, updated in registers: entries [BLOCK_R, BLOCK_D] and weights [BLOCK_R]
    r = tl.arange(0, BLOCK_R)
    rmask = r < R
    run = runs_ptr + row * sr_row + h * sr_h + r[:, None] * sr_r
    tile = rmask[:, None] & cmask[None, :]
    keep = merge.to(tl.float32)
    run_k = tl.load(run + cols[None, :], mask=tile, other=0.0) * keep
    run_km = tl.load(run + mate[None, :], mask=tile, other=0.0) * keep
    run_v = tl.load(run + D + cols[None, :], mask=tile, other=0.0) * keep
    run_z = tl.load(runs_ptr + row * sr_row + h * sr_h + r * sr_r + 2 * D, mask=rmask,
                    other=0.0) * keep
    if WINDOWED:
        ring = tl.load(ring_ptr + row * sg_row + h * sg_h)
    old = tl.load(len_ptr + row * sl_row + h * sl_h)
    # Everything this program overwrites below (the run, its ring index, the length) has
    # been read above, by many threads: the mate-permuted run, the replicated [BLOCK_R]
    # weights and the scalars are loaded by threads other than the one storing them. On a
    # GPU nothing orders another warp's load before this thread's store, so without this
    # barrier a late warp could read the updated run / ring / length (and the block-taking
    # branch below, whose scalar atomic broadcasts through a barrier, could diverge).
    # A no-op in the interpreter.
    tl.debug_barrier()
    if WINDOWED:
        at = tl.where(merge, ring, 0)
        tl.store(ring_ptr + row * sg_row + h * sg_h, (at + 1) % R)
        put = r == at
        run_k = tl.where(put[:, None], omega * key[None, :], run_k)
        run_km = tl.where(put[:, None], omega * key_mate[None, :], run_km)
        run_v = tl.where(put[:, None], omega * val[None, :], run_v)
        run_z = tl.where(put, omega, run_z)
    else:
        run_k += omega * key[None, :]
        run_km += omega * key_mate[None, :]
        run_v += omega * val[None, :]
        run_z += omega
    tl.store(run + cols[None, :], run_k, mask=tile)
    tl.store(run + D + cols[None, :], run_v, mask=tile)
    tl.store(runs_ptr + row * sr_row + h * sr_h + r * sr_r + 2 * D, run_z, mask=rmask)
    # the open slot S / Z, key rotated at this position
    z = tl.maximum(tl.sum(run_z, 0), 1.1754943508222875e-38)
    cos = tl.load(cos_ptr + i * s_tab + cols, mask=cmask, other=0.0)
    sin = tl.load(sin_ptr + i * s_tab + cols, mask=cmask, other=0.0)
    slot_k = (tl.sum(run_k, 0) / z) * cos + (tl.sum(run_km, 0) / z) * sin
    slot_v = tl.sum(run_v, 0) / z
    # its place: a new slot on append (a new block when the last one is full)
    appends = 1 - merge.to(old.dtype)
    new = old + appends
    entry = table_ptr + row * st_row + h * st_h + (new - 1) // BS
    if (appends == 1) & (old % BS == 0):
        taken = tl.atomic_add(taken_ptr, 1)
        # both branches must give `block` one type when compiled (the interpreter does not
        # check): free ids and block tables may differ in integer width
        block = tl.load(free_ptr + free_top - 1 - taken).to(tl.int64)
        tl.store(entry, block)
    else:
        block = tl.load(entry).to(tl.int64)
    addr = block * sp_n + ((new - 1) % BS) * sp_s + cols
    tl.store(k_pool + addr, slot_k.to(k_pool.dtype.element_ty), mask=cmask)
    tl.store(v_pool + addr, slot_v.to(v_pool.dtype.element_ty), mask=cmask)
    tl.store(len_ptr + row * sl_row + h * sl_h, new)


def decode_cache_update(query: Tensor, key: Tensor, value: Tensor, positions: Tensor,
                        rows: Tensor, open_runs: Tensor, ring_next: Tensor, lengths: Tensor,
                        block_tables: Tensor, key_pool: Tensor, value_pool: Tensor, free,
                        tables, config, window: Optional[int],
                        signals: Optional[Tensor] = None) -> None:
    """Triton version of :func:`nemo_dmc.kernels.references.decode_cache_update` (same arguments;
    ``free`` a :class:`~nemo_dmc.kernels.references.FreeBlocks`, ``tables`` a
    :class:`~nemo_dmc.kernels.references.RopeTables`, ``config`` a ``DMCConfig``, ``signals``
    ``[b, hk, 2]`` the decision adapter's for ``decision_source="adapter"``)."""
    b, hq, d = query.shape
    hk, r = key.shape[1], open_runs.shape[-2]
    if open_runs.stride(-1) != 1 or block_tables.stride(-1) != 1 or key_pool.stride(-1) != 1:
        raise ValueError("open_runs, block_tables and the pools need a contiguous last dim")
    if value_pool.stride() != key_pool.stride():
        raise ValueError("key_pool and value_pool need one layout")
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    cos, sin, mate = (t.contiguous() for t in (tables.cos, tables.sin, tables.partner))
    positions, rows = positions.contiguous(), rows.contiguous()  # read as [b] arrays
    g = hq // hk
    adapter = config.decision_source == "adapter"
    if adapter:
        if signals is None:
            raise ValueError("dmc.decision_source='adapter' needs the decision adapter's signals")
        signals = signals if signals.stride(-1) == 1 else signals.contiguous()
    sig = signals if adapter else key  # not read without ADAPTER
    _update_kernel[(b, hk)](
        query, key, value, sig, positions, rows, open_runs, ring_next, lengths, block_tables,
        key_pool, value_pool, free.ids, free.taken, cos, sin, mate, free.top,
        float(config.init_offset), float(config.decision_scale), query.stride(0), query.stride(1),
        key.stride(0), key.stride(1), value.stride(0), value.stride(1), sig.stride(0),
        sig.stride(1), open_runs.stride(0),
        open_runs.stride(1), open_runs.stride(2), ring_next.stride(0), ring_next.stride(1),
        lengths.stride(0), lengths.stride(1), block_tables.stride(0), block_tables.stride(1),
        key_pool.stride(0), key_pool.stride(1), cos.stride(0), D=d,
        BLOCK_D=triton.next_power_of_2(d), G=g, BLOCK_G=triton.next_power_of_2(g), R=r,
        BLOCK_R=triton.next_power_of_2(r), WINDOWED=window is not None,
        FORCE=_FORCE[config.force_decision], BS=key_pool.shape[1], ADAPTER=adapter)
