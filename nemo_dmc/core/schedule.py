"""Stage schedules: the CR ramp of retrofitting and the zero-out decay."""

from __future__ import annotations

from enum import Enum


class Stage(str, Enum):
    """The stages of the DMC recipe, preceded by plain language-model training.

    ``PRETRAIN`` trains with vanilla attention (LM loss only): pretraining from scratch, or
    the continued-training baseline that DMC is compared against.
    """

    PRETRAIN = "pretrain"
    ZERO_OUT = "zero_out"
    RETROFIT = "retrofit"
    FINETUNE = "finetune"


def target_cr(stage: Stage | str, step: int, stage_steps: int, final_cr: float) -> float:
    """Target compression ratio after ``step`` of ``stage_steps`` optimizer steps of ``stage``.

    Pretraining and zero-out train no decisions (1.0); retrofit ramps linearly from 1 to ``final_cr``,
    reaching it at the stage's last step; fine-tune holds ``final_cr``.
    """
    if final_cr < 1.0:
        raise ValueError(f"dmc.target_cr must be >= 1, got {final_cr}")
    stage = Stage(stage)
    if stage in (Stage.PRETRAIN, Stage.ZERO_OUT):
        return 1.0
    if stage is Stage.FINETUNE:
        return final_cr
    progress = min(1.0, max(0, step) / max(1, stage_steps))
    return 1.0 + (final_cr - 1.0) * progress


def zero_out_scale(step: int, stage_steps: int) -> float:
    """Multiplier of the q/k decision channel during zero-out: ``max(0, 1 - step/(0.8*steps))``."""
    return max(0.0, 1.0 - step / (0.8 * max(1, stage_steps)))
