"""The DMC settings: the one declaration of every ``dmc.*`` field and its default.

Every format carries this dataclass (the trainer's Hydra schema, ``generate``/``evaluate``
configs, NeMo contexts, HF ``config.json``) through
:func:`nemo_dmc.methods.settings_to_dict` / :func:`~nemo_dmc.methods.settings_from_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional

LOSS_REDUCTIONS = ("global", "sequence")
BALANCE_UNITS = ("none", "layer", "head")
DECISION_SOURCES = ("channel", "adapter")


@dataclass
class DMCConfig:
    """How a layer decides, weighs and accumulates keys/values, and what it is trained to.

    Attributes:
        init_offset: ``c`` in the paper. Decision logit is ``k[D-1] - c`` and importance
            is ``sigmoid(q[D-1] + c)``, so a zeroed channel means "append, full weight".
        decision_scale: ``s`` multiplying the decision/importance channel: the logit is
            ``s * k[D-1] - c`` and the importance ``sigmoid(s * mean_group(q[D-1]) + c)``.
            With Adam, ``s > 1`` acts like an ``s``-times larger learning rate on those
            projection rows (faster decisions in short retrofits); 1 = the paper.
        temperature: Gumbel-sigmoid temperature ``tau`` of the relaxed training decisions.
        window: merge window ``W``: a slot averages at most the last ``W`` tokens of its
            merge run. ``None`` means unbounded (a running average over the whole run).
        hard_bias: additive score bias for a state that inference discards (hard decisions).
        force_decision: ``"append"`` or ``"merge"`` overrides the learned decisions (tests,
            benchmarks, and "DMC off" runs); ``None`` uses the model's own decisions.
        decision_source: where decisions and importance come from. ``"channel"`` (the
            paper): the repurposed channel D-1 of each key (decision) and query (importance),
            zeroed before attention (so a retrofit starts with a zero-out stage).
            ``"adapter"``: a separate small module per layer (RMSNorm + Linear(hidden ->
            2 x KV heads), zero-initialised) reads the attention input and gives each KV
            head a decision and an importance signal; q and k stay intact, so the retrofit
            starts from exactly the original model and needs no zero-out stage.
        zero_after_rope: with the ``channel`` source, also zero channel D-1 of the rotated
            q and k (NVIDIA's reference; RoPE pairs channel D-1 with D/2-1, so without this
            that pair scores ``cos(theta (t_q - t_k))``, with it ``cos(theta t_q) cos(theta
            t_k)``). A checkpoint or config that does not record it was trained without it
            (false).
        target_cr: compression ratio the compression loss aims at (the stage schedule ramps
            towards it).
        loss_weight: weight of the compression loss beside the LM loss.
        loss_reduction: where the one-sided hinge is taken (:func:`~nemo_dmc.core.loss.
            dmc_compression_loss`): ``"global"`` on the merge fraction of the whole batch,
            ``"sequence"`` on each sequence's own fraction, then averaged over sequences
            (NVIDIA's reference default).
        balance: the units hinged at the target: ``"none"`` (the whole model), ``"layer"``
            (each layer's merge fraction, averaged over layers) or ``"head"`` (each KV head's),
            so no unit can make up for another that does not compress.
        balance_cap: ``k``: also penalise a unit (a layer, or a head with ``balance: head``)
            whose ratio exceeds ``k`` times the target, ``relu(r - (1 - 1/(k * CR)))``;
            ``None`` = no cap.
    """

    init_offset: float = 5.0
    temperature: float = 0.1
    window: Optional[int] = 12
    hard_bias: float = -1.0e9
    force_decision: Optional[str] = None
    decision_scale: float = 1.0
    target_cr: float = 4.0
    loss_weight: float = 1.0
    decision_source: str = "channel"
    zero_after_rope: bool = True
    loss_reduction: str = "global"
    balance: str = "none"
    balance_cap: Optional[float] = None

    def __post_init__(self) -> None:
        if not self.target_cr >= 1:
            raise ValueError(f"dmc.target_cr must be >= 1, got {self.target_cr}")
        if not self.loss_weight >= 0:
            raise ValueError(f"dmc.loss_weight must be >= 0, got {self.loss_weight}")
        if not self.decision_scale > 0:
            raise ValueError(f"dmc.decision_scale must be > 0, got {self.decision_scale}")
        if self.temperature <= 0:
            raise ValueError(f"dmc.temperature must be > 0, got {self.temperature}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"dmc.window must be >= 1 or null (unbounded), got {self.window}")
        check_loss_form("dmc", self.loss_reduction, self.balance, self.balance_cap)
        if self.decision_source not in DECISION_SOURCES:
            raise ValueError(f"dmc.decision_source must be one of {', '.join(DECISION_SOURCES)}, "
                             f"got {self.decision_source!r}")
        if self.force_decision not in (None, "append", "merge"):
            raise ValueError(
                f"dmc.force_decision must be null, 'append' or 'merge', got {self.force_decision!r}"
            )


LEGACY_DEFAULTS: Dict[str, Any] = {"zero_after_rope": False}
"""Settings added after checkpoints were first written, with the value a stored config that
lacks them means: the behaviour of the code that wrote it (fresh configs take the defaults)."""


def with_legacy_defaults(values: Dict[str, Any], known: Iterable[str]) -> Dict[str, Any]:
    """Stored settings ``values`` with :data:`LEGACY_DEFAULTS` filled in for the ``known``
    fields (of the settings class being read) they do not record."""
    known = set(known)
    return {**{k: v for k, v in LEGACY_DEFAULTS.items() if k in known}, **values}


def check_loss_form(prefix: str, reduction: str, balance: str, cap: Optional[float]) -> None:
    """Validate the compression-loss form (``loss_reduction``, ``balance``, ``balance_cap``)
    of a method's settings; errors name ``<prefix>.<key>``."""
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"{prefix}.loss_reduction must be one of {LOSS_REDUCTIONS}, "
                         f"got {reduction!r}")
    if balance not in BALANCE_UNITS:
        raise ValueError(f"{prefix}.balance must be one of {BALANCE_UNITS}, got {balance!r}")
    if cap is not None and not cap > 1:
        raise ValueError(f"{prefix}.balance_cap must be > 1 (k x the target ratio) or null, "
                         f"got {cap}")
