"""Token-by-token reference of DMC inference: the source of truth the tests compare against.

Deliberately plain Python loops over sequences, heads and tokens. Each KV head keeps its
own list of slots; a token either appends a slot or merges into the last one, the slot
holding the omega-weighted average of (at most the last ``W`` tokens of) its merge run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from nemo_dmc.core.attention import RoPE, attended_rope
from nemo_dmc.core.config import DMCConfig
from nemo_dmc.core.decisions import zero_decision_channel, zeroes_after_rope


@dataclass
class SimulationResult:
    """Outputs of :func:`simulate_inference`.

    output: ``[b, hq, s, d]`` attention output per query token.
    decisions: ``[b, hk, s]`` hard decisions taken (1 = merge).
    cache_lengths: ``[b, hk]`` slots held per head after the last token.
    """

    output: Tensor
    decisions: Tensor
    cache_lengths: Tensor


def rotate_half_rope(base: float = 10000.0) -> RoPE:
    """Llama/megatron-style (non-interleaved, rotate-half) rotary embedding."""

    def rope(x: Tensor, positions: Tensor) -> Tensor:
        d = x.shape[-1]
        inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d))
        angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return x * angles.cos().to(x.dtype) + rotated * angles.sin().to(x.dtype)

    return rope


def _decide(signal: float, t: int, config: DMCConfig) -> bool:
    if t == 0:
        return False
    if config.force_decision is not None:
        return config.force_decision == "merge"
    return config.decision_scale * signal - config.init_offset > 0


def simulate_inference(query: Tensor, key: Tensor, value: Tensor, config: DMCConfig,
                       rope: Optional[RoPE] = None,
                       softmax_scale: Optional[float] = None,
                       signals: Optional[Tensor] = None) -> SimulationResult:
    """Run DMC inference one token at a time with hard decisions.

    Args:
        query: ``[b, hq, s, d]`` pre-RoPE queries; key, value: ``[b, hk, s, d]`` pre-RoPE.
        rope: rotates queries and slot keys (channel D-1 zeroed again after it with
            ``config.zero_after_rope``).
        signals: ``[b, hk, s, 2]`` decision-adapter signals (``decision_source="adapter"``).
    """
    adapter = config.decision_source == "adapter"
    if adapter and signals is None:
        raise ValueError("dmc.decision_source='adapter' needs the decision adapter's signals")
    b, hq, s, d = query.shape
    hk = key.shape[1]
    group = hq // hk
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    rope = attended_rope(rope, zeroes_after_rope(config))
    output = torch.zeros_like(query)
    decisions = torch.zeros(b, hk, s, dtype=query.dtype)
    lengths = torch.zeros(b, hk, dtype=torch.long)
    if adapter:
        q_zeroed, k_zeroed = query, key
    else:
        q_zeroed, k_zeroed = zero_decision_channel(query), zero_decision_channel(key)

    for bi in range(b):
        for h in range(hk):
            heads = range(h * group, (h + 1) * group)
            slot_keys: list[Tensor] = []    # rotated key of each slot
            slot_values: list[Tensor] = []
            run: list[tuple[Tensor, Tensor, Tensor]] = []  # (omega, k, v) of the open slot
            for t in range(s):
                if adapter:
                    decide, weigh = signals[bi, h, t, 0], signals[bi, h, t, 1]
                else:
                    decide, weigh = key[bi, h, t, -1], query[bi, list(heads), t, -1].mean()
                merge = _decide(float(decide), t, config)
                decisions[bi, h, t] = float(merge)
                omega = torch.sigmoid(config.decision_scale * weigh + config.init_offset)
                entry = (omega, k_zeroed[bi, h, t], value[bi, h, t])
                run = run + [entry] if merge else [entry]
                if config.window is not None:
                    run = run[-config.window:]
                total = sum(w for w, _, _ in run)
                k_slot = sum(w * k for w, k, _ in run) / total
                v_slot = sum(w * v for w, _, v in run) / total
                if rope is not None:  # the merged key takes the newest token's position
                    k_slot = rope(k_slot.unsqueeze(0), torch.tensor([t]))[0]
                if not merge:
                    slot_keys.append(k_slot)
                    slot_values.append(v_slot)
                slot_keys[-1], slot_values[-1] = k_slot, v_slot
                keys, values = torch.stack(slot_keys), torch.stack(slot_values)
                for hq_i in heads:
                    q = q_zeroed[bi, hq_i, t]
                    if rope is not None:
                        q = rope(q.unsqueeze(0), torch.tensor([t]))[0]
                    weights = torch.softmax((keys @ q) * scale, dim=0)
                    output[bi, hq_i, t] = weights @ values
            lengths[bi, h] = len(slot_keys)
    return SimulationResult(output=output, decisions=decisions, cache_lengths=lengths)
