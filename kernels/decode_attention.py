"""Paged decode attention over the per-head DMC cache in Triton (flash-decoding).

One query token per sequence; each (sequence, KV head) has its own block table and length.
The ``g = hq / hk`` query heads of a GQA group share one pass over their KV head's slots
(each key/value tile is loaded once for the whole group). The slots are split along the
sequence: every program of :func:`_partial_kernel` covers ``split`` slots of one head and
writes a partial ``(max, sum, acc)`` per query head; :func:`_combine_kernel` merges them.
Slots are addressed one by one through the block table, so any page size works.

Reference: :func:`nemo_dmc.kernels.references.paged_decode_attention` (same arguments, same
semantics: scores and softmax in fp32, probabilities cast to the pool dtype before the
value product, a head of length 0 gives zeros).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _partial_kernel(q_ptr, k_pool, v_pool, table_ptr, len_ptr, m_ptr, l_ptr, acc_ptr, scale,
                    kv_heads, num_splits, split, sq_b, sq_h, st_b, st_h, sl_b, sl_h,
                    sp_n, sp_s, D: tl.constexpr, BLOCK_D: tl.constexpr, G: tl.constexpr,
                    BLOCK_G: tl.constexpr, BS: tl.constexpr, BLOCK_N: tl.constexpr,
                    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """Partial softmax of the ``G`` query heads of one KV head over one split of its slots.

    Partials ``m, l [b, hq, splits]`` and ``acc [b, hq, splits, D]`` (fp32); a split past
    the head's length writes ``m = -inf, l = 0`` and leaves ``acc`` unwritten. ``DOT_FP32``
    runs the products in fp32 on pool-dtype-rounded operands (the interpreter's bf16 dot is
    wrong).
    """
    pool_ty = k_pool.dtype.element_ty
    dot_ty = tl.float32 if DOT_FP32 else pool_ty
    pid, sid = tl.program_id(0), tl.program_id(1)
    b, h = pid // kv_heads, pid % kv_heads
    length = tl.load(len_ptr + b * sl_b + h * sl_h)
    start = sid * split
    end = tl.minimum(start + split, length)
    g = tl.arange(0, BLOCK_G)
    cols = tl.arange(0, BLOCK_D)
    gmask, cmask = g < G, cols < D
    qh = h * G + g
    q = tl.load(q_ptr + b * sq_b + qh[:, None] * sq_h + cols[None, :],
                mask=gmask[:, None] & cmask[None, :], other=0.0).to(pool_ty).to(dot_ty)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        slots = n0 + tl.arange(0, BLOCK_N)
        smask = slots < end
        blk = tl.load(table_ptr + b * st_b + h * st_h + slots // BS, mask=smask, other=0)
        addr = blk.to(tl.int64) * sp_n + (slots % BS) * sp_s
        kv_mask = smask[:, None] & cmask[None, :]
        k = tl.load(k_pool + addr[:, None] + cols[None, :], mask=kv_mask, other=0.0).to(dot_ty)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(smask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_pool + addr[:, None] + cols[None, :], mask=kv_mask, other=0.0).to(dot_ty)
        pv = tl.dot(p.to(pool_ty).to(dot_ty), v, input_precision=PRECISION)
        acc = acc * alpha[:, None] + pv
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    part = (b * kv_heads * G + qh) * num_splits + sid  # [BLOCK_G]
    tl.store(m_ptr + part, m_i, mask=gmask)
    tl.store(l_ptr + part, l_i, mask=gmask)
    if start < length:
        tl.store(acc_ptr + part[:, None] * D + cols[None, :], acc,
                 mask=gmask[:, None] & cmask[None, :])


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, num_splits, so_b, so_h, heads,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Merge the partials of one (sequence, query head) into its output row."""
    pid = tl.program_id(0)
    b, h = pid // heads, pid % heads
    s = tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_D)
    smask, cmask = s < num_splits, cols < D
    m = tl.load(m_ptr + pid * num_splits + s, mask=smask, other=float("-inf"))
    l = tl.load(l_ptr + pid * num_splits + s, mask=smask, other=0.0)
    live = m > float("-inf")
    top = tl.max(m, 0)
    w = tl.where(live, tl.exp(m - tl.where(top > float("-inf"), top, 0.0)), 0.0)
    acc = tl.load(acc_ptr + (pid * num_splits + s)[:, None] * D + cols[None, :],
                  mask=(smask & live)[:, None] & cmask[None, :], other=0.0)
    total = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * so_b + h * so_h + cols, out.to(out_ptr.dtype.element_ty), mask=cmask)


def default_split(max_slots: int, heads: int) -> int:
    """Slots per program: a multiple of 64 giving at least ~512 programs (or 1 split)."""
    splits = max(1, -(-512 // max(heads, 1)))
    per = -(-max_slots // splits)
    return max(64, -(-per // 64) * 64)


def paged_decode_attention(query: Tensor, key_pool: Tensor, value_pool: Tensor,
                           block_tables: Tensor, lengths: Tensor, scale: float,
                           max_slots: Optional[int] = None, split: Optional[int] = None,
                           block_n: Optional[int] = None) -> Tensor:
    """Triton version of :func:`nemo_dmc.kernels.references.paged_decode_attention`.

    Args:
        query: ``[b, hq, d]``; key_pool, value_pool: ``[n, bs, d]`` (last dim contiguous);
        block_tables: ``[b, hk, m]``; lengths: ``[b, hk]``.
        max_slots: an upper bound of ``lengths`` (default: the block-table capacity, which
            needs no device sync); split: slots per program (default :func:`default_split`);
            block_n: slots per tile (default ``min(64, split)``, at least 16).

    Returns:
        ``[b, hq, d]`` in the pool's dtype.
    """
    b, hq, d = query.shape
    hk, bs = block_tables.shape[1], key_pool.shape[1]
    g = hq // hk
    if key_pool.stride(-1) != 1 or value_pool.stride() != key_pool.stride():
        raise ValueError("key_pool and value_pool need one contiguous layout")
    if value_pool.dtype != key_pool.dtype:  # tl.dot (compiled) needs equal operand dtypes
        raise ValueError("key_pool and value_pool need one dtype")
    query = query if query.stride(-1) == 1 else query.contiguous()
    # the kernel indexes the block table's last dim with unit stride (it is only read)
    block_tables = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    max_slots = max_slots if max_slots is not None else block_tables.shape[-1] * bs
    split = split or default_split(max_slots, b * hk)
    block_n = block_n or max(16, min(64, triton.next_power_of_2(split)))
    if split % block_n:
        raise ValueError(f"split={split} must be a multiple of block_n={block_n}")
    num_splits = max(1, -(-max_slots // split))
    if num_splits > 65535:  # grid axis 1
        raise ValueError(f"split={split} gives {num_splits} splits (> 65535); use a larger split")
    m = query.new_empty(b, hq, num_splits, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = query.new_empty(b, hq, num_splits, d, dtype=torch.float32)
    out = query.new_empty(b, hq, d, dtype=value_pool.dtype)
    precision = "ieee" if key_pool.dtype == torch.float32 else "tf32"
    dot_fp32 = os.environ.get("TRITON_INTERPRET") == "1"
    precision = "ieee" if dot_fp32 else precision
    block_d = max(16, triton.next_power_of_2(d))
    _partial_kernel[(b * hk, num_splits)](
        query, key_pool, value_pool, block_tables, lengths, m, l, acc, scale,
        hk, num_splits, split, query.stride(0), query.stride(1), block_tables.stride(0),
        block_tables.stride(1), lengths.stride(0), lengths.stride(1), key_pool.stride(0),
        key_pool.stride(1), D=d, BLOCK_D=block_d, G=g,
        BLOCK_G=max(16, triton.next_power_of_2(g)), BS=bs, BLOCK_N=block_n, PRECISION=precision,
        DOT_FP32=dot_fp32)
    _combine_kernel[(b * hq,)](
        m, l, acc, out, num_splits, out.stride(0), out.stride(1), hq, D=d, BLOCK_D=block_d,
        BLOCK_S=max(2, triton.next_power_of_2(num_splits)))
    return out
