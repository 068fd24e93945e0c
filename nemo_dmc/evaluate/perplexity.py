"""Held-out perplexity with hard decisions: the LM loss of :func:`nemo_dmc.training.loop.validate`
(its :func:`~nemo_dmc.training.loop.token_loss`), summed over all loss-masked tokens.

The parallel forward with hard decisions scores every token exactly as token-by-token
inference with the compressed cache would, so this is the perplexity at the realised CR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from nemo_dmc.megatron.cpu_shims import causal_attention_mask
from nemo_dmc.training.batches import Batch
from nemo_dmc.training.loop import token_loss


@dataclass
class PerplexityResult:
    """Mean cross-entropy (nats per token) over ``tokens`` scored tokens of ``sequences``."""

    loss: float
    tokens: int
    sequences: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 80.0))


@torch.no_grad()
def heldout_perplexity(model: nn.Module, batches: Iterable[Batch],
                       after_forward: Optional[Callable[[Batch], None]] = None
                       ) -> PerplexityResult:
    """Perplexity of ``model`` (put in eval mode) over ``batches``; ``after_forward(batch)``
    runs after each forward (e.g. to read that forward's decisions)."""
    model.eval()
    loss_sum, tokens, sequences = torch.zeros((), dtype=torch.float64), torch.zeros(()), 0
    mask = None
    for batch in batches:
        seq = batch["tokens"].shape[1]
        if mask is None or mask.shape[-1] != seq:
            mask = causal_attention_mask(seq, batch["tokens"].device)
        batch_loss, batch_tokens = token_loss(model, batch, mask)
        loss_sum += batch_loss.double().cpu()
        tokens += batch_tokens.cpu()
        sequences += batch["tokens"].shape[0]
        if after_forward is not None:
            after_forward(batch)
    if sequences == 0:
        raise ValueError("data.num_sequences: no held-out sequences to score")
    return PerplexityResult(loss=float(loss_sum / tokens.clamp_min(1.0)), tokens=int(tokens),
                            sequences=sequences)
