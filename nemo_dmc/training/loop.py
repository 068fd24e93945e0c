"""One optimizer step and one validation pass over a megatron-core DMC model.

A step accumulates gradients over this rank's micro-batches (loss = masked LM cross-entropy,
or with a distillation :class:`~nemo_dmc.megatron.distill.Teacher` ``lm_weight * CE +
kl_weight * T^2 KL``, + the compression loss against the step's target CR, divided by the
number of micro-batches), lets megatron's DDP all-reduce them over the data-parallel group
(``finalize_model_grads``), then clips and steps the optimizer and the lr schedule.

The Gumbel noise of a micro-batch is drawn after seeding the default generator from
``(noise key, position of the micro-batch in the global batch)``: training is then the same
for every data- and tensor-parallel layout, and a resumed step draws the noise it drew before.
Validation scores hard decisions, and the same batches once more with training's noisy,
relaxed decisions (``lm_loss_noisy``): the gap shows soft training disagreeing with hard
inference.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from torch import Tensor, nn

from nemo_dmc.core import realised_cr
from nemo_dmc.megatron.distill import Teacher
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
    per_token = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
    loss_mask = batch["loss_mask"].float()
    return (per_token.float() * loss_mask).sum(), loss_mask.sum()


def token_sums(model: nn.Module, batch: Batch, mask: Tensor,
               teacher: Optional[Teacher] = None) -> TokenSums:
    """:class:`TokenSums` of one micro-batch; with a ``teacher`` its logits are computed on
    the same micro-batch and mixed in (:meth:`~nemo_dmc.megatron.distill.Teacher.terms`)."""
    if teacher is None:
        lm, tokens = token_loss(model, batch, mask)
        return TokenSums(lm, lm, lm.new_zeros(()), tokens)
    terms = teacher.terms(model, batch["tokens"], batch["position_ids"], mask, batch["labels"])
    loss_mask = batch["loss_mask"].float()
    sums = [(term.float() * loss_mask).sum() for term in (terms.loss, terms.ce, terms.kl)]
    return TokenSums(*sums, loss_mask.sum())


def _merge_fractions(stats: Optional[DMCStats], num_layers: int) -> Tensor:
    """``[1 + layers]``: overall and per-layer fraction of merges (0 without decisions)."""
    if stats is None:
        return torch.zeros(1 + num_layers)
    layer = 1.0 - 1.0 / stats.layer_cr.detach().float().cpu()
    return torch.cat([stats.merge_fraction.detach().float().cpu().view(1), layer])


def _mean_over_dp(values: Tensor) -> Tensor:
    """Average a CPU tensor over the data-parallel group."""
    group = parallel_state.get_data_parallel_group()
    size = parallel_state.get_data_parallel_world_size()
    if size == 1:
        return values
    device = "cuda" if torch.cuda.is_available() else "cpu"
    reduced = values.to(device)
    dist.all_reduce(reduced, group=group)
    return reduced.cpu() / size


def noise_seed(key: str, position: int) -> int:
    """A 63-bit seed for the Gumbel noise of global micro-batch ``position`` of step ``key``."""
    digest = hashlib.blake2b(f"{key}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def train_step(model: nn.Module, optimizer: MegatronOptimizer, scheduler: OptimizerParamScheduler,
               batches: MicroBatches, mask: Tensor, consumed_samples: int,
               target_cr: Optional[float], num_layers: int, noise_key: str,
               teacher: Optional[Teacher] = None) -> StepResult:
    """One optimizer step from ``consumed_samples``; ``target_cr=None`` trains LM loss only.

    The loss is ``LM + dmc.loss_weight * L_cr`` (:func:`~nemo_dmc.megatron.stats.method_loss`),
    ``LM`` being the distillation mix with a ``teacher``; the logged ``dmc_loss`` is ``L_cr``
    itself, ``lm_loss`` the cross-entropy, ``kl`` the (``T^2``-scaled) KL.
    ``noise_key`` identifies the step (run seed, stage, step) for :func:`noise_seed`.
    """
    model.train()
    model.zero_grad_buffer()
    optimizer.zero_grad()
    n = batches.num_micro
    totals = torch.zeros(3)  # lm, dmc, kl
    fractions = torch.zeros(1 + num_layers)
    for micro in range(n):
        torch.manual_seed(noise_seed(noise_key, batches.position(micro)))
        sums = token_sums(model, batches.train(consumed_samples, micro), mask, teacher)
        tokens = sums.tokens.clamp_min(1.0)
        loss = sums.objective / tokens
        totals[0] += (sums.lm / tokens).detach().float().cpu()
        totals[2] += (sums.kl / tokens).detach().float().cpu()
        term = method_loss(model, target_cr)
        if term is not None:
            totals[1] += term.loss.detach().float().cpu()
            loss = loss + term.weighted
            stats = term.stats
        else:
            stats = collect_dmc_stats(model)
        fractions += _merge_fractions(stats, num_layers)
        (loss / n).backward()
    finalize_model_grads([model])
    lr = optimizer.param_groups[0]["lr"]
    _, grad_norm, _ = optimizer.step()
    scheduler.step(1)
    means = _mean_over_dp(torch.cat([totals, fractions]) / n)
    crs = realised_cr(means[3:])
    return StepResult(lm_loss=float(means[0]), dmc_loss=float(means[1]), cr=float(crs[0]),
                      layer_cr=crs[1:].tolist(),
                      grad_norm=None if grad_norm is None else float(grad_norm), lr=float(lr),
                      kl=None if teacher is None else float(means[2]))


@torch.no_grad()
def validate(model: nn.Module, batches: MicroBatches, mask: Tensor, num_batches: int,
             num_layers: int, teacher: Optional[Teacher] = None) -> Validation:
    """LM loss and realised CR (hard decisions) over the first ``num_batches`` validation
    micro-batches of every data-parallel rank; the KL to a ``teacher``; and, when the model
    takes DMC decisions, the LM loss of the same batches with training-mode (noisy,
    relaxed) decisions, the Gumbel noise seeded per batch."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4)  # lm, kl, tokens, noisy lm
    fractions = torch.zeros(1 + num_layers)
    decides = False
    for index in range(num_batches):
        batch = batches.valid(index)
        hard = token_sums(model, batch, mask, teacher)
        sums[:3] += torch.stack([hard.lm, hard.kl, hard.tokens]).float().cpu()
        stats = collect_dmc_stats(model)
        decides = decides or stats is not None
        fractions += _merge_fractions(stats, num_layers)
    if decides:
        model.train()
        for index in range(num_batches):
            torch.manual_seed(noise_seed("validation", index))
            noisy, _ = token_loss(model, batches.valid(index), mask)
            sums[3] += noisy.float().cpu()
    model.train(was_training)
    sums = _mean_over_dp(torch.cat([sums, fractions / num_batches]))
    tokens = sums[2].clamp_min(1.0)
    crs = realised_cr(sums[4:])
    return Validation(lm_loss=float(sums[0] / tokens), cr=float(crs[0]),
                      layer_cr=crs[1:].tolist(),
                      kl=None if teacher is None else float(sums[1] / tokens),
                      lm_loss_noisy=float(sums[3] / tokens) if decides else None)
