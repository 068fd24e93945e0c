"""The one-sided compression loss and realised compression ratios."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def merge_target(target_cr: float) -> float:
    """Fraction of merges ``p* = 1 - 1/CR`` that gives compression ratio ``CR``."""
    if target_cr < 1.0:
        raise ValueError(f"target compression ratio must be >= 1, got {target_cr}")
    return 1.0 - 1.0 / target_cr


def compression_loss(merge_fraction: Tensor, target_cr: float) -> Tensor:
    """``mean(max(0, p* - r))``: penalise merging less than the target, never more.

    ``merge_fraction`` is the mean straight-through decision over tokens, heads and layers
    (already reduced across tensor-parallel ranks), so the gradient reaches every decision;
    or a tensor of such fractions (one per unit), whose hinges are averaged.
    """
    return torch.relu(merge_target(target_cr) - merge_fraction).mean()


def realised_cr(merge_fraction: Tensor) -> Tensor:
    """Compression ratio ``1 / (1 - mean(alpha))`` = tokens / cache slots."""
    return 1.0 / (1.0 - merge_fraction.detach().float()).clamp_min(1e-6)


def cap_fraction(target_cr: float, cap: float) -> float:
    """Merge fraction ``1 - 1/(k * CR)`` of a unit at ``k`` times the target ratio."""
    return merge_target(cap * target_cr)


def dmc_compression_loss(head_fraction: Tensor, target_cr: float, reduction: str = "global",
                         balance: str = "none", cap: Optional[float] = None) -> Tensor:
    """The compression loss ``L_cr`` in every form of :class:`~nemo_dmc.core.DMCConfig`.

    ``head_fraction``: ``[batch, layers, kv_heads]`` mean straight-through decision of each
    sequence's tokens per (layer, global KV head). The units ``u`` are the whole model
    (``balance="none"``), each layer or each head; their merge fractions ``r_u`` are pooled
    over the batch (``reduction="global"``) or taken per sequence (``"sequence"``). Then
    ``L_cr = mean_u relu(p* - r_u) [+ mean_u relu(r_u - (1 - 1/(cap * CR)))]``, the mean also
    over sequences. ``global`` + ``none`` is :func:`compression_loss` of the mean decision.
    """
    if head_fraction.dim() != 3:
        raise ValueError("head_fraction must be [batch, layers, kv_heads], "
                         f"got {tuple(head_fraction.shape)}")
    loss = compression_loss(_unit_fractions(head_fraction, balance, reduction), target_cr)
    if cap is not None:  # capped units: heads with balance=head, else layers
        capped = _unit_fractions(head_fraction, "head" if balance == "head" else "layer",
                                 reduction)
        loss = loss + torch.relu(capped - cap_fraction(target_cr, cap)).mean()
    return loss


def _unit_fractions(head_fraction: Tensor, unit: str, reduction: str) -> Tensor:
    """Merge fractions of each unit (``none``: the model, ``layer``, ``head``), per sequence
    or pooled over the batch (``reduction``)."""
    dims = {"none": (1, 2), "layer": (2,), "head": ()}[unit]
    fractions = head_fraction.mean(dim=dims) if dims else head_fraction
    if reduction == "global":
        return fractions.mean(dim=0)
    if reduction != "sequence":
        raise ValueError(f"dmc.loss_reduction must be 'global' or 'sequence', got {reduction!r}")
    return fractions
