"""Statistics and loss of a megatron model's KV methods, combined across tensor-parallel ranks.

Each :class:`~nemo_dmc.megatron.attention.MethodSelfAttention` leaves its layer's record on its
method object (:attr:`nemo_dmc.methods.KVMethod.record`); the functions here read them (in
layer order) after the forward pass. Each forward overwrites them, so with several
micro-batches (gradient accumulation) collect the statistics, and add the loss, after each
forward: :func:`method_loss` is the one place the compression loss is composed, for the own
trainer and for NeMo's loss reduction alike.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, List, Optional

import torch
from torch import Tensor, nn

from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from nemo_dmc.core import DMCConfig, dmc_compression_loss, realised_cr
from nemo_dmc.megatron.attention import MethodSelfAttention
from nemo_dmc.methods import DecisionRecord, KVMethod


@dataclass
class DMCStats:
    """Decision statistics of one forward pass (identical on all tensor-parallel ranks).

    merge_fraction: scalar mean straight-through decision over tokens, heads and layers;
        differentiable (its gradient reaches every layer's decision channel).
    layer_cr: ``[layers]`` realised compression ratio per layer (hard decisions).
    head_cr: ``[layers, kv_heads]`` realised compression ratio per global KV head.
    head_fraction: ``[batch, layers, kv_heads]`` mean straight-through decision of each
        sequence per global KV head (gathered over TP ranks with gradient).
    """

    merge_fraction: Tensor
    layer_cr: Tensor
    head_cr: Tensor
    head_fraction: Tensor

    @property
    def cr(self) -> Tensor:
        """Realised compression ratio of the whole model."""
        return realised_cr(self.merge_fraction)

    def loss(self, target_cr: float, settings: Optional[Any] = None) -> Tensor:
        """Compression loss against ``target_cr`` in the form ``settings`` select
        (:class:`~nemo_dmc.core.DMCConfig`'s ``loss_reduction``, ``balance``,
        ``balance_cap``); settings without those fields, or none: the global hinge."""
        form = {key: getattr(settings, key, getattr(DMCConfig, key))
                for key in ("loss_reduction", "balance", "balance_cap")}
        return dmc_compression_loss(self.head_fraction, target_cr, form["loss_reduction"],
                                    form["balance"], form["balance_cap"])


@dataclass
class MethodLoss:
    """The compression term of one forward: ``weighted = loss_weight * loss`` is what the
    training loss adds; ``loss`` (L_cr) is what gets logged."""

    stats: DMCStats
    loss: Tensor
    weighted: Tensor


def method_attentions(model: nn.Module) -> List[MethodSelfAttention]:
    """The KV-method self-attention modules of ``model`` in layer order."""
    return [m for m in model.modules() if isinstance(m, MethodSelfAttention)]


def layer_methods(model: nn.Module) -> List[KVMethod]:
    """The method object of every layer, in layer order (error if the model has none)."""
    methods = [m.method for m in method_attentions(model)]
    if not methods:
        raise ValueError("the model has no KV-method attention layers: build it with "
                         "nemo_dmc.megatron.model.build_model(model_config, <method settings>)")
    return methods


def collect_dmc_stats(model: nn.Module) -> Optional[DMCStats]:
    """Statistics of the model's last forward, or ``None`` if no layer took trained decisions
    (DMC merges or DMS evictions: ``merge_fraction`` is then the eviction fraction)."""
    records = [m.method.record for m in method_attentions(model)]
    if not records or not all(isinstance(r, DecisionRecord) for r in records):
        return None
    decisions = [r.decisions for r in records]
    # Straight-through decisions averaged over each sequence: [batch, layers, local_kv_heads].
    sequence_fraction = torch.stack([d.straight_through.mean(dim=2) for d in decisions], dim=1)
    # Hard decisions summed over batch and sequence: [layers, local_kv_heads].
    head_merges = torch.stack([d.hard.sum(dim=(0, 2)) for d in decisions])
    tokens = decisions[0].hard.shape[0] * decisions[0].hard.shape[2]

    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        # Backward: each rank keeps the gradient of its own heads (the loss is replicated).
        sequence_fraction = gather_from_tensor_model_parallel_region(sequence_fraction.contiguous())
        head_merges = gather_from_tensor_model_parallel_region(head_merges.contiguous())
    head_fraction = head_merges / tokens
    return DMCStats(merge_fraction=sequence_fraction.float().mean(),
                    layer_cr=realised_cr(head_fraction.mean(dim=1)),
                    head_cr=realised_cr(head_fraction),
                    head_fraction=sequence_fraction.float())


def method_loss(model: nn.Module, target_cr: Optional[float],
                head_fraction: Optional[Tensor] = None,
                stats: Optional[DMCStats] = None) -> Optional[MethodLoss]:
    """The compression loss of the model's last forward against ``target_cr`` (``None``
    without a target or without DMC decisions), in the form and weight the layers' settings
    give (``loss_reduction``, ``balance``, ``balance_cap``, ``loss_weight``).

    ``head_fraction``: ``[batch, layers, kv_heads]`` fractions of the whole model when
    ``model`` holds only some of its layers (a pipeline's last stage,
    :meth:`~nemo_dmc.megatron.pipeline.PipelineStageModel.fractions`); the loss is taken on
    them, the returned ``stats`` stay this model's. ``stats``: the forward's statistics when
    the caller already collected them (else they are collected here)."""
    stats = stats if stats is not None else collect_dmc_stats(model)
    if stats is None or target_cr is None:
        return None
    if head_fraction is not None:
        stats = replace(stats, head_fraction=head_fraction)
    settings = method_attentions(model)[0].method.settings
    loss = stats.loss(target_cr, settings)
    return MethodLoss(stats=stats, loss=loss, weighted=settings.loss_weight * loss)


def layer_slots(model: nn.Module) -> Tensor:
    """``[batch, layers, kv_heads]`` slots each head held after the last forward (global KV
    heads, gathered over tensor-parallel ranks; int64 on CPU)."""
    records = [m.record for m in layer_methods(model)]
    if any(r is None for r in records):
        raise ValueError("no layer records: run a forward first")
    slots = torch.stack([r.slots for r in records], dim=1)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        slots = gather_from_tensor_model_parallel_region(slots.contiguous())
    return slots.round().long().cpu()
