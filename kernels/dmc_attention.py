"""Fused (FlashAttention-style) causal attention with the DMC per-key survival bias.

Same result as :func:`nemo_dmc.core.dmc_attention` without a mask or dropout:
``score[i, j] = scale * q_i . k_j + bias_j`` for ``i - j > window``, ``scale * q_i . k_j`` in
the exempt band ``0 <= i - j <= window`` (the diagonal for DMC, ``window = 0``; DMS's eviction
window), ``-inf`` for ``j > i``. Scores never leave SRAM: the forward keeps a running
max and sum per query row (online softmax) and stores ``out`` and the row log-sum-exp
``lse``; memory is ``O(S)`` per head. GQA: query head ``h`` reads KV head ``h // groups``.

Backward (recomputing ``P = exp(score - lse)``, with ``Delta_i = dO_i . O_i``):
``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - Delta)``, ``dQ = scale dS K``,
``dK = scale dS^T Q``, and the bias gradient ``dbias_j = sum_{i - j > window} dS_ij`` (summed
over the query heads of the group). The key-side kernel owns one KV head's key block and
loops over its group's query heads, so no atomics are needed.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

_NEG = tl.constexpr(-1.0e30)  # running-max start: finite, so fully masked blocks give exp(-inf) = 0, not NaN


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """``a @ b`` accumulated in fp32. ``PRECISION == "interpret"``: both operands upcast first
    (Triton's CPU interpreter mis-multiplies bf16; bf16 products are exact in fp32)."""
    if PRECISION == "interpret":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _load_block(ptr, rows, dims, seq, head_dim, stride_s):
    """``[rows, dims]`` block of a ``[seq, head_dim]`` matrix with row stride ``stride_s``.
    Row offsets in int64: with megatron's ``[s, b, h, d]`` layout ``stride_s = b * h * d``,
    so ``rows * stride_s`` reaches the whole tensor's size (> 2**31 at long contexts)."""
    mask = (rows < seq)[:, None] & (dims < head_dim)[None, :]
    return tl.load(ptr + rows.to(tl.int64)[:, None] * stride_s + dims[None, :], mask=mask,
                   other=0.0)


@triton.jit
def _scores(q, k, bias, rows, cols, seq, scale, window, PRECISION: tl.constexpr):
    """DMC scores ``[rows, cols]`` (fp32): scaled dot products, per-key bias more than
    ``window`` below the diagonal, ``-inf`` above it and outside the sequence."""
    s = _dot(q, tl.trans(k), PRECISION) * scale
    s += tl.where(cols[None, :] + window < rows[:, None], bias[None, :], 0.0)
    valid = (cols[None, :] <= rows[:, None]) & (rows < seq)[:, None] & (cols < seq)[None, :]
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _attn_fwd(q_ptr, k_ptr, v_ptr, bias_ptr, o_ptr, lse_ptr, seq, head_dim, heads, groups, scale,
              window, sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              PRECISION: tl.constexpr):
    """Grid ``(query blocks, b * hq)``: output rows and their log-sum-exp."""
    bh = tl.program_id(1)
    b, h = bh // heads, bh % heads
    hk = h // groups
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = _load_block(q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh, rows, dims, seq, head_dim, sqs)
    k_ptr += b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_ptr += b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    bias_ptr += (b * (heads // groups) + hk).to(tl.int64) * seq
    m_i = tl.full([BLOCK_M], _NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = tl.minimum((tl.program_id(0) + 1) * BLOCK_M, seq)
    for n0 in range(0, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k = _load_block(k_ptr, cols, dims, seq, head_dim, sks)
        v = _load_block(v_ptr, cols, dims, seq, head_dim, svs)
        bias = tl.load(bias_ptr + cols, mask=cols < seq, other=0.0).to(tl.float32)
        s = _scores(q, k, bias, rows, cols, seq, scale, window, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        rescale = tl.exp(m_i - m_new)
        l_i = l_i * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + _dot(p.to(v.dtype), v, PRECISION)
        m_i = m_new
    l_i = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_i[:, None]
    o_ptr += b.to(tl.int64) * sob + h.to(tl.int64) * soh
    mask = (rows < seq)[:, None] & (dims < head_dim)[None, :]
    tl.store(o_ptr + rows.to(tl.int64)[:, None] * sos + dims[None, :],
             out.to(o_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + bh.to(tl.int64) * seq + rows, m_i + tl.log(l_i), mask=rows < seq)


@triton.jit
def _attn_bwd_kv(q_ptr, k_ptr, v_ptr, bias_ptr, do_ptr, lse_ptr, delta_ptr,
                 dk_ptr, dv_ptr, dbias_ptr, seq, head_dim, heads, groups, scale, window,
                 sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Grid ``(key blocks, b * hk)``: ``dK``, ``dV`` and ``dbias`` of one key block, summed
    over the query heads of its GQA group and the query blocks at or below the diagonal.
    ``dK``/``dV`` are written contiguous ``[b, hk, s, d]``."""
    bhk = tl.program_id(1)
    kv_heads = heads // groups
    b, hk = bhk // kv_heads, bhk % kv_heads
    n0 = tl.program_id(0) * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = _load_block(k_ptr + b.to(tl.int64) * skb + hk.to(tl.int64) * skh, cols, dims, seq, head_dim, sks)
    v = _load_block(v_ptr + b.to(tl.int64) * svb + hk.to(tl.int64) * svh, cols, dims, seq, head_dim, svs)
    bias = tl.load(bias_ptr + bhk.to(tl.int64) * seq + cols, mask=cols < seq, other=0.0).to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dbias = tl.zeros([BLOCK_N], tl.float32)
    start = (n0 // BLOCK_M) * BLOCK_M
    for g in range(0, groups):
        h = hk * groups + g
        q_head = q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        do_head = do_ptr + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
        row_head = (b * heads + h).to(tl.int64) * seq
        for m0 in range(start, seq, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            q = _load_block(q_head, rows, dims, seq, head_dim, sqs)
            do = _load_block(do_head, rows, dims, seq, head_dim, sds)
            lse = tl.load(lse_ptr + row_head + rows, mask=rows < seq, other=0.0)
            delta = tl.load(delta_ptr + row_head + rows, mask=rows < seq, other=0.0)
            p = tl.exp(_scores(q, k, bias, rows, cols, seq, scale, window, PRECISION)
                       - lse[:, None])
            dv += _dot(tl.trans(p).to(do.dtype), do, PRECISION)
            ds = p * (_dot(do, tl.trans(v), PRECISION) - delta[:, None])
            dk += _dot(tl.trans(ds).to(q.dtype), q, PRECISION)
            dbias += tl.sum(tl.where(cols[None, :] + window < rows[:, None], ds, 0.0), axis=0)
    mask = (cols < seq)[:, None] & (dims < head_dim)[None, :]
    offs = bhk.to(tl.int64) * seq * head_dim + cols[:, None] * head_dim + dims[None, :]
    tl.store(dk_ptr + offs, (dk * scale).to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=mask)
    tl.store(dbias_ptr + bhk.to(tl.int64) * seq + cols, dbias.to(dbias_ptr.dtype.element_ty),
             mask=cols < seq)


@triton.jit
def _attn_bwd_q(q_ptr, k_ptr, v_ptr, bias_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                seq, head_dim, heads, groups, scale, window,
                sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sdb, sdh, sds,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr):
    """Grid ``(query blocks, b * hq)``: ``dQ`` of one query block (contiguous ``[b, hq, s, d]``)."""
    bh = tl.program_id(1)
    b, h = bh // heads, bh % heads
    hk = h // groups
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q = _load_block(q_ptr + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh, rows, dims, seq, head_dim, sqs)
    do = _load_block(do_ptr + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh, rows, dims, seq, head_dim, sds)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * seq + rows, mask=rows < seq, other=0.0)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * seq + rows, mask=rows < seq, other=0.0)
    k_ptr += b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    v_ptr += b.to(tl.int64) * svb + hk.to(tl.int64) * svh
    bias_ptr += (b * (heads // groups) + hk).to(tl.int64) * seq
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = tl.minimum((tl.program_id(0) + 1) * BLOCK_M, seq)
    for n0 in range(0, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        k = _load_block(k_ptr, cols, dims, seq, head_dim, sks)
        v = _load_block(v_ptr, cols, dims, seq, head_dim, svs)
        bias = tl.load(bias_ptr + cols, mask=cols < seq, other=0.0).to(tl.float32)
        p = tl.exp(_scores(q, k, bias, rows, cols, seq, scale, window, PRECISION)
                   - lse[:, None])
        ds = p * (_dot(do, tl.trans(v), PRECISION) - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION)
    mask = (rows < seq)[:, None] & (dims < head_dim)[None, :]
    offs = bh.to(tl.int64) * seq * head_dim + rows[:, None] * head_dim + dims[None, :]
    tl.store(dq_ptr + offs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=mask)


def _strides(x: Tensor) -> tuple[int, int, int]:
    """(batch, head, seq) strides of ``[b, h, s, d]`` with a unit ``d`` stride."""
    return x.stride(0), x.stride(1), x.stride(2)


def _unit_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class DMCAttention(torch.autograd.Function):
    """Autograd wrapper of the kernels; see :func:`dmc_attention`."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, value: Tensor, state_bias: Tensor, scale: float,
                blocks: tuple[int, int, int, int, int], window: int) -> Tensor:
        query, key, value = _unit_last(query), _unit_last(key), _unit_last(value)
        bias = state_bias.contiguous()
        b, hq, seq, dim = query.shape
        block_m, block_n = blocks[0], blocks[1]
        out = torch.empty_like(query, dtype=value.dtype)  # keeps the query's layout
        lse = torch.empty(b, hq, seq, device=query.device, dtype=torch.float32)
        meta = _meta(query, dim)
        grid = (triton.cdiv(seq, block_m), b * hq)
        _attn_fwd[grid](query, key, value, bias, out, lse, seq, dim, hq, hq // key.shape[1], scale,
                        window, *_strides(query), *_strides(key), *_strides(value), *_strides(out),
                        BLOCK_M=block_m, BLOCK_N=block_n, **meta)
        ctx.save_for_backward(query, key, value, bias, out, lse)
        ctx.scale, ctx.blocks, ctx.bias_dtype = scale, blocks, state_bias.dtype
        ctx.window = window
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        query, key, value, bias, out, lse = ctx.saved_tensors
        grad = _unit_last(grad)
        b, hq, seq, dim = query.shape
        hk = key.shape[1]
        _, _, kv_m, kv_n, q_m_n = ctx.blocks
        delta = (grad.float() * out.float()).sum(-1).contiguous()
        dq = torch.empty(query.shape, device=query.device, dtype=query.dtype)
        dk = torch.empty(key.shape, device=key.device, dtype=key.dtype)
        dv = torch.empty(value.shape, device=value.device, dtype=value.dtype)
        dbias = torch.empty(bias.shape, device=bias.device, dtype=torch.float32)
        meta = _meta(query, dim)
        strides = (*_strides(query), *_strides(key), *_strides(value), *_strides(grad))
        _attn_bwd_kv[(triton.cdiv(seq, kv_n), b * hk)](
            query, key, value, bias, grad, lse, delta, dk, dv, dbias, seq, dim, hq, hq // hk,
            ctx.scale, ctx.window, *strides, BLOCK_M=kv_m, BLOCK_N=kv_n, **meta)
        _attn_bwd_q[(triton.cdiv(seq, q_m_n), b * hq)](
            query, key, value, bias, grad, lse, delta, dq, seq, dim, hq, hq // hk, ctx.scale,
            ctx.window, *strides, BLOCK_M=q_m_n, BLOCK_N=kv_m, **meta)
        return dq, dk, dv, dbias.to(ctx.bias_dtype), None, None, None


def _meta(query: Tensor, dim: int) -> dict:
    """Head-dim block (>= 16 for ``tl.dot``) and dot precision (exact fp32 for fp32 inputs)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        precision = "interpret"
    else:
        precision = "ieee" if query.dtype == torch.float32 else "tf32"
    return dict(BLOCK_D=max(16, triton.next_power_of_2(dim)), PRECISION=precision)


def dmc_attention(query: Tensor, key: Tensor, value: Tensor, state_bias: Tensor,
                  softmax_scale: Optional[float] = None, block_m: int = 64, block_n: int = 64,
                  block_bwd: tuple[int, int, int] = (32, 64, 64), bias_window: int = 0) -> Tensor:
    """Triton version of :func:`nemo_dmc.core.dmc_attention` without mask and dropout.

    Args:
        query: ``[b, hq, s, d]``; key, value: ``[b, hk, s, d]`` (``hq % hk == 0``), any
            strides with a unit last stride (megatron's permuted ``[s, b, h, d]`` views work
            without copies).
        state_bias: ``[b, hk, s]`` per-key bias (its gradient is returned in backward).
        block_m, block_n: forward query/key tile sizes (>= 16, powers of two).
        block_bwd: ``(query tile, key tile)`` of the key-side backward kernel and the query
            tile of the query-side one (its key tile is the first entry).
        bias_window: the bias applies where ``t - i > bias_window`` (0: DMC; DMS's window).

    Returns:
        ``[b, hq, s, d]`` in the dtype of ``value``, laid out like ``query``.
    """
    hq, hk = query.shape[1], key.shape[1]
    if hq % hk:
        raise ValueError(f"{hq} query heads do not split into {hk} KV heads")
    for size in (block_m, block_n, *block_bwd):
        # tl.arange needs powers of two and tl.dot (compiled, not interpreted) M, N, K >= 16
        if size < 16 or size & (size - 1):
            raise ValueError(f"block sizes must be powers of two >= 16, got {size}")
    if query.shape[0] * hq > 65535:  # grid axis 1 (b * hq programs) is limited to 65535
        raise ValueError(f"batch * heads = {query.shape[0] * hq} exceeds the grid limit 65535")
    scale = softmax_scale if softmax_scale is not None else query.shape[-1] ** -0.5
    if bias_window < 0:
        raise ValueError(f"bias_window must be >= 0, got {bias_window}")
    return DMCAttention.apply(query, key, value, state_bias, scale, (block_m, block_n, *block_bwd),
                              int(bias_window))
