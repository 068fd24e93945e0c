"""Stage plans: how many optimizer steps each selected stage runs, and with which lr.

A stage's length is given in steps, in tokens, or as its share of the DMC token budget
``dmc.budget_pct`` percent of ``model.pretrain_tokens``; tokens are rounded up to whole
global batches of ``data.global_batch_size x model.seq_length`` tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

from nemo_dmc.core import Stage
from nemo_dmc.training.config import ConfigError, StageSettings, TrainConfig


@dataclass(frozen=True)
class StagePlan:
    """What one stage will run."""

    stage: Stage
    steps: int
    tokens_per_step: int
    lr: float
    min_lr: float
    warmup_steps: int
    decay_style: str
    budget_source: str

    @property
    def tokens(self) -> int:
        """Token budget of the stage (whole steps)."""
        return self.steps * self.tokens_per_step


def tokens_per_step(cfg: TrainConfig) -> int:
    """Tokens consumed by one optimizer step (the global batch)."""
    return cfg.data.global_batch_size * cfg.model.seq_length


def _stage_steps(cfg: TrainConfig, stage: Stage, settings: StageSettings) -> tuple[int, str]:
    """``(steps, how they were derived)``; raises :class:`ConfigError` if undetermined."""
    key = f"stage.{stage.value}"
    per_step = tokens_per_step(cfg)
    if cfg.dmc.budget_pct is not None and settings.budget_share > 0:
        if cfg.model.pretrain_tokens is None:
            raise ConfigError("model.pretrain_tokens",
                              "must be set to size stages by dmc.budget_pct")
        budget = cfg.dmc.budget_pct / 100 * cfg.model.pretrain_tokens * settings.budget_share
        return max(1, math.ceil(budget / per_step)), (
            f"{settings.budget_share:g} of dmc.budget_pct={cfg.dmc.budget_pct:g}% of "
            f"{cfg.model.pretrain_tokens:,} pretraining tokens")
    if settings.tokens is not None:
        return max(1, math.ceil(settings.tokens / per_step)), f"{key}.tokens={settings.tokens:,}"
    if settings.steps is not None:
        return settings.steps, f"{key}.steps"
    raise ConfigError(f"{key}.steps", "set steps, tokens, or budget_share with dmc.budget_pct")


def plan_stages(cfg: TrainConfig) -> List[StagePlan]:
    """Plans of the selected stages, in recipe order."""
    plans = []
    for stage in cfg.stage.selected():
        settings: StageSettings = getattr(cfg.stage, stage.value)
        steps, source = _stage_steps(cfg, stage, settings)
        plans.append(StagePlan(
            stage=stage,
            steps=steps,
            tokens_per_step=tokens_per_step(cfg),
            lr=settings.lr if settings.lr is not None else cfg.optim.lr,
            min_lr=settings.min_lr if settings.min_lr is not None else cfg.optim.min_lr,
            warmup_steps=(settings.warmup_steps if settings.warmup_steps is not None
                          else cfg.optim.warmup_steps),
            decay_style=settings.decay_style or cfg.optim.decay_style,
            budget_source=source,
        ))
    return plans
