"""The one-sided compression loss and realised compression ratios."""

from __future__ import annotations

import torch
from torch import Tensor


def merge_target(target_cr: float) -> float:
    """Fraction of merges ``p* = 1 - 1/CR`` that gives compression ratio ``CR``."""
    if target_cr < 1.0:
        raise ValueError(f"target compression ratio must be >= 1, got {target_cr}")
    return 1.0 - 1.0 / target_cr


def compression_loss(merge_fraction: Tensor, target_cr: float) -> Tensor:
    """``max(0, p* - r)``: penalise merging less than the target, never more.

    ``merge_fraction`` is the mean straight-through decision over tokens, heads and layers
    (already reduced across tensor-parallel ranks), so the gradient reaches every decision.
    """
    return torch.relu(merge_target(target_cr) - merge_fraction)


def realised_cr(merge_fraction: Tensor) -> Tensor:
    """Compression ratio ``1 / (1 - mean(alpha))`` = tokens / cache slots."""
    return 1.0 / (1.0 - merge_fraction.detach().float()).clamp_min(1e-6)
