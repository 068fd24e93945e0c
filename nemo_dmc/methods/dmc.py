"""``dmc``: Dynamic Memory Compression (merge a token's key/value into the head's last slot
or append a new one; see ``nemo_dmc.core`` for the math and :class:`~nemo_dmc.core.DMCConfig`
for the settings).

Training runs in one of three phases, set per step by the stage schedule
(``nemo_dmc.megatron.stages``): ``plain`` (the model as it was: channel D-1 used as is, no
decisions; pretraining and the continued-training baseline), ``zero_out`` (channel D-1 of q
and k scaled towards 0), and ``decide`` (DMC proper; the default, and what evaluation and
inference use). The phases live in :class:`PhasedMethod`, shared with ``dms``, whose
decisions come from the same repurposed channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional

import torch
from torch import Tensor

from nemo_dmc.core import DMCConfig, Decisions, dmc_states, zeroes_after_rope
from nemo_dmc.core.attention import Accumulate
from nemo_dmc.methods.base import DecisionRecord, KVMethod, Noise, Prepared, register


class DMCPhase(str, Enum):
    """What a DMC layer computes (see module docstring)."""

    PLAIN = "plain"
    ZERO_OUT = "zero_out"
    DECIDE = "decide"


@dataclass
class DMCRecord(DecisionRecord):
    """A DMC layer's forward: its :class:`~nemo_dmc.core.Decisions` (1 = merge)."""


class PhasedMethod(KVMethod):
    """A method whose trained decisions come from the repurposed channel D-1, switched through
    the stage schedule's phases (module docstring); subclasses implement :meth:`decide`."""

    trains_decisions = True

    def __init__(self, settings=None) -> None:
        super().__init__(settings)
        self.phase = DMCPhase.DECIDE
        self.zero_out_scale = 1.0

    adapter_signals: int = 1  # signals per KV head a decision adapter gives the method

    @property
    def adapter_outputs(self) -> int:
        """:attr:`adapter_signals` with ``decision_source="adapter"``, else 0."""
        adapter = getattr(self.settings, "decision_source", "channel") == "adapter"
        return self.adapter_signals if adapter else 0

    def set_phase(self, phase: DMCPhase | str, zero_out_scale: float = 1.0) -> None:
        """Switch the phase (``zero_out_scale`` multiplies channel D-1 in ``zero_out``)."""
        phase = DMCPhase(phase)
        if phase is DMCPhase.ZERO_OUT and self.adapter_outputs:
            raise ValueError("the zero-out stage frees channel D-1 for decisions; with "
                             "dmc.decision_source='adapter' q and k stay intact: skip it")
        self.phase = phase
        self.zero_out_scale = zero_out_scale if self.phase is DMCPhase.ZERO_OUT else 1.0

    def prepare(self, query: Tensor, key: Tensor, value: Tensor, *, training: bool,
                noise: Noise, accumulate: Accumulate,
                signals: Optional[Tensor] = None) -> Prepared:
        if self.phase is DMCPhase.DECIDE:
            return self.decide(query, key, value, training=training, noise=noise,
                               accumulate=accumulate, signals=signals)
        if self.phase is DMCPhase.ZERO_OUT:
            query, key = _scale_decision_channel(query, key, self.zero_out_scale)
        return super().prepare(query, key, value, training=training, noise=noise,
                               accumulate=accumulate)

    def decide(self, query: Tensor, key: Tensor, value: Tensor, *, training: bool,
               noise: Noise, accumulate: Accumulate,
               signals: Optional[Tensor] = None) -> Prepared:
        """:meth:`prepare` in the ``decide`` phase (sets a :class:`DecisionRecord`)."""
        raise NotImplementedError


@register
class DMCMethod(PhasedMethod):
    """Dynamic Memory Compression (Nawrot et al. 2024)."""

    name = "dmc"
    settings_class = DMCConfig
    adapter_signals = 2  # a decision and an importance signal per KV head

    def decide(self, query: Tensor, key: Tensor, value: Tensor, *, training: bool,
               noise: Noise, accumulate: Accumulate,
               signals: Optional[Tensor] = None) -> Prepared:
        sampled = noise() if training and self.settings.force_decision is None else None
        query, key, value, decisions = dmc_states(query, key, value, self.settings, training,
                                                  sampled, accumulate=accumulate,
                                                  signals=signals)
        slots = decisions.hard.shape[-1] - decisions.hard.sum(dim=-1)
        self.record = DMCRecord(slots=slots, decisions=decisions)
        return Prepared(query, key, value, decisions.state_bias,
                        zero_after_rope=zeroes_after_rope(self.settings))


def _scale_decision_channel(query: Tensor, key: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``q`` and ``k`` with channel D-1 multiplied by ``scale`` (the zero-out decay)."""
    return (torch.cat([query[..., :-1], query[..., -1:] * scale], dim=-1),
            torch.cat([key[..., :-1], key[..., -1:] * scale], dim=-1))
