"""The stage schedule applied to a megatron model: one helper for the own trainer and the
NeMo model alike.

``pretrain`` trains the model as it is (DMC layers in their ``plain`` phase), ``zero_out``
decays channel D-1 of q/k and ends by zeroing its projection rows, ``retrofit`` and
``finetune`` take DMC decisions against the step's target CR. DMS layers (decisions from the
same repurposed channel) follow the same phases.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from nemo_dmc.core import Stage, target_cr, zero_out_scale
from nemo_dmc.megatron.stats import layer_methods
from nemo_dmc.megatron.zero_out import zero_decision_projections
from nemo_dmc.methods import DMCPhase, PhasedMethod


def set_dmc_phase(model: nn.Module, phase: DMCPhase | str, scale: float = 1.0) -> None:
    """Put every layer of ``model`` in ``phase`` (error unless every layer runs dmc or dms)."""
    methods = layer_methods(model)
    if not all(isinstance(m, PhasedMethod) for m in methods):
        names = sorted({m.name for m in methods})
        raise ValueError(f"the DMC stages need a model built with the dmc or dms method, "
                         f"got {names}")
    for method in methods:
        method.set_phase(phase, scale)


def apply_stage(model: nn.Module, stage: Stage | str, step: int, steps: int,
                final_cr: float) -> Optional[float]:
    """Set up ``model`` for optimizer step ``step`` (0-based) of ``steps`` of ``stage``;
    return that step's CR target (``None`` in pretraining and zero-out: LM loss only)."""
    stage = Stage(stage)
    if stage is Stage.PRETRAIN:
        set_dmc_phase(model, DMCPhase.PLAIN)
        return None
    if stage is Stage.ZERO_OUT:
        set_dmc_phase(model, DMCPhase.ZERO_OUT, zero_out_scale(step, steps))
        return None
    set_dmc_phase(model, DMCPhase.DECIDE)
    return target_cr(stage, step + 1, steps, final_cr)


def finish_stage(model: nn.Module, stage: Stage | str) -> None:
    """After the last optimizer step of ``stage`` (zero-out zeroes the decision rows)."""
    if Stage(stage) is Stage.ZERO_OUT:
        zero_decision_projections(model)


def validation_phase(model: nn.Module, stage: Stage | str) -> None:
    """Validate a pretraining stage as plain attention, every DMC stage with decisions."""
    plain = Stage(stage) is Stage.PRETRAIN
    set_dmc_phase(model, DMCPhase.PLAIN if plain else DMCPhase.DECIDE)
