"""Triton kernels for training-time partial accumulation (forward and backward).

Same result as :func:`nemo_dmc.core.partial_accumulate`. Every position ``m`` of a
``(batch, head)`` sequence holds entries ``e_m = [omega_m x_m | omega_m]`` (``D + 1``
channels, fp32) and the state ``y_m = sum_j P(j, m) e_j`` with
``P(j, m) = prod_{l=j+1..m} alpha_l`` over the last ``W`` positions (windowed) or all of them
(``window=None``: ``y_m = alpha_m y_{m-1} + e_m``); the output is ``y[:D] / y[D]``.

Windowed kernels work on ``[BLOCK_S, BLOCK_D]`` tiles of rows, reading the ``W`` shifted
row tiles they need from global memory (``O(W S D)`` work, nothing ``S x W`` stored).
Unbounded kernels walk a sequence chunk by chunk with ``tl.associative_scan`` inside a chunk
and a carried state between chunks.

Backward, with ``g = dL/d out`` and ``Zc = max(y[D], tiny)``:
``dE_m = [g_m / Zc_m | -(g_m . y_m[:D]) / Zc_m^2]`` (the last channel 0 where ``Z`` was
clamped), then

* entries: ``de_j = sum_{i} P(j, i) dE_i`` (the transposed scan; unbounded:
  ``de_j = dE_j + alpha_{j+1} de_{j+1}``); ``dx = omega * de[:D]``,
  ``domega = x . de[:D] + de[D]``;
* decisions: ``alpha_m`` is a factor of ``P(j, i)`` for ``j < m <= i``, so
  ``dalpha_m = sum_{a, b} (P(m, m+a) dE_{m+a}) . (P(m-1-b, m-1) e_{m-1-b})`` over
  ``a + b <= W - 2``, i.e. ``sum_{a=0}^{W-2} F_a . Y^{(W-1-a)}_{m-1}`` with ``Y^{(n)}`` the
  state truncated to ``n`` terms; unbounded: ``dalpha_m = de_m . y_{m-1}``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

@triton.jit
def _load_rows(ptr, rows, seq):
    """fp32 values of a per-position vector at ``rows`` (0 outside ``[0, seq)``)."""
    return tl.load(ptr + rows, mask=(rows >= 0) & (rows < seq), other=0.0).to(tl.float32)


@triton.jit
def _load_tile(ptr, rows, cols, seq, width):
    """fp32 ``[rows, cols]`` tile of a row-major ``[seq, width]`` matrix (0 outside)."""
    inside = ((rows >= 0) & (rows < seq))[:, None] & (cols < width)[None, :]
    return tl.load(ptr + rows[:, None] * width + cols[None, :], mask=inside, other=0.0).to(tl.float32)


@triton.jit
def _entries(x_ptr, omega_ptr, rows, cols, seq, dim):
    """Entries ``[omega x | omega]`` at ``rows`` and channels ``cols`` of ``[0, dim]``."""
    x = _load_tile(x_ptr, rows, cols, seq, dim)
    x = tl.where((cols == dim)[None, :], 1.0, x)
    return _load_rows(omega_ptr, rows, seq)[:, None] * x


@triton.jit
def _windowed_weight(alpha_ptr, omega_ptr, rows, seq, WINDOW: tl.constexpr):
    """``Z_m = sum_{k<W} P(m-k, m) omega_{m-k}`` for ``rows``."""
    z = _load_rows(omega_ptr, rows, seq)
    decay = tl.full(z.shape, 1.0, tl.float32)
    for k in range(1, WINDOW):
        decay = decay * _load_rows(alpha_ptr, rows - k + 1, seq)
        z += decay * _load_rows(omega_ptr, rows - k, seq)
    return z


@triton.jit
def _windowed_state(x_ptr, alpha_ptr, omega_ptr, rows, cols, seq, dim, WINDOW: tl.constexpr):
    """``y_m = sum_{k<W} P(m-k, m) e_{m-k}`` tile (same term order as ``windowed_scan``)."""
    y = _entries(x_ptr, omega_ptr, rows, cols, seq, dim)
    decay = tl.full([y.shape[0]], 1.0, tl.float32)
    for k in range(1, WINDOW):
        decay = decay * _load_rows(alpha_ptr, rows - k + 1, seq)
        y += decay[:, None] * _entries(x_ptr, omega_ptr, rows - k, cols, seq, dim)
    return y


@triton.jit
def _windowed_fwd(x_ptr, alpha_ptr, omega_ptr, out_ptr, seq, dim, WINDOW: tl.constexpr,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid ``(b * h, chunks)``: normalised windowed states of one chunk of rows."""
    bh = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    x_ptr += bh * seq * dim
    out_ptr += bh * seq * dim
    alpha_ptr += bh * seq
    omega_ptr += bh * seq
    zc = tl.maximum(_windowed_weight(alpha_ptr, omega_ptr, rows, seq, WINDOW), 1.1754943508222875e-38)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        y = _windowed_state(x_ptr, alpha_ptr, omega_ptr, rows, cols, seq, dim, WINDOW)
        mask = (rows < seq)[:, None] & (cols < dim)[None, :]
        tl.store(out_ptr + rows[:, None] * dim + cols[None, :],
                 (y / zc[:, None]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _windowed_state_grad(x_ptr, alpha_ptr, omega_ptr, grad_ptr, dstate_ptr, seq, dim,
                         WINDOW: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid ``(b * h, chunks)``: ``dE = dL/dy`` ``[seq, dim + 1]`` (fp32) from ``dL/d out``."""
    bh = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    x_ptr += bh * seq * dim
    grad_ptr += bh * seq * dim
    dstate_ptr += bh * seq * (dim + 1)
    alpha_ptr += bh * seq
    omega_ptr += bh * seq
    z = _windowed_weight(alpha_ptr, omega_ptr, rows, seq, WINDOW)
    zc = tl.maximum(z, 1.1754943508222875e-38)
    dot = tl.zeros([BLOCK_S], tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        y = _windowed_state(x_ptr, alpha_ptr, omega_ptr, rows, cols, seq, dim, WINDOW)
        g = _load_tile(grad_ptr, rows, cols, seq, dim)
        dot += tl.sum(g * y, axis=1)
        mask = (rows < seq)[:, None] & (cols < dim)[None, :]
        tl.store(dstate_ptr + rows[:, None] * (dim + 1) + cols[None, :], g / zc[:, None], mask=mask)
    dz = tl.where(z >= 1.1754943508222875e-38, -dot / zc / zc, 0.0)
    tl.store(dstate_ptr + rows * (dim + 1) + dim, dz, mask=rows < seq)


@triton.jit
def _decay_ahead(alpha_ptr, rows, steps, seq, BLOCK_S: tl.constexpr):
    """``P(m, m + steps) = prod_{l=1..steps} alpha_{m+l}`` for ``rows``."""
    decay = tl.full([BLOCK_S], 1.0, tl.float32)
    for l in range(1, steps + 1):
        decay = decay * _load_rows(alpha_ptr, rows + l, seq)
    return decay


@triton.jit
def _windowed_bwd(x_ptr, alpha_ptr, omega_ptr, dstate_ptr, dx_ptr, dalpha_ptr, domega_ptr,
                  seq, dim, WINDOW: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid ``(b * h, chunks)``: gradients of ``x``, ``alpha``, ``omega`` from ``dE``."""
    bh = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    x_ptr += bh * seq * dim
    dx_ptr += bh * seq * dim
    dstate_ptr += bh * seq * (dim + 1)
    alpha_ptr += bh * seq
    omega_ptr += bh * seq
    omega = _load_rows(omega_ptr, rows, seq)
    domega = tl.zeros([BLOCK_S], tl.float32)
    dalpha = tl.zeros([BLOCK_S], tl.float32)
    for d0 in range(0, dim + 1, BLOCK_D):  # channel `dim` is the weight Z
        cols = d0 + tl.arange(0, BLOCK_D)
        # de_m = sum_{k<W} P(m, m+k) dE_{m+k}
        de = _load_tile(dstate_ptr, rows, cols, seq, dim + 1)
        decay = tl.full([BLOCK_S], 1.0, tl.float32)
        for k in range(1, WINDOW):
            decay = decay * _load_rows(alpha_ptr, rows + k, seq)
            de += decay[:, None] * _load_tile(dstate_ptr, rows + k, cols, seq, dim + 1)
        x = tl.where((cols == dim)[None, :], 1.0, _load_tile(x_ptr, rows, cols, seq, dim))
        domega += tl.sum(de * x, axis=1)
        mask = (rows < seq)[:, None] & (cols < dim)[None, :]
        tl.store(dx_ptr + rows[:, None] * dim + cols[None, :],
                 (omega[:, None] * de).to(dx_ptr.dtype.element_ty), mask=mask)
        # dalpha_m = sum_b (P(m, m+a) dE_{m+a}) . Y^{(b+1)}_{m-1}, a = W-2-b
        y = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
        back = tl.full([BLOCK_S], 1.0, tl.float32)
        for b in range(0, WINDOW - 1):
            y += back[:, None] * _entries(x_ptr, omega_ptr, rows - 1 - b, cols, seq, dim)
            back = back * _load_rows(alpha_ptr, rows - 1 - b, seq)
            a = WINDOW - 2 - b
            ahead = _decay_ahead(alpha_ptr, rows, a, seq, BLOCK_S)
            ahead_grad = ahead[:, None] * _load_tile(dstate_ptr, rows + a, cols, seq, dim + 1)
            dalpha += tl.sum(ahead_grad * y, axis=1)
    tl.store(domega_ptr + bh * seq + rows, domega, mask=rows < seq)
    tl.store(dalpha_ptr + bh * seq + rows, dalpha, mask=rows < seq)


@triton.jit
def _recurrence(left_a, left_x, right_a, right_x):
    """Compose ``y -> a y + x`` maps: ``left`` first, then ``right``."""
    return left_a * right_a, right_a * left_x + right_x


@triton.jit
def _scan_chunk(a, x, carry):
    """``y_r = a_r y_{r-1} + x_r`` along axis 0 of ``[BLOCK_S, BLOCK_D]`` from ``y_{-1} = carry``."""
    prod, acc = tl.associative_scan((a, x), 0, _recurrence)
    return acc + prod * carry[None, :]


@triton.jit
def _scan_fwd(x_ptr, alpha_ptr, omega_ptr, out_ptr, weight_ptr, carry_ptr, seq, dim, chunks,
              BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid ``(b * h, channel blocks of D + 1)``: unbounded states, chunk after chunk.

    Also stores ``Z`` ``[seq]`` and each chunk's last state ``[chunks, dim + 1]`` (fp32) for
    the backward pass.
    """
    bh = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    x_ptr += bh * seq * dim
    out_ptr += bh * seq * dim
    alpha_ptr += bh * seq
    omega_ptr += bh * seq
    weight_ptr += bh * seq
    carry_ptr += bh * chunks * (dim + 1)
    offs = tl.arange(0, BLOCK_S)
    carry = tl.zeros([BLOCK_D], tl.float32)
    carry_z = 0.0
    for c in range(0, chunks):
        rows = c * BLOCK_S + offs
        alpha = _load_rows(alpha_ptr, rows, seq)
        e = _entries(x_ptr, omega_ptr, rows, cols, seq, dim)
        y = _scan_chunk(alpha[:, None] + tl.zeros_like(e), e, carry)
        # Z by a 1-D scan: a [BLOCK_S, 1] scan fails to lower in Triton 3.6 (ScanOpToLLVM)
        prod_z, acc_z = tl.associative_scan((alpha, _load_rows(omega_ptr, rows, seq)), 0, _recurrence)
        z = acc_z + prod_z * carry_z
        carry = tl.sum(tl.where((offs == BLOCK_S - 1)[:, None], y, 0.0), axis=0)
        carry_z = tl.sum(tl.where(offs == BLOCK_S - 1, z, 0.0), axis=0)
        tl.store(carry_ptr + c * (dim + 1) + cols, carry, mask=cols <= dim)
        tl.store(weight_ptr + rows, z, mask=rows < seq)
        mask = (rows < seq)[:, None] & (cols < dim)[None, :]
        out = y / tl.maximum(z, 1.1754943508222875e-38)[:, None]
        tl.store(out_ptr + rows[:, None] * dim + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _previous_states(x_ptr, alpha_ptr, omega_ptr, carry_ptr, c, rows, cols, seq, dim,
                     BLOCK_S: tl.constexpr):
    """``y_{m-1}`` for the rows of chunk ``c`` (``[BLOCK_S, BLOCK_D]``), from the stored
    state at the end of chunk ``c - 1``: a scan of ``(alpha_{m-1}, e_{m-1})`` whose first
    element is replaced by ``(0, carry)``."""
    first = (tl.arange(0, BLOCK_S) == 0)[:, None]
    carry = tl.load(carry_ptr + (c - 1) * (dim + 1) + cols, mask=(cols <= dim) & (c > 0), other=0.0)
    e = _entries(x_ptr, omega_ptr, rows - 1, cols, seq, dim)
    a = _load_rows(alpha_ptr, rows - 1, seq)[:, None] + tl.zeros_like(e)
    a = tl.where(first, 0.0, a)
    e = tl.where(first, carry[None, :], e)
    return _scan_chunk(a, e, tl.zeros_like(carry))


@triton.jit
def _scan_state_grad(x_ptr, alpha_ptr, omega_ptr, weight_ptr, carry_ptr, grad_ptr, dz_ptr,
                     seq, dim, chunks, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid ``(b * h, chunks)``: ``dL/dZ = -(g . y[:D]) / Zc^2`` ``[seq]`` (fp32)."""
    bh = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    rows = c * BLOCK_S + tl.arange(0, BLOCK_S)
    x_ptr += bh * seq * dim
    grad_ptr += bh * seq * dim
    alpha_ptr += bh * seq
    omega_ptr += bh * seq
    carry_ptr += bh * chunks * (dim + 1)
    alpha = _load_rows(alpha_ptr, rows, seq)
    dot = tl.zeros([BLOCK_S], tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        prev = _previous_states(x_ptr, alpha_ptr, omega_ptr, carry_ptr, c, rows, cols, seq, dim, BLOCK_S)
        y = alpha[:, None] * prev + _entries(x_ptr, omega_ptr, rows, cols, seq, dim)
        dot += tl.sum(_load_tile(grad_ptr, rows, cols, seq, dim) * y, axis=1)
    z = _load_rows(weight_ptr + bh * seq, rows, seq)
    zc = tl.maximum(z, 1.1754943508222875e-38)
    dz = tl.where(z >= 1.1754943508222875e-38, -dot / zc / zc, 0.0)
    tl.store(dz_ptr + bh * seq + rows, dz, mask=rows < seq)


@triton.jit
def _scan_bwd(x_ptr, alpha_ptr, omega_ptr, weight_ptr, carry_ptr, grad_ptr, dz_ptr, dx_ptr,
              dalpha_ptr, domega_ptr, seq, dim, chunks, heads,
              BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid ``(b * h, channel blocks of D + 1)``: chunks from last to first, carrying
    ``de`` backwards; ``dalpha``/``domega`` partial sums per channel block."""
    bh = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    cols = block * BLOCK_D + tl.arange(0, BLOCK_D)
    x_ptr += bh * seq * dim
    grad_ptr += bh * seq * dim
    dx_ptr += bh * seq * dim
    alpha_ptr += bh * seq
    omega_ptr += bh * seq
    weight_ptr += bh * seq
    dz_ptr += bh * seq
    carry_ptr += bh * chunks * (dim + 1)
    partial = (block * heads + bh) * seq
    offs = tl.arange(0, BLOCK_S)
    carry = tl.zeros([BLOCK_D], tl.float32)
    for t in range(0, chunks):
        c = chunks - 1 - t
        # de_j = dE_j + alpha_{j+1} de_{j+1}: a forward scan over the rows in reverse order
        # (tl.associative_scan(reverse=True) is avoided: triton-lang/triton#4362)
        rev = c * BLOCK_S + BLOCK_S - 1 - offs
        zc = tl.maximum(_load_rows(weight_ptr, rev, seq), 1.1754943508222875e-38)
        grad = _load_tile(grad_ptr, rev, cols, seq, dim) / zc[:, None]
        grad = tl.where((cols == dim)[None, :], _load_rows(dz_ptr, rev, seq)[:, None], grad)
        ahead = _load_rows(alpha_ptr, rev + 1, seq)[:, None] + tl.zeros_like(grad)
        de_rev = _scan_chunk(ahead, grad, carry)
        carry = tl.sum(tl.where((offs == BLOCK_S - 1)[:, None], de_rev, 0.0), axis=0)
        de = tl.flip(de_rev, 0)
        rows = c * BLOCK_S + offs
        prev = _previous_states(x_ptr, alpha_ptr, omega_ptr, carry_ptr, c, rows, cols, seq, dim, BLOCK_S)
        x = tl.where((cols == dim)[None, :], 1.0, _load_tile(x_ptr, rows, cols, seq, dim))
        omega = _load_rows(omega_ptr, rows, seq)
        tl.store(dx_ptr + rows[:, None] * dim + cols[None, :],
                 (omega[:, None] * de).to(dx_ptr.dtype.element_ty),
                 mask=(rows < seq)[:, None] & (cols < dim)[None, :])
        tl.store(domega_ptr + partial + rows, tl.sum(de * x, axis=1), mask=rows < seq)
        tl.store(dalpha_ptr + partial + rows, tl.sum(de * prev, axis=1), mask=rows < seq)


def _blocks(seq: int, dim: int, block_s: int, block_d: int) -> tuple[int, int]:
    """(row chunks, channel blocks of ``dim + 1``)."""
    return triton.cdiv(seq, block_s), triton.cdiv(dim + 1, block_d)


class PartialAccumulation(torch.autograd.Function):
    """Autograd wrapper of the kernels; see :func:`partial_accumulate`."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, omega: Tensor, window: Optional[int],
                block_s: int, block_d: int) -> Tensor:
        b, h, seq, dim = x.shape
        x = x.contiguous()
        a32 = alpha.to(torch.float32).contiguous()
        w32 = omega.to(torch.float32).contiguous()
        out = torch.empty_like(x)
        chunks, channel_blocks = _blocks(seq, dim, block_s, block_d)
        meta = dict(BLOCK_S=block_s, BLOCK_D=block_d)
        if window is None:
            weight = torch.empty(b * h, seq, device=x.device, dtype=torch.float32)
            carry = torch.empty(b * h, chunks, dim + 1, device=x.device, dtype=torch.float32)
            _scan_fwd[(b * h, channel_blocks)](x, a32, w32, out, weight, carry, seq, dim, chunks, **meta)
            ctx.save_for_backward(x, a32, w32, weight, carry)
        else:
            _windowed_fwd[(b * h, chunks)](x, a32, w32, out, seq, dim, WINDOW=window, **meta)
            ctx.save_for_backward(x, a32, w32)
        ctx.window, ctx.meta = window, meta
        ctx.dtypes = (alpha.dtype, omega.dtype)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, a32, w32, *saved = ctx.saved_tensors
        b, h, seq, dim = x.shape
        grad = grad.contiguous()
        meta = ctx.meta
        chunks, channel_blocks = _blocks(seq, dim, meta["BLOCK_S"], meta["BLOCK_D"])
        dx = torch.empty_like(x)
        if ctx.window is None:
            weight, carry = saved
            dz = torch.empty(b * h, seq, device=x.device, dtype=torch.float32)
            _scan_state_grad[(b * h, chunks)](x, a32, w32, weight, carry, grad, dz, seq, dim,
                                              chunks, **meta)
            partial = torch.empty(2, channel_blocks, b * h, seq, device=x.device, dtype=torch.float32)
            _scan_bwd[(b * h, channel_blocks)](x, a32, w32, weight, carry, grad, dz, dx,
                                               partial[0], partial[1], seq, dim, chunks, b * h, **meta)
            dalpha, domega = partial.sum(1)
        else:
            dstate = torch.empty(b * h, seq, dim + 1, device=x.device, dtype=torch.float32)
            _windowed_state_grad[(b * h, chunks)](x, a32, w32, grad, dstate, seq, dim,
                                                  WINDOW=ctx.window, **meta)
            dalpha = torch.empty(b * h, seq, device=x.device, dtype=torch.float32)
            domega = torch.empty_like(dalpha)
            _windowed_bwd[(b * h, chunks)](x, a32, w32, dstate, dx, dalpha, domega, seq, dim,
                                           WINDOW=ctx.window, **meta)
        alpha_dtype, omega_dtype = ctx.dtypes
        return (dx, dalpha.view(b, h, seq).to(alpha_dtype), domega.view(b, h, seq).to(omega_dtype),
                None, None, None)


def partial_accumulate(x: Tensor, alpha: Tensor, omega: Tensor, window: Optional[int],
                       block_s: int = 64, block_d: int = 64) -> Tensor:
    """Triton version of :func:`nemo_dmc.core.partial_accumulate` (same arguments).

    ``x`` ``[b, h, s, d]`` (fp32/bf16/fp16), ``alpha``/``omega`` ``[b, h, s]``; states are
    accumulated in fp32 and returned in the dtype of ``x``. ``block_s``/``block_d``: tile
    sizes (powers of two).
    """
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    for size in (block_s, block_d):
        if size < 1 or size & (size - 1):  # tl.arange (and tl.flip) need powers of two
            raise ValueError(f"block sizes must be powers of two, got {size}")
    return PartialAccumulation.apply(x, alpha, omega, window, block_s, block_d)
