"""``dms``: Dynamic Memory Sparsification (Łańcucki et al. 2025, arXiv 2506.05345): learned,
delayed eviction.

Each token ``i`` of each KV head gets an eviction decision ``alpha_i`` (1 = evict), here
predicted from its pre-RoPE key's repurposed channel D-1 like DMC's merge decision
(``s * k[D-1] - c``; channel D-1 is then zeroed in q and k). Eviction is delayed by a sliding
window ``w``: query ``t`` sees key ``i`` whenever ``t - i <= w``; beyond the window only the
keys not marked for eviction remain. So a head's KV state after ``n`` tokens is the window
(its last ``min(n, w)`` tokens) plus the survivors (tokens older than the window that were
not marked): ``slots = min(n, w) + #{i < n - w : alpha_i = 0}``.

Training (parallel over the sequence): the score of query ``t`` and key ``i`` gets
``log(1 - alpha_i)`` where ``t - i > w`` (relaxed ``alpha`` from Gumbel-sigmoid noise, as
DMC's); evaluation takes hard decisions ``1[logit > 0]`` with ``hard_bias`` for evicted keys.
The compression loss is DMC's one-sided loss on the mean eviction fraction (a token evicted
costs nothing once it left the window, so CR ~ ``1 / (1 - mean alpha)`` for ``n >> w``).

Phases (plain / zero-out / decide) are DMC's (:class:`~nemo_dmc.methods.dmc.PhasedMethod`):
the channel is repurposed the same way. The token-by-token reference is
:mod:`nemo_dmc.methods.dms_reference`; the inference cache policy is
:class:`nemo_dmc.kvcache.policies.DMSPolicy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from nemo_dmc.core import (
    DMCConfig,
    Decisions,
    attended,
    sample_logistic_noise,
    source_logits,
    zeroes_after_rope,
)
from nemo_dmc.core.config import DECISION_SOURCES, check_loss_form
from nemo_dmc.core.attention import Accumulate
from nemo_dmc.methods.base import DecisionRecord, Noise, Prepared, register
from nemo_dmc.methods.dmc import PhasedMethod


@dataclass(frozen=True)
class DMSConfig:
    """How a layer decides which tokens to evict, and what it is trained to (the decision
    parameterisation's defaults are DMC's, :class:`~nemo_dmc.core.DMCConfig`).

    Attributes:
        window: eviction delay ``w``: query ``t`` sees every key ``i`` with ``t - i <= w``
            (512 in the paper's and Model-Optimizer's configurations).
        init_offset: ``c``; the eviction logit is ``s * k[D-1] - c``, so a zeroed channel
            means "keep" (``alpha ~ sigmoid(-c / tau)``).
        decision_scale: ``s`` multiplying channel D-1 in the logit (Model-Optimizer's DMS
            scales its logit by 100; 1 keeps DMC's parameterisation).
        temperature: Gumbel-sigmoid temperature ``tau`` of the relaxed training decisions.
        target_cr: compression ratio the one-sided loss pushes the eviction fraction to.
        loss_weight: weight of the compression loss in the training loss.
        force_decision: ``"append"`` keeps every token, ``"evict"`` evicts every token once
            it leaves the window (tests, "DMS off"); ``None`` uses the learned decisions.
        hard_bias: additive score bias of an evicted key outside the window (hard decisions).
        decision_source: ``"channel"`` (repurposed channel D-1, zeroed in q/k) or ``"adapter"``
            (a zero-initialised decision adapter reads the attention input, q/k intact; see
            :attr:`DMCConfig.decision_source`).
        zero_after_rope: with the ``channel`` source, also zero channel D-1 of the rotated
            q and k (see :attr:`DMCConfig.zero_after_rope`).
        loss_reduction / balance / balance_cap: the compression loss's form, as
            :class:`DMCConfig`'s (defaults: one hinge on the whole batch's eviction fraction).
    """

    window: int = 512
    init_offset: float = DMCConfig.init_offset
    decision_scale: float = DMCConfig.decision_scale
    temperature: float = DMCConfig.temperature
    target_cr: float = DMCConfig.target_cr
    loss_weight: float = DMCConfig.loss_weight
    force_decision: Optional[str] = None
    hard_bias: float = DMCConfig.hard_bias
    decision_source: str = DMCConfig.decision_source
    zero_after_rope: bool = DMCConfig.zero_after_rope
    loss_reduction: str = DMCConfig.loss_reduction
    balance: str = DMCConfig.balance
    balance_cap: Optional[float] = DMCConfig.balance_cap

    def __post_init__(self) -> None:
        if self.decision_source not in DECISION_SOURCES:
            raise ValueError(f"dms.decision_source must be one of {', '.join(DECISION_SOURCES)}, "
                             f"got {self.decision_source!r}")
        if self.window < 1:
            raise ValueError(f"dms.window must be >= 1, got {self.window}")
        if not self.target_cr >= 1:
            raise ValueError(f"dms.target_cr must be >= 1, got {self.target_cr}")
        if not self.loss_weight >= 0:
            raise ValueError(f"dms.loss_weight must be >= 0, got {self.loss_weight}")
        if not self.decision_scale > 0:
            raise ValueError(f"dms.decision_scale must be > 0, got {self.decision_scale}")
        if self.temperature <= 0:
            raise ValueError(f"dms.temperature must be > 0, got {self.temperature}")
        check_loss_form("dms", self.loss_reduction, self.balance, self.balance_cap)
        if self.force_decision not in (None, "append", "evict"):
            raise ValueError("dms.force_decision must be null, 'append' or 'evict', got "
                             f"{self.force_decision!r}")


def eviction_logits(query: Tensor, key: Tensor, settings: DMSConfig,
                    signals: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """The decision source: eviction logits ``[b, hk, s]`` (>= fp32) and the q/k attention
    sees. ``channel``: ``s * k[D-1] - c`` from pre-RoPE keys ``[b, hk, s, D]``, channel D-1
    then zeroed in q and k; ``adapter``: ``s * x - c`` from the decision adapter's
    ``signals [b, hk, s, 1]``, q and k intact."""
    return (source_logits(key, settings, signals), attended(query, settings),
            attended(key, settings))


def eviction_decisions(logits: Tensor, settings: DMSConfig, training: bool,
                       noise: Optional[Tensor] = None) -> Decisions:
    """Eviction decisions ``[b, hk, s]`` from logits (1 = evict once outside the window).

    ``state_bias`` is the per-key score bias for queries beyond the window: ``log(1 - alpha)``
    in training (relaxed ``alpha = sigmoid((l + noise) / tau)``, logistic ``noise`` sampled
    here unless given), ``hard_bias * 1[l > 0]`` in eval.
    """
    if settings.force_decision is not None:
        hard = torch.full_like(logits, float(settings.force_decision == "evict"))
        return Decisions(alpha=hard, hard=hard, straight_through=hard,
                         state_bias=hard * settings.hard_bias)
    if training:
        if noise is None:
            noise = sample_logistic_noise(logits.shape, logits.device)
        z = (logits + noise.to(logits.dtype)) / settings.temperature
        alpha = torch.sigmoid(z)
        hard = (z > 0).to(logits.dtype)
        straight_through = hard + (alpha - alpha.detach())  # exactly `hard` in forward
        # log(1 - sigmoid(z)) = logsigmoid(-z): finite even where alpha rounds to 1.
        return Decisions(alpha=alpha, hard=hard, straight_through=straight_through,
                         state_bias=F.logsigmoid(-z))
    hard = (logits > 0).to(logits.dtype)
    return Decisions(alpha=hard, hard=hard, straight_through=hard,
                     state_bias=hard * settings.hard_bias)


def kept_slots(evict: Tensor, window: int) -> Tensor:
    """``[b, hk]`` KV state after the ``s`` tokens of ``evict [b, hk, s]`` (0/1): the window
    (``min(s, w)`` tokens) plus the older tokens not marked for eviction."""
    s = evict.shape[-1]
    older = evict[..., :max(s - window, 0)]
    return min(s, window) + (older.shape[-1] - older.sum(dim=-1))


@dataclass
class DMSRecord(DecisionRecord):
    """A DMS layer's forward: its :class:`~nemo_dmc.core.Decisions` (1 = evict); ``slots`` is
    :func:`kept_slots` (window plus survivors)."""


@register
class DMSMethod(PhasedMethod):
    """Dynamic Memory Sparsification: learned eviction delayed by a sliding window."""

    name = "dms"
    settings_class = DMSConfig
    adapter_signals = 1  # an eviction signal per KV head

    def decision_logits(self, query: Tensor, key: Tensor, signals: Optional[Tensor] = None
                        ) -> Tuple[Tensor, Tensor, Tensor]:
        """``(logits [b, hk, s], query, key)`` from pre-RoPE q/k or the adapter's signals
        (see :func:`eviction_logits`); every DMS path (training, reference, cache policy)
        takes its decisions from here."""
        return eviction_logits(query, key, self.settings, signals)

    def decide(self, query: Tensor, key: Tensor, value: Tensor, *, training: bool,
               noise: Noise, accumulate: Accumulate,
               signals: Optional[Tensor] = None) -> Prepared:
        logits, query, key = self.decision_logits(query, key, signals)
        sampled = noise() if training and self.settings.force_decision is None else None
        decisions = eviction_decisions(logits, self.settings, training, sampled)
        self.record = DMSRecord(slots=kept_slots(decisions.hard, self.settings.window),
                                decisions=decisions)
        return Prepared(query, key, value, decisions.state_bias,
                        bias_window=self.settings.window,
                        zero_after_rope=zeroes_after_rope(self.settings))
