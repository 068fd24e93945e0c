"""Per-token, per-KV-head DMC decisions (merge vs append) and importance weights.

Shapes follow ``[batch, heads, seq, dim]``; decision tensors are ``[batch, kv_heads, seq]``.
``alpha = 1`` means MERGE into the head's last slot, ``alpha = 0`` means APPEND a slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from nemo_dmc.core.config import DMCConfig


@dataclass
class Decisions:
    """Decisions of one layer for a whole sequence (all ``[batch, kv_heads, seq]``).

    alpha: weight of the previous state in the accumulation (soft in training, 0/1 in eval).
    hard: 0/1 decisions as inference would take them.
    straight_through: ``hard`` in the forward pass, gradient of ``alpha`` in the backward.
    state_bias: additive score bias for key ``i`` seen by queries ``t > i``: the log
        probability that state ``i`` survives, ``log(1 - alpha_{i+1})``; 0 for the last key.
    """

    alpha: Tensor
    hard: Tensor
    straight_through: Tensor
    state_bias: Tensor


def decision_logits(key: Tensor, init_offset: float, scale: float = 1.0) -> Tensor:
    """``s * k[..., D-1] - c`` for pre-RoPE keys ``[b, hk, s, D]`` -> ``[b, hk, s]`` (>= fp32).

    ``scale`` is :attr:`DMCConfig.decision_scale` (1 = the paper), applied after promotion.
    """
    return signal_logits(key[..., -1], init_offset, scale)


def importance(query: Tensor, num_kv_heads: int, init_offset: float, scale: float = 1.0) -> Tensor:
    """``sigmoid(s * mean_group(q[..., D-1]) + c)``: ``[b, hq, s, D]`` -> ``[b, hk, s]`` (>= fp32).

    ``scale`` is :attr:`DMCConfig.decision_scale` (1 = the paper), applied after promotion.

    Query heads of one GQA group are contiguous (megatron's per-group QKV layout).
    """
    b, hq, s, _ = query.shape
    if hq % num_kv_heads:
        raise ValueError(f"{hq} query heads do not split into {num_kv_heads} KV groups")
    channel = query[..., -1].to(torch.promote_types(query.dtype, torch.float32))
    return signal_importance(channel.view(b, num_kv_heads, hq // num_kv_heads, s).mean(dim=2),
                             init_offset, scale)


def signal_logits(signal: Tensor, init_offset: float, scale: float = 1.0) -> Tensor:
    """Decision logits ``s * x - c`` of a per-KV-head decision signal ``x`` ``[b, hk, s]``
    (channel D-1 of the keys, or a decision adapter's output), in at least fp32."""
    signal = signal.to(torch.promote_types(signal.dtype, torch.float32))
    if scale != 1.0:
        signal = signal * scale
    return signal - init_offset


def signal_importance(signal: Tensor, init_offset: float, scale: float = 1.0) -> Tensor:
    """Importance ``sigmoid(s * x + c)`` of a per-KV-head importance signal ``x``
    ``[b, hk, s]`` (the group mean of query channel D-1, or a decision adapter's output)."""
    signal = signal.to(torch.promote_types(signal.dtype, torch.float32))
    if scale != 1.0:
        signal = signal * scale
    return torch.sigmoid(signal + init_offset)


def source_logits(key: Tensor, settings, signals: Optional[Tensor] = None) -> Tensor:
    """Decision logits ``[b, hk, ...]`` from the settings' ``decision_source``: channel D-1 of
    pre-RoPE keys ``[b, hk, ..., d]``, or signal 0 of the decision adapter's ``signals
    [b, hk, ..., n]``. ``settings``: any settings with ``init_offset``, ``decision_scale``
    and ``decision_source`` (DMC's, DMS's)."""
    c, scale = settings.init_offset, settings.decision_scale
    if settings.decision_source == "adapter":
        if signals is None:
            raise ValueError("decision_source='adapter' needs the decision adapter's signals")
        return signal_logits(signals[..., 0], c, scale)
    return decision_logits(key, c, scale)


def attended(x: Tensor, settings) -> Tensor:
    """A query or key as attention sees it: channel D-1 zeroed for the ``channel`` decision
    source (it carried the decision), intact for the ``adapter`` one."""
    return zero_decision_channel(x) if settings.decision_source == "channel" else x


def zeroes_after_rope(settings) -> bool:
    """Whether attention zeroes channel D-1 of the rotated q/k again (``zero_after_rope`` with
    the ``channel`` decision source; the adapter source keeps q and k intact)."""
    return settings.decision_source == "channel" and settings.zero_after_rope


def after_rope(x: Tensor, zero_after_rope: bool) -> Tensor:
    """A rotated query or key as attention sees it: channel D-1 zeroed again with
    ``zero_after_rope`` (:attr:`DMCConfig.zero_after_rope`), else ``x`` as is."""
    return zero_decision_channel(x) if zero_after_rope else x


def zero_decision_channel(x: Tensor) -> Tensor:
    """Return ``x`` with its last channel (the repurposed one) set to zero."""
    return F.pad(x[..., :-1], (0, 1))


def sample_logistic_noise(shape: torch.Size, device: torch.device,
                          generator: Optional[torch.Generator] = None) -> Tensor:
    """``g1 - g2`` for two Gumbel(0, 1) samples, i.e. Logistic(0, 1) noise, in fp32."""
    u = torch.rand(shape, device=device, dtype=torch.float32, generator=generator)
    u = u.clamp(torch.finfo(torch.float32).tiny, 1.0 - torch.finfo(torch.float32).eps)
    return torch.log(u) - torch.log1p(-u)


def _first_token_appends(x: Tensor) -> Tensor:
    """Zero position 0 along the last dim (the first token of a sequence never merges)."""
    return F.pad(x[..., 1:], (1, 0))


def _survival_bias(log_keep: Tensor) -> Tensor:
    """Shift ``log(1 - alpha)`` one step left: state ``i`` survives iff token ``i+1`` appends."""
    return F.pad(log_keep[..., 1:], (0, 1))


def hard_merges(logits: Tensor, config: DMCConfig) -> Tensor:
    """Hard decisions (bool) before the first-token rule: ``l > 0``, or as forced."""
    if config.force_decision is not None:
        return torch.full_like(logits, config.force_decision == "merge", dtype=torch.bool)
    return logits > 0


def make_decisions(logits: Tensor, config: DMCConfig, training: bool,
                   noise: Optional[Tensor] = None) -> Decisions:
    """Turn decision logits ``[b, hk, s]`` into :class:`Decisions`.

    In training the decisions are relaxed, ``sigmoid((l + noise) / tau)`` with logistic
    noise (sampled here unless ``noise`` is given, e.g. sliced from a TP-global sample);
    in eval they are hard, ``1[l > 0]``.
    """
    if config.force_decision is not None:
        hard = _first_token_appends(hard_merges(logits, config).to(logits.dtype))
        bias = _survival_bias(hard * config.hard_bias)
        return Decisions(alpha=hard, hard=hard, straight_through=hard, state_bias=bias)

    if training:
        if noise is None:
            noise = sample_logistic_noise(logits.shape, logits.device)
        z = (logits + noise.to(logits.dtype)) / config.temperature
        alpha = _first_token_appends(torch.sigmoid(z))
        hard = _first_token_appends((z > 0).float())
        straight_through = hard + (alpha - alpha.detach())  # exactly `hard` in forward
        # log(1 - sigmoid(z)) = logsigmoid(-z): exact and finite even when alpha rounds to 1.
        bias = _survival_bias(F.logsigmoid(-z))
        return Decisions(alpha=alpha, hard=hard, straight_through=straight_through, state_bias=bias)

    hard = _first_token_appends(hard_merges(logits, config).float())
    bias = _survival_bias(hard * config.hard_bias)
    return Decisions(alpha=hard, hard=hard, straight_through=hard, state_bias=bias)
