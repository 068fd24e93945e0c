"""Causal attention over partially accumulated states, with the DMC survival bias.

Query ``t`` attends to its own open state ``t`` (no bias) and to every earlier state ``i``
with the additive bias ``log(1 - alpha_{i+1})``: the log probability that state ``i`` is
still in the cache, i.e. that token ``i + 1`` did not merge into it.

The per-key bias applies where ``t - i > bias_window``: 0 for DMC (every earlier state), the
eviction delay ``w`` for DMS (``nemo_dmc.methods.dms``: a key is exempt while in the window).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from nemo_dmc.core.accumulation import partial_accumulate
from nemo_dmc.core.config import DMCConfig
from nemo_dmc.core.decisions import (
    Decisions,
    after_rope,
    attended,
    importance,
    make_decisions,
    signal_importance,
    source_logits,
    zeroes_after_rope,
)


def dmc_score_bias(state_bias: Tensor, mask: Optional[Tensor] = None,
                   bias_window: int = 0) -> Tensor:
    """Dense additive score bias ``[b, hk, s, s]`` from per-key ``state_bias`` ``[b, hk, s]``.

    ``bias[t, i] = state_bias[i]`` for ``t - i > bias_window``, ``0`` for
    ``0 <= t - i <= bias_window``, ``-inf`` for ``i > t``.
    ``mask`` (bool, True = masked, broadcastable to ``[b, 1, s, s]``) is applied on top.
    """
    s = state_bias.shape[-1]
    ones = torch.ones(s, s, dtype=torch.bool, device=state_bias.device)
    causal = torch.zeros(s, s, dtype=state_bias.dtype, device=state_bias.device)
    causal = causal.masked_fill(ones.triu(1), float("-inf"))
    bias = torch.where(ones.tril(-1 - bias_window), state_bias.unsqueeze(-2), causal)
    if mask is not None:
        bias = bias.masked_fill(mask, float("-inf"))
    return bias


def dmc_attention(query: Tensor, key: Tensor, value: Tensor, state_bias: Tensor,
                  softmax_scale: Optional[float] = None, mask: Optional[Tensor] = None,
                  dropout_p: float = 0.0, bias_window: int = 0) -> Tensor:
    """Attention of queries over DMC states (same result as adding :func:`dmc_score_bias`).

    The per-key bias rides in the score GEMM as one extra channel
    (``[q * scale, 1] . [k, bias] = scale * q.k + bias``); the exempt diagonal is then
    overwritten with the exact own-state scores and the future masked. The query heads of
    a GQA group share one GEMM against their KV head (no per-head copies).

    Args:
        query: ``[b, hq, s, d]`` (RoPE applied, decision channel zeroed).
        key, value: ``[b, hk, s, d]`` accumulated states (keys rotated at their own position).
        state_bias: ``[b, hk, s]`` from :func:`nemo_dmc.core.decisions.make_decisions`.
        mask: optional extra bool mask (True = masked), e.g. for padding; causality is
            always applied. The own-state diagonal is never masked, so a fully masked
            (padding) query row stays finite instead of turning into NaN.
        bias_window: the bias applies where ``t - i > bias_window`` (0: DMC; DMS's window).

    Returns:
        ``[b, hq, s, d]``.
    """
    b, hq, s, d = query.shape
    hk = key.shape[1]
    groups = hq // hk
    scale = softmax_scale if softmax_scale is not None else d ** -0.5
    dtype = torch.promote_types(query.dtype, torch.float32)  # scores and softmax in >= fp32
    q = query.reshape(b * hk, groups * s, d).to(dtype) * scale
    k = key.reshape(b * hk, s, d).to(dtype)
    if bias_window > 0:
        return _windowed_bias_attention(q, k, value, state_bias, mask, dropout_p, bias_window,
                                        query.shape)
    q_ext = torch.cat([q, q.new_ones(b * hk, groups * s, 1)], dim=-1)
    k_ext = torch.cat([k, state_bias.reshape(b * hk, s, 1).to(dtype)], dim=-1)
    scores = torch.matmul(q_ext, k_ext.transpose(1, 2)).view(b, hk, groups, s, s)
    future = torch.ones(s, s, dtype=torch.bool, device=query.device).triu(1)
    if mask is not None:  # [b or 1, 1, s, s] -> broadcast over KV heads and group members
        future = future | mask.reshape(mask.shape[0], 1, 1, s, s)
    scores = scores.masked_fill(future, float("-inf"))
    own = (q.view(b, hk, groups, s, d) * k.view(b, hk, 1, s, d)).sum(-1)  # [b, hk, G, s]
    scores.diagonal(dim1=-2, dim2=-1).copy_(own)
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(b * hk, groups * s, s)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    out = torch.matmul(probs, value.reshape(b * hk, s, d))
    return out.view(b, hq, s, d)


def _windowed_bias_attention(q: Tensor, k: Tensor, value: Tensor, state_bias: Tensor,
                             mask: Optional[Tensor], dropout_p: float, bias_window: int,
                             shape: torch.Size) -> Tensor:
    """:func:`dmc_attention` for ``bias_window > 0``: scaled ``q [b*hk, G*s, d]`` and
    ``k [b*hk, s, d]`` (>= fp32) with the bias added only outside the window band."""
    b, hq, s, d = shape
    hk = state_bias.shape[1]
    scores = torch.matmul(q, k.transpose(1, 2)).view(b, hk, hq // hk, s, s)
    bias = dmc_score_bias(state_bias.to(q.dtype), bias_window=bias_window)  # [b, hk, s, s]
    scores = scores + bias.unsqueeze(2)
    if mask is not None:  # the query's own key stays visible (finite padding rows)
        diagonal = torch.eye(s, dtype=torch.bool, device=q.device)
        scores = scores.masked_fill(mask.reshape(mask.shape[0], 1, 1, s, s) & ~diagonal,
                                    float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(value.dtype).view(b * hk, -1, s)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, value.reshape(b * hk, s, d)).view(b, hq, s, d)


RoPE = Callable[[Tensor, Tensor], Tensor]
"""``rope(x, positions)``: rotate ``x`` ``[..., s, d]`` at integer ``positions`` ``[s]``."""


def attended_rope(rope: Optional[RoPE], zero_after_rope: bool) -> Optional[RoPE]:
    """``rope`` as attention applies it to the attended q/k: the rotation, then
    :func:`~nemo_dmc.core.decisions.after_rope` (channel D-1 zeroed again with
    ``zero_after_rope``). ``None`` (no rotation) stays ``None``."""
    if rope is None or not zero_after_rope:
        return rope
    return lambda x, positions: after_rope(rope(x, positions), True)


Accumulate = Callable[[Tensor, Tensor, Tensor, Optional[int]], Tensor]
"""``accumulate(x, alpha, omega, window)`` with the contract of :func:`partial_accumulate`."""


def dmc_states(query: Tensor, key: Tensor, value: Tensor, config: DMCConfig, training: bool,
               noise: Optional[Tensor] = None, accumulate: Accumulate = partial_accumulate,
               signals: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Decisions]:
    """Decisions, importance and partial accumulation of one layer (everything before RoPE).

    Args:
        query: ``[b, hq, s, d]`` pre-RoPE queries.
        key, value: ``[b, hk, s, d]`` pre-RoPE keys and values.
        noise: optional ``[b, hk, s]`` logistic noise for relaxed (training) decisions.
        accumulate: a function like :func:`partial_accumulate` (e.g. the kernel dispatch
            ``nemo_dmc.kernels.dispatch.partial_accumulate``).
        signals: ``[b, hk, s, 2]`` decision and importance signals of the layer's decision
            adapter (required when ``config.decision_source == "adapter"``, else unused).

    Returns:
        ``(query, key_states, value_states, decisions)``: the query and the accumulated keys
        (decision channel zeroed for the ``channel`` source, intact for ``adapter``), the
        accumulated values, and the decisions.
    """
    logits, omega = decision_inputs(query, key, config, signals)
    decisions = make_decisions(logits, config, training, noise)
    query, key = attended(query, config), attended(key, config)
    # keys and values share decisions and weights: one accumulation over [k | v]
    states = accumulate(torch.cat([key, value], dim=-1), decisions.alpha, omega, config.window)
    key, value = states.split([key.shape[-1], value.shape[-1]], dim=-1)
    return query, key, value, decisions


def decision_inputs(query: Tensor, key: Tensor, config: DMCConfig,
                    signals: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Decision logits and importance ``[b, hk, s]`` each, from channel D-1 of the pre-RoPE
    ``key``/``query`` or from the adapter's ``signals [b, hk, s, 2]`` (``config.decision_source``)."""
    logits = source_logits(key, config, signals)
    c, scale = config.init_offset, config.decision_scale
    if config.decision_source == "adapter":
        return logits, signal_importance(signals[..., 1], c, scale)
    return logits, importance(query, key.shape[1], c, scale)


def dmc_self_attention(query: Tensor, key: Tensor, value: Tensor, config: DMCConfig,
                       training: bool, rope: Optional[RoPE] = None,
                       noise: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
                       mask: Optional[Tensor] = None,
                       dropout_p: float = 0.0, signals: Optional[Tensor] = None,
                       ) -> Tuple[Tensor, Decisions]:
    """The DMC attention of one layer, parallel over the sequence.

    Same arguments as :func:`dmc_states`; ``rope`` rotates the queries and each accumulated
    key at the position of its newest token (``None``: no rotation), channel D-1 zeroed
    again after it with :attr:`DMCConfig.zero_after_rope` (:func:`attended_rope`).

    Returns:
        ``([b, hq, s, d]`` attention output, the layer's :class:`Decisions`).
    """
    query, key, value, decisions = dmc_states(query, key, value, config, training, noise,
                                              signals=signals)
    rope = attended_rope(rope, zeroes_after_rope(config))
    if rope is not None:
        positions = torch.arange(query.shape[-2], device=query.device)
        query, key = rope(query, positions), rope(key, positions)
    out = dmc_attention(query, key, value, decisions.state_bias, softmax_scale, mask, dropout_p)
    return out, decisions
