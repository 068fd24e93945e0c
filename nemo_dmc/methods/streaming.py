"""``streaming``: StreamingLLM (Xiao et al. 2023): the first ``sinks`` positions (attention
sinks) are never evicted; otherwise the oldest slot goes. The budget floor defaults to
``sinks + 1`` so the sinks and the newest token always fit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from torch import Tensor

from nemo_dmc.methods.base import register
from nemo_dmc.methods.eviction import EvictionMethod, EvictionSettings


@dataclass(frozen=True)
class StreamingSettings(EvictionSettings):
    """sinks: always-kept first positions."""

    sinks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sinks < 0:
            raise ValueError(f"streaming sinks must be >= 0, got {self.sinks}")
        if self.floor <= self.sinks:
            raise ValueError(f"streaming needs min_slots > sinks ({self.sinks}) so the sinks "
                             f"and the newest token fit, got min_slots={self.min_slots}")

    def default_floor(self) -> int:
        return self.sinks + 1


@register
class StreamingMethod(EvictionMethod):
    """Keep the sinks and a window of the newest tokens."""

    name = "streaming"
    settings_class = StreamingSettings

    def scores(self, probs: Tensor, mass: Tensor, live: Tensor, positions: Tensor,
               budget: int) -> Tuple[Tensor, Tensor]:
        return positions.float().expand_as(live), live & (positions >= self.settings.sinks)
