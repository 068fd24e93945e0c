"""One optimizer step and one validation pass over a megatron-core DMC model.

A step accumulates gradients over this rank's micro-batches (loss = masked LM cross-entropy,
or with a distillation :class:`~nemo_dmc.megatron.distill.Teacher` ``lm_weight * CE +
kl_weight * T^2 KL``, + the compression loss against the step's target CR, divided by the
number of micro-batches), lets megatron's DDP all-reduce them over the data-parallel group
(``finalize_model_grads``), then clips and steps the optimizer and the lr schedule.

Micro-batches run through megatron's forward/backward schedule for the pipeline layout (a
plain loop without one; 1F1B over the stages with one), the compression loss taken on the
last stage on every layer's decisions (:mod:`~nemo_dmc.megatron.pipeline`); logged metrics
are summed over the stages and averaged over data-parallel ranks.

Each layer draws the Gumbel noise of a micro-batch from a generator seeded from ``(noise key,
position of the micro-batch in the global batch, layer)`` (:mod:`~nemo_dmc.megatron.noise`):
training is then the same for every data-, tensor- and pipeline-parallel layout, and a resumed
step draws the noise it drew before. Validation scores hard decisions, and the same batches
once more with training's noisy, relaxed decisions (``lm_loss_noisy``): the gap shows soft
training disagreeing with hard inference.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.utils import get_model_config
from torch import Tensor, nn

from nemo_dmc.core import realised_cr
from nemo_dmc.megatron.distill import DistillTerms, Teacher
from nemo_dmc.megatron.noise import noise_scope
from nemo_dmc.megatron.pipeline import (
    first_layer,
    model_chunks,
    pipeline_stages,
    whole_model_fractions,
)
from nemo_dmc.megatron.stats import DMCStats, collect_dmc_stats, method_loss
from nemo_dmc.training.batches import Batch, MicroBatches
from nemo_dmc.training.metrics import Validation


@dataclass
class StepResult:
    """Metrics of one optimizer step, averaged over micro-batches and data-parallel ranks."""

    lm_loss: float
    dmc_loss: float
    cr: float
    layer_cr: List[float]
    grad_norm: Optional[float]
    lr: float
    kl: Optional[float] = None


@dataclass
class TokenSums:
    """Sums over the loss-masked tokens of one micro-batch: the objective (the LM
    cross-entropy, or the distillation mix), the cross-entropy, the KL, the token count."""

    objective: Tensor
    lm: Tensor
    kl: Tensor
    tokens: Tensor


def token_loss(model: nn.Module, batch: Batch, mask: Tensor) -> Tuple[Tensor, Tensor]:
    """Summed cross-entropy over the loss-masked tokens of one micro-batch, and their count."""
    sums = token_sums(model, batch, mask)
    return sums.lm, sums.tokens


def token_sums(model: nn.Module, batch: Batch, mask: Tensor,
               teacher: Optional[Teacher] = None) -> TokenSums:
    """:class:`TokenSums` of one micro-batch; with a ``teacher`` its logits are computed on
    the same micro-batch and mixed in (:meth:`~nemo_dmc.megatron.distill.Teacher.terms`)."""
    return _sums(_model_forward(teacher, mask)(model, batch), batch)


class PassTotals:
    """What one pass over micro-batches adds up, on every pipeline stage: the last stage's
    loss sums (``losses``) and, on each stage for its own layers, the merge fractions
    (``fractions``: ``[1 + layers]``, the overall straight-through fraction's share of this
    stage's layers, then each layer's hard fraction). :meth:`reduce` sums them over the
    pipeline stages and averages them over the data-parallel ranks."""

    def __init__(self, num_losses: int, num_layers: int) -> None:
        self.losses = torch.zeros(num_losses)
        self.fractions = torch.zeros(1 + num_layers)
        self.decided = torch.zeros(1)  # forwards whose layers took trained decisions
        self.num_layers = num_layers

    def add_layers(self, model: nn.Module, stats: Optional[DMCStats]) -> None:
        """Add this stage's merge fractions ``stats`` of the model's last forward (none
        without decisions)."""
        if stats is None:
            return
        self.decided += 1
        local = stats.layer_cr.numel()
        start = 1 + first_layer(model)
        self.fractions[0] += float(stats.merge_fraction.detach()) * local / self.num_layers
        self.fractions[start:start + local] += 1.0 - 1.0 / stats.layer_cr.detach().float().cpu()

    def reduce(self) -> Tuple[Tensor, Tensor, bool]:
        """Losses and fractions summed over the pipeline and averaged over DP, and whether
        any layer took trained decisions."""
        values = torch.cat([self.losses, self.fractions, self.decided])
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            values = _all_reduce(values, parallel_state.get_pipeline_model_parallel_group())
        values = _mean_over_dp(values)
        losses, fractions = values[:self.losses.numel()], values[self.losses.numel():-1]
        return losses, fractions, bool(values[-1] > 0)


def _all_reduce(values: Tensor, group) -> Tensor:
    """Sum a CPU tensor over ``group`` (on the GPU when there is one: NCCL)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reduced = values.to(device)
    dist.all_reduce(reduced, group=group)
    return reduced.cpu()


def _mean_over_dp(values: Tensor) -> Tensor:
    """Average a CPU tensor over the data-parallel group."""
    size = parallel_state.get_data_parallel_world_size()
    if size == 1:
        return values
    return _all_reduce(values, parallel_state.get_data_parallel_group()) / size


def run_micro_batches(model: nn.Module, batches: Callable[[int], Batch], num_micro: int,
                      mask: Tensor,
                      loss_func: Callable[[nn.Module, Optional[DMCStats], Batch, Any], Tensor],
                      forward: Callable[[nn.Module, Batch], Any],
                      noise_key: Optional[Callable[[int], str]], totals: PassTotals,
                      forward_only: bool) -> None:
    """Forward (and backward) ``num_micro`` micro-batches through megatron's schedule for
    the current pipeline layout (1F1B across stages, interleaved over the chunks of a
    :class:`~nemo_dmc.megatron.pipeline.ModelChunks`; a plain loop without a pipeline).

    ``forward(module, batch)`` runs the model (or chunk); on the last stage ``loss_func(module,
    stats, batch, output)`` turns the output into the micro-batch's loss (the schedule divides
    it by ``num_micro`` before backward; ``stats``: the forward's decision statistics, read
    once per forward). Each micro-batch's noise is drawn inside
    ``noise_scope(noise_key(micro))`` (none: the default generator)."""
    chunks = model_chunks(model)
    seq, micro_batch = mask.shape[-1], 1  # the activation shape only matters with a pipeline
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        micro_batch = batches(0)["tokens"].shape[0]
        rows = max((stage.carry_rows for stage in pipeline_stages(model)), default=0)
        sequence_parallel = get_model_config(model).sequence_parallel
        seq += rows * (parallel_state.get_tensor_model_parallel_world_size()
                       if sequence_parallel else 1)

    def forward_step(data_iterator, module):
        micro = next(data_iterator)
        batch = batches(micro)
        with noise_scope(noise_key(micro)) if noise_key else contextlib.nullcontext():
            output = forward(module, batch)
        stats = collect_dmc_stats(module)
        totals.add_layers(module, stats)
        return output, functools.partial(loss_func, module, stats, batch)

    iterators = [iter(range(num_micro)) for _ in chunks]
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0], model=chunks,
        num_microbatches=num_micro, seq_length=seq, micro_batch_size=micro_batch,
        forward_only=forward_only)


def _model_forward(teacher: Optional[Teacher], mask: Tensor):
    """``forward(module, batch)`` of a pass: per-token cross-entropy, or the distillation
    terms with a ``teacher``."""

    def forward(module: nn.Module, batch: Batch):
        if teacher is None:
            return module(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
        return teacher.terms(module, batch["tokens"], batch["position_ids"], mask,
                             batch["labels"])

    return forward


def _sums(output: Any, batch: Batch) -> TokenSums:
    """:class:`TokenSums` of a micro-batch's output (per-token CE, or distillation terms)."""
    loss_mask = batch["loss_mask"].float()
    if isinstance(output, DistillTerms):
        sums = [(term.float() * loss_mask).sum() for term in (output.loss, output.ce, output.kl)]
        return TokenSums(*sums, loss_mask.sum())
    lm = (output.float() * loss_mask).sum()
    return TokenSums(lm, lm, lm.new_zeros(()), loss_mask.sum())


def training_loss(target_cr: Optional[float], totals: PassTotals
                  ) -> Callable[[nn.Module, Optional[DMCStats], Batch, Any],
                                Tuple[Tensor, dict]]:
    """The last stage's ``loss_func(module, stats, batch, output)`` of a training pass: the
    micro-batch's mean objective + ``dmc.loss_weight * L_cr`` on the whole model's decisions
    (``module``: the model, or the chunk that ran the forward); adds the cross-entropy,
    ``L_cr`` and the KL to ``totals.losses``."""

    def loss_func(model: nn.Module, stats: Optional[DMCStats], batch: Batch,
                  output: Any) -> Tuple[Tensor, dict]:
        sums = _sums(output, batch)
        tokens = sums.tokens.clamp_min(1.0)
        loss = sums.objective / tokens
        totals.losses[0] += float(sums.lm.detach() / tokens)
        totals.losses[2] += float(sums.kl.detach() / tokens)
        term = method_loss(model, target_cr,
                           whole_model_fractions(model, batch["tokens"].shape[0], stats), stats)
        if term is not None:
            totals.losses[1] += float(term.loss.detach())
            loss = loss + term.weighted
        return loss, {}

    return loss_func


def train_step(model: nn.Module, optimizer: MegatronOptimizer, scheduler: OptimizerParamScheduler,
               batches: MicroBatches, mask: Tensor, consumed_samples: int,
               target_cr: Optional[float], num_layers: int, noise_key: str,
               teacher: Optional[Teacher] = None) -> StepResult:
    """One optimizer step from ``consumed_samples``; ``target_cr=None`` trains LM loss only.

    The loss is ``LM + dmc.loss_weight * L_cr`` (:func:`~nemo_dmc.megatron.stats.method_loss`,
    on the whole model's decisions under pipeline parallelism), ``LM`` being the distillation
    mix with a ``teacher``; the logged ``dmc_loss`` is ``L_cr`` itself, ``lm_loss`` the
    cross-entropy, ``kl`` the (``T^2``-scaled) KL. ``noise_key`` identifies the step (run
    seed, stage, step): micro-batch ``m`` draws its noise in scope ``<noise_key>/<position of
    m in the global batch>`` (:mod:`~nemo_dmc.megatron.noise`).
    """
    model.train()
    model.zero_grad_buffer()
    optimizer.zero_grad()
    n = batches.num_micro
    totals = PassTotals(3, num_layers)  # lm, dmc, kl: per-micro-batch means, summed
    run_micro_batches(model, lambda micro: batches.train(consumed_samples, micro), n, mask,
                      training_loss(target_cr, totals), _model_forward(teacher, mask),
                      lambda micro: f"{noise_key}/{batches.position(micro)}", totals,
                      forward_only=False)
    finalize_model_grads(model_chunks(model))
    lr = optimizer.param_groups[0]["lr"]
    _, grad_norm, _ = optimizer.step()
    scheduler.step(1)
    losses, fractions, _ = totals.reduce()
    losses, crs = losses / n, realised_cr(fractions / n)
    return StepResult(lm_loss=float(losses[0]), dmc_loss=float(losses[1]), cr=float(crs[0]),
                      layer_cr=crs[1:].tolist(),
                      grad_norm=None if grad_norm is None else float(grad_norm), lr=float(lr),
                      kl=None if teacher is None else float(losses[2]))


@torch.no_grad()
def validate(model: nn.Module, batches: MicroBatches, mask: Tensor, num_batches: int,
             num_layers: int, teacher: Optional[Teacher] = None) -> Validation:
    """LM loss and realised CR (hard decisions) over the first ``num_batches`` validation
    micro-batches of every data-parallel rank; the KL to a ``teacher``; and, when the model
    takes DMC decisions, the LM loss of the same batches with training-mode (noisy,
    relaxed) decisions, the Gumbel noise seeded per batch."""
    was_training = model.training
    model.eval()
    hard = PassTotals(3, num_layers)  # lm, kl, tokens

    def hard_sums(module: nn.Module, stats: Optional[DMCStats], batch: Batch, output: Any):
        sums = _sums(output, batch)
        hard.losses += torch.stack([sums.lm, sums.kl, sums.tokens]).detach().float().cpu()
        return sums.lm, {}

    run_micro_batches(model, batches.valid, num_batches, mask, hard_sums,
                      _model_forward(teacher, mask), None, hard, forward_only=True)
    sums, fractions, decides = hard.reduce()
    noisy = PassTotals(1, num_layers)
    if decides:
        model.train()

        def noisy_sums(module: nn.Module, stats: Optional[DMCStats], batch: Batch,
                       output: Any):
            sums = _sums(output, batch)
            noisy.losses[0] += float(sums.lm.detach())
            return sums.lm, {}

        run_micro_batches(model, batches.valid, num_batches, mask, noisy_sums,
                          _model_forward(None, mask), lambda index: f"validation/{index}",
                          noisy, forward_only=True)
    model.train(was_training)
    noisy_lm = noisy.reduce()[0][0]
    tokens = sums[2].clamp_min(1.0)
    crs = realised_cr(fractions / num_batches)
    return Validation(lm_loss=float(sums[0] / tokens), cr=float(crs[0]),
                      layer_cr=crs[1:].tolist(),
                      kl=None if teacher is None else float(sums[1] / tokens),
                      lm_loss_noisy=float(noisy_lm / tokens) if decides else None)
