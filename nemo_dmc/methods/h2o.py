"""``h2o``: Heavy-Hitter Oracle eviction (Zhang et al. 2023).

A slot's score is the attention mass it has received from all queries so far (the current
one included; a KV head's mass is the mean over its query-head group). The
``recent = budget - floor(heavy_fraction * budget)`` newest positions are never evicted;
the others compete on accumulated mass.

The budget floor defaults to 2 slots (one heavy hitter, one recent) while ``heavy_fraction >
0``: as in the paper, where the first ``k`` tokens all enter the cache, the first token (the
attention sink, which accumulates the most mass) must get to compete. With a floor of 1 the
budget ``ceil(n / ratio)`` is one slot for the first ``ratio`` tokens, all of it recent
window, so position 0 was evicted at the second token at every ratio (issue 18: SmolLM2-135M
perplexity rose 1.2-6x and stopped being monotonic in the ratio).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

from torch import Tensor

from nemo_dmc.methods.base import register
from nemo_dmc.methods.eviction import EvictionMethod, EvictionSettings


@dataclass(frozen=True)
class H2OSettings(EvictionSettings):
    """heavy_fraction: share of the budget for heavy hitters (the rest is the recent window)."""

    heavy_fraction: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.heavy_fraction < 1:
            raise ValueError("h2o heavy_fraction must be in [0, 1) (h2o keeps a recent window "
                             f"of at least one token), got {self.heavy_fraction}")

    def default_floor(self) -> int:
        """Room for one heavy hitter beside the recent window from the first tokens on."""
        return 2 if self.heavy_fraction > 0 else 1

    def recent_window(self, budget: int) -> int:
        """The protected recent window for a budget (the rest are heavy hitters)."""
        return budget - math.floor(self.heavy_fraction * budget)


@register
class H2OMethod(EvictionMethod):
    """Keep the heavy hitters and a recent window."""

    name = "h2o"
    settings_class = H2OSettings
    accumulates_mass = True

    def scores(self, probs: Tensor, mass: Tensor, live: Tensor, positions: Tensor,
               budget: int) -> Tuple[Tensor, Tensor]:
        tokens = positions.amax(dim=-1, keepdim=True) + 1  # the current token is the newest
        return mass, live & (positions < tokens - self.settings.recent_window(budget))
