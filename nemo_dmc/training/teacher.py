"""The distillation teacher of a training run: the original model, frozen, in plain attention."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from nemo_dmc.checkpoints.weights import load_weights_checkpoint
from nemo_dmc.megatron.distill import Teacher
from nemo_dmc.megatron.model import build_model
from nemo_dmc.methods import VanillaSettings
from nemo_dmc.training.config import TrainConfig


def load_teacher(cfg: TrainConfig, bf16: bool, device: torch.device) -> Optional[Teacher]:
    """With ``distill.enabled``, the teacher: ``model.*`` in plain attention (the original
    model), in the run's tensor-parallel layout and precision, loaded once from
    ``distill.teacher`` (else ``checkpoint.pretrained``) and frozen; else ``None``."""
    if not cfg.distill.enabled:
        return None
    path = cfg.distill.checkpoint(cfg.checkpoint.pretrained)
    if path is None:  # validate_config says so first, naming the key
        raise ValueError("checkpoint.pretrained: distillation needs a teacher checkpoint")
    module = build_model(cfg.model, VanillaSettings(),
                         sequence_parallel=cfg.parallel.sequence_parallel, bf16=bf16)
    module.to(device)
    load_weights_checkpoint(module, Path(path))
    return Teacher(module, cfg.distill.core())
