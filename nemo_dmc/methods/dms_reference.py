"""Token-by-token reference of DMS inference: the source of truth the DMS tests compare against.

Deliberately plain Python loops over sequences, heads and tokens. Each KV head keeps a ring of
its last ``w`` tokens and an append-only store of the tokens that survived leaving the ring
(those not marked for eviction). Token ``t`` enters the ring, its queries attend to ring and
store, then the token leaving the window (``t - w``) moves to the store or is dropped.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Optional

import torch
from torch import Tensor

from nemo_dmc.core import RoPE, SimulationResult, attended_rope, zeroes_after_rope
from nemo_dmc.methods.dms import DMSConfig, DMSMethod


def simulate_dms(query: Tensor, key: Tensor, value: Tensor, settings: DMSConfig,
                 rope: Optional[RoPE] = None,
                 softmax_scale: Optional[float] = None,
                 signals: Optional[Tensor] = None) -> SimulationResult:
    """Run DMS inference one token at a time with hard decisions.

    Args:
        query: ``[b, hq, s, d]`` pre-RoPE queries; key, value: ``[b, hk, s, d]`` pre-RoPE.
        signals: ``[b, hk, s, 1]`` decision-adapter signals (``decision_source="adapter"``).

    Returns:
        :class:`~nemo_dmc.core.SimulationResult`: ``decisions`` 1 = evict; ``cache_lengths``
        the ring plus the store per head after the last token.
    """
    b, hq, s, d = query.shape
    hk = key.shape[1]
    group = hq // hk
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    logits, q_zeroed, k_zeroed = DMSMethod(settings).decision_logits(query, key, signals)
    rope = attended_rope(rope, zeroes_after_rope(settings))
    output = torch.zeros_like(query)
    decisions = torch.zeros(b, hk, s, dtype=query.dtype)
    lengths = torch.zeros(b, hk, dtype=torch.long)

    def rotated(x: Tensor, t: int) -> Tensor:
        return x if rope is None else rope(x.unsqueeze(0), torch.tensor([t]))[0]

    for bi in range(b):
        for h in range(hk):
            ring: deque[tuple[bool, Tensor, Tensor]] = deque()  # (evict, key, value), oldest first
            store: list[tuple[Tensor, Tensor]] = []
            for t in range(s):
                if settings.force_decision is not None:
                    evict = settings.force_decision == "evict"
                else:
                    evict = bool(logits[bi, h, t] > 0)
                decisions[bi, h, t] = float(evict)
                ring.append((evict, rotated(k_zeroed[bi, h, t], t), value[bi, h, t]))
                keys = torch.stack([k for k, _ in store] + [k for _, k, _ in ring])
                values = torch.stack([v for _, v in store] + [v for _, _, v in ring])
                for hq_i in range(h * group, (h + 1) * group):
                    q = rotated(q_zeroed[bi, hq_i, t], t)
                    output[bi, hq_i, t] = torch.softmax((keys @ q) * scale, dim=0) @ values
                if len(ring) > settings.window:  # token t - w leaves the window
                    gone, k_old, v_old = ring.popleft()
                    if not gone:
                        store.append((k_old, v_old))
            lengths[bi, h] = len(ring) + len(store)
    return SimulationResult(output=output, decisions=decisions, cache_lengths=lengths)
