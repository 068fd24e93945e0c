"""End of the zero-out stage: zero the q/k projection rows of the decision channel."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from megatron.core.transformer.attention import SelfAttention


def decision_channel_rows(groups: int, heads_per_group: int, head_dim: int) -> Tensor:
    """Rows of megatron's fused ``linear_qkv`` weight that produce channel ``D-1`` of every
    query and key head, for its per-group layout ``[g][q_0..q_{G-1}, k, v][head_dim]``."""
    block = (heads_per_group + 2) * head_dim
    rows = [g * block + j * head_dim + head_dim - 1
            for g in range(groups) for j in range(heads_per_group + 1)]
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def zero_decision_projections(model: nn.Module) -> int:
    """Zero the decision-channel rows (and biases) of every self-attention ``linear_qkv``.

    Works on DMC and vanilla models alike (a vanilla model so zeroed is "DMC off").

    Afterwards ``k[D-1] = q[D-1] = 0``: every token appends (``alpha ~ sigmoid(-c)``) with
    importance ``sigmoid(c)``. Returns the number of layers changed.
    """
    count = 0
    for attention in (m for m in model.modules() if isinstance(m, SelfAttention)):
        groups = attention.num_query_groups_per_partition
        rows = decision_channel_rows(groups, attention.num_attention_heads_per_partition // groups,
                                     attention.hidden_size_per_attention_head)
        linear = attention.linear_qkv
        linear.weight[rows.to(linear.weight.device)] = 0
        bias = getattr(linear, "bias", None)
        if isinstance(bias, Tensor) and bias.numel():
            bias[rows.to(bias.device)] = 0
        count += 1
    return count
