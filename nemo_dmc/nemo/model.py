"""``DMCGPTModel``: NeMo's GPTModel training with the DMC loss and stage schedule."""

from __future__ import annotations

import weakref
from typing import Dict, Optional, Tuple

import torch
from nemo.collections.llm.gpt.model.base import GPTModel
from nemo.lightning.megatron_parallel import MaskedTokenLossReduction

from nemo_dmc.megatron.adapter import train_only_adapters
from nemo_dmc.megatron.stages import apply_stage, finish_stage
from nemo_dmc.megatron.stats import method_loss


class DMCLossReduction(MaskedTokenLossReduction):
    """LM loss plus the one-sided compression loss of the stage's current target CR.

    ``loss_sum`` gets ``L_cr * num_tokens`` so that NeMo's per-token averaging yields
    ``LM + dmc.loss_weight * L_cr``; the logged ``loss_sum_and_ub_size`` stays the pure LM loss.
    """

    def __init__(self, model: "DMCGPTModel", validation_step: bool = False) -> None:
        super().__init__(validation_step=validation_step)
        # A weak reference, not a submodule: the model owns this reduction, and a cycle in
        # the module tree makes state_dict() and .cpu() recurse forever.
        self._model = weakref.ref(model)

    def forward(self, batch: Dict[str, torch.Tensor],
                forward_out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict]:
        loss_sum, num_tokens, extra = super().forward(batch, forward_out)
        model = self._model()
        term = None if self.validation_step else method_loss(model, model.stage_target_cr)
        if term is not None:
            loss_sum = loss_sum + term.weighted * num_tokens
        return loss_sum, num_tokens, extra


class DMCGPTModel(GPTModel):
    """NeMo GPT model with DMC attention (its config is a ``DMCLlamaConfig``).

    Before each training step the stage's schedule is applied (zero-out scale, or DMC mode
    with the ramped target CR); the zero-out stage ends by zeroing the decision rows. With
    ``config.dmc_trainable="decisions"`` everything but the decision adapters is frozen when
    the model is built (before NeMo wraps it in DDP and builds the optimizer, which both skip
    frozen parameters).
    """

    stage_target_cr: Optional[float] = None
    """CR target of the current training step (set by :meth:`training_step`)."""

    @property
    def _step(self) -> int:
        trainer = getattr(self, "_trainer", None)
        return trainer.global_step if trainer is not None else 0

    def configure_model(self, *args, **kwargs) -> None:
        built = hasattr(self, "module")
        super().configure_model(*args, **kwargs)
        if not built and self.config.dmc_trainable == "decisions":
            train_only_adapters(self.module)

    def training_step(self, batch, batch_idx=None) -> torch.Tensor:
        c = self.config
        self.stage_target_cr = apply_stage(self, c.dmc_stage, self._step, c.dmc_stage_steps,
                                           c.dmc.target_cr)
        return super().training_step(batch, batch_idx)

    def on_train_end(self) -> None:
        finish_stage(self, self.config.dmc_stage)

    @property
    def training_loss_reduction(self) -> DMCLossReduction:
        if not self._training_loss_reduction:
            self._training_loss_reduction = DMCLossReduction(self)
        return self._training_loss_reduction

    @property
    def validation_loss_reduction(self) -> DMCLossReduction:
        if not self._validation_loss_reduction:
            self._validation_loss_reduction = DMCLossReduction(self, validation_step=True)
        return self._validation_loss_reduction
