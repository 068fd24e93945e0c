"""Causal attention over partially accumulated states, with the DMC survival bias.

Query ``t`` attends to its own open state ``t`` (no bias) and to every earlier state ``i``
with the additive bias ``log(1 - alpha_{i+1})``: the log probability that state ``i`` is
still in the cache, i.e. that token ``i + 1`` did not merge into it.
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
    decision_logits,
    importance,
    make_decisions,
    zero_decision_channel,
)


def dmc_score_bias(state_bias: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """Dense additive score bias ``[b, hk, s, s]`` from per-key ``state_bias`` ``[b, hk, s]``.

    ``bias[t, i] = state_bias[i]`` for ``i < t``, ``0`` for ``i == t``, ``-inf`` for ``i > t``.
    ``mask`` (bool, True = masked, broadcastable to ``[b, 1, s, s]``) is applied on top.
    """
    s = state_bias.shape[-1]
    idx = torch.arange(s, device=state_bias.device)
    past = idx.view(s, 1) > idx.view(1, s)
    future = idx.view(s, 1) < idx.view(1, s)
    bias = torch.where(past, state_bias.unsqueeze(-2), torch.zeros((), device=state_bias.device))
    bias = bias.masked_fill(future, float("-inf"))
    if mask is not None:
        bias = bias.masked_fill(mask, float("-inf"))
    return bias


def dmc_attention(query: Tensor, key: Tensor, value: Tensor, state_bias: Tensor,
                  softmax_scale: Optional[float] = None, mask: Optional[Tensor] = None,
                  dropout_p: float = 0.0) -> Tensor:
    """Attention of queries over DMC states.

    Args:
        query: ``[b, hq, s, d]`` (RoPE applied, decision channel zeroed).
        key, value: ``[b, hk, s, d]`` accumulated states (keys rotated at their own position).
        state_bias: ``[b, hk, s]`` from :func:`nemo_dmc.core.decisions.make_decisions`.
        mask: optional extra bool mask, True = masked.

    Returns:
        ``[b, hq, s, d]``.
    """
    groups = query.shape[1] // key.shape[1]
    bias = dmc_score_bias(state_bias, mask).to(query.dtype)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
        bias = bias.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=bias,
                                          dropout_p=dropout_p, scale=softmax_scale)


RoPE = Callable[[Tensor, Tensor], Tensor]
"""``rope(x, positions)``: rotate ``x`` ``[..., s, d]`` at integer ``positions`` ``[s]``."""


def dmc_states(query: Tensor, key: Tensor, value: Tensor, config: DMCConfig, training: bool,
               noise: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Decisions]:
    """Decisions, importance and partial accumulation of one layer (everything before RoPE).

    Args:
        query: ``[b, hq, s, d]`` pre-RoPE queries.
        key, value: ``[b, hk, s, d]`` pre-RoPE keys and values.
        noise: optional ``[b, hk, s]`` logistic noise for relaxed (training) decisions.

    Returns:
        ``(query, key_states, value_states, decisions)``: the query and the accumulated keys
        with the decision channel zeroed, the accumulated values, and the decisions.
    """
    decisions = make_decisions(decision_logits(key, config.init_offset), config, training, noise)
    omega = importance(query, key.shape[1], config.init_offset)
    query, key = zero_decision_channel(query), zero_decision_channel(key)
    key = partial_accumulate(key, decisions.alpha, omega, config.window)
    value = partial_accumulate(value, decisions.alpha, omega, config.window)
    return query, key, value, decisions


def dmc_self_attention(query: Tensor, key: Tensor, value: Tensor, config: DMCConfig,
                       training: bool, rope: Optional[RoPE] = None,
                       noise: Optional[Tensor] = None, softmax_scale: Optional[float] = None,
                       mask: Optional[Tensor] = None,
                       dropout_p: float = 0.0) -> Tuple[Tensor, Decisions]:
    """The DMC attention of one layer, parallel over the sequence.

    Same arguments as :func:`dmc_states`; ``rope`` rotates the queries and each accumulated
    key at the position of its newest token (``None``: no rotation).

    Returns:
        ``([b, hq, s, d]`` attention output, the layer's :class:`Decisions`).
    """
    query, key, value, decisions = dmc_states(query, key, value, config, training, noise)
    if rope is not None:
        positions = torch.arange(query.shape[-2], device=query.device)
        query, key = rope(query, positions), rope(key, positions)
    out = dmc_attention(query, key, value, decisions.state_bias, softmax_scale, mask, dropout_p)
    return out, decisions
