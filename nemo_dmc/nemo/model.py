"""``DMCGPTModel``: NeMo's GPTModel training with the DMC loss and stage schedule, and,
given a :class:`~nemo_dmc.megatron.distill.Teacher`, distillation from the frozen original."""

from __future__ import annotations

import weakref
from typing import Dict, Optional, Tuple

import torch
from nemo.collections.llm.gpt.model.base import GPTModel
from nemo.lightning.megatron_parallel import MaskedTokenLossReduction

from nemo_dmc.megatron.adapter import train_only_adapters
from nemo_dmc.megatron.distill import DistillTerms, Teacher
from nemo_dmc.megatron.pipeline import whole_model_fractions
from nemo_dmc.megatron.stages import apply_stage, finish_stage
from nemo_dmc.megatron.stats import method_loss


class DMCLossReduction(MaskedTokenLossReduction):
    """LM loss plus the compression loss of the stage's current target CR.

    ``loss_sum`` gets ``L_cr * num_tokens`` so that NeMo's per-token averaging yields
    ``LM + dmc.loss_weight * L_cr``; the logged ``loss_sum_and_ub_size`` stays the pure LM loss.
    Under pipeline parallelism it runs on the last stage, on every layer's decision fractions
    (carried there with the activations, :mod:`~nemo_dmc.megatron.pipeline`).
    With a teacher, ``LM`` is the distillation mix ``lm_weight * CE + kl_weight * T^2 KL`` in
    training (the same composition as the own trainer's) and the cross-entropy alone in
    validation; the logged loss is the cross-entropy, the KL goes to the model's ``kl``.
    """

    def __init__(self, model: "DMCGPTModel", validation_step: bool = False) -> None:
        super().__init__(validation_step=validation_step)
        # A weak reference, not a submodule: the model owns this reduction, and a cycle in
        # the module tree makes state_dict() and .cpu() recurse forever.
        self._model = weakref.ref(model)

    def forward(self, batch: Dict[str, torch.Tensor],
                forward_out: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict]:
        model = self._model()
        terms = model.last_distill
        if terms is None or terms.loss is not forward_out:  # not this forward's distillation
            loss_sum, num_tokens, extra = super().forward(batch, forward_out)
        else:
            lm_out = terms.ce if self.validation_step else forward_out
            loss_sum, num_tokens, _ = super().forward(batch, lm_out)
            _, _, extra = super().forward(batch, terms.ce)
            kl_sum, _, _ = super().forward(batch, terms.kl)
            model.record_kl(kl_sum / num_tokens.clamp_min(1), self.validation_step)
        term = None if self.validation_step else method_loss(
            model, model.stage_target_cr, whole_model_fractions(model, forward_out.shape[0]))
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
    teacher: Optional[Teacher] = None
    """The frozen distillation teacher (:meth:`set_teacher`); ``None`` = LM loss alone."""
    last_distill: Optional[DistillTerms] = None
    """Cross-entropy and KL of the last forward with a teacher (detached, per token)."""
    last_kl: Optional[float] = None
    """Mean KL over the loss-masked tokens of the last micro-batch with a teacher."""

    def set_teacher(self, teacher: Optional[Teacher]) -> None:
        """Distil from ``teacher`` (e.g. the original model built with ``VanillaSettings()``
        in the same TP layout, its weights loaded); it stays outside this module's
        parameters and state dict. ``None`` turns distillation off."""
        self.teacher, self.last_distill = teacher, None

    def forward_step(self, batch) -> torch.Tensor:
        """Per-token loss ``[b, s]``: megatron's LM cross-entropy, or with a teacher the
        distillation mix of student and teacher logits of this micro-batch."""
        if self.teacher is None:
            return super().forward_step(batch)
        if "cu_seqlens" in batch:
            raise ValueError("distillation does not support packed sequences (cu_seqlens)")
        terms = self.teacher.terms(self, batch["tokens"], batch["position_ids"],
                                   batch.get("attention_mask"), batch["labels"])
        self.last_distill = DistillTerms(ce=terms.ce.detach(), kl=terms.kl.detach(),
                                         loss=terms.loss)
        return terms.loss

    def record_kl(self, kl: torch.Tensor, validation: bool) -> None:
        """Keep the micro-batch's mean KL, and log it as ``kl`` / ``val_kl`` under a trainer."""
        self.last_kl = float(kl)
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and hasattr(trainer, "logger_connector"):
            self.log("val_kl" if validation else "kl", self.last_kl, prog_bar=True,
                     batch_size=1, sync_dist=False)

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
