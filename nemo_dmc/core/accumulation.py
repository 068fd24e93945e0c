"""Partial accumulation of keys/values: the state inference would hold after each token.

``acc_i = alpha_i * acc_{i-1} + omega_i * x_i`` (truncated to the last ``W`` terms when
windowed), normalised by the same recursion over ``omega``. Computed in parallel over the
sequence in ``O(W * S * D)`` (windowed) or ``O(log S * S * D)`` (unbounded) work, never
materialising an ``S x S`` tensor.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _shift_right(x: Tensor, steps: int, dim: int, fill: float = 0.0) -> Tensor:
    """``y[i] = x[i - steps]`` along ``dim``, ``fill`` where ``i < steps``."""
    pad = [0, 0] * (x.dim() - 1 - (dim % x.dim())) + [steps, 0]
    return F.pad(x, pad, value=fill).narrow(dim, 0, x.shape[dim])


def linear_scan(alpha: Tensor, x: Tensor) -> Tensor:
    """Inclusive scan ``y_i = alpha_i * y_{i-1} + x_i`` by recursive doubling.

    Args:
        alpha: ``[..., s]`` decay per position.
        x: ``[..., s, d]`` inputs.
    """
    step, seq = 1, x.shape[-2]
    while step < seq:
        x = x + alpha.unsqueeze(-1) * _shift_right(x, step, dim=-2)
        alpha = alpha * _shift_right(alpha, step, dim=-1, fill=1.0)
        step *= 2
    return x


def windowed_scan(alpha: Tensor, x: Tensor, window: int) -> Tensor:
    """``y_i = sum_{k<W} (prod_{m=i-k+1..i} alpha_m) x_{i-k}``: the scan truncated to ``W`` terms."""
    out, decay = x, torch.ones_like(alpha)
    for k in range(1, min(window, x.shape[-2])):
        decay = decay * _shift_right(alpha, k - 1, dim=-1)
        out = out + decay.unsqueeze(-1) * _shift_right(x, k, dim=-2)
    return out


def weighted_entries(x: Tensor, omega: Tensor) -> Tensor:
    """``[..., s, d]`` values and ``[..., s]`` importances -> ``[..., s, d + 1]`` entries
    ``[omega * x, omega]`` in >= fp32: scanning them gives numerator and weight together."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    omega = omega.to(dtype).unsqueeze(-1)
    return torch.cat([omega * x.to(dtype), omega], dim=-1)


def normalize_sums(acc: Tensor) -> Tensor:
    """Scanned entries ``[..., d + 1]`` -> weighted averages ``S / Z`` ``[..., d]``."""
    return acc[..., :-1] / acc[..., -1:].clamp_min(torch.finfo(acc.dtype).tiny)


def partial_accumulate(x: Tensor, alpha: Tensor, omega: Tensor, window: Optional[int]) -> Tensor:
    """Importance-weighted running average of ``x`` over each merge run.

    Args:
        x: ``[b, h, s, d]`` keys or values (pre-RoPE).
        alpha: ``[b, h, s]`` merge weights (``alpha_0`` should be 0).
        omega: ``[b, h, s]`` importance weights (> 0).
        window: at most this many latest tokens per run, or ``None`` for the whole run.

    Returns:
        ``[b, h, s, d]`` in the dtype of ``x``; row ``i`` is the state after token ``i``.
    """
    entries = weighted_entries(x, omega)
    alpha = alpha.to(entries.dtype)
    if window is None:
        acc = linear_scan(alpha, entries)
    else:
        acc = windowed_scan(alpha, entries, window)
    return normalize_sums(acc).to(x.dtype)
