"""``tova``: Token Omission Via Attention (Oren et al. 2024).

The current query's attention weights averaged over all query heads of the layer score the
slots; one position is dropped for every KV head alike (per-layer eviction, as in the paper).
The new token itself may be dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from torch import Tensor

from nemo_dmc.methods.base import register
from nemo_dmc.methods.eviction import EvictionMethod, EvictionSettings


@dataclass(frozen=True)
class TOVASettings(EvictionSettings):
    """TOVA needs only the ratio (and the optional budget floor)."""


@register
class TOVAMethod(EvictionMethod):
    """Drop the position the current query attends to least."""

    name = "tova"
    settings_class = TOVASettings

    def scores(self, probs: Tensor, mass: Tensor, live: Tensor, positions: Tensor,
               budget: int) -> Tuple[Tensor, Tensor]:
        layer = probs.mean(dim=(1, 2), keepdim=True).squeeze(2)  # [b, 1, n]
        return layer.expand_as(live), live
