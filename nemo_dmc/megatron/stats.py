"""DMC statistics and loss of a megatron model, combined across tensor-parallel ranks.

Each :class:`~nemo_dmc.megatron.attention.DMCSelfAttention` keeps the decisions of its last
forward (on that module: no global state); :func:`collect_dmc_stats` reads them (in layer
order) after the forward pass. Each forward overwrites them, so with several micro-batches
(gradient accumulation) collect the statistics, and add the loss, after each forward, as the
trainer's and NeMo's loss functions do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import (
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)

from nemo_dmc.core import Stage, compression_loss, realised_cr, target_cr, zero_out_scale
from nemo_dmc.megatron.attention import DMC_MODE, ZERO_OUT_MODE, DMCSelfAttention


@dataclass
class DMCStats:
    """Decision statistics of one forward pass (identical on all tensor-parallel ranks).

    merge_fraction: scalar mean straight-through decision over tokens, heads and layers;
        differentiable (its gradient reaches every layer's decision channel).
    layer_cr: ``[layers]`` realised compression ratio per layer (hard decisions).
    head_cr: ``[layers, kv_heads]`` realised compression ratio per global KV head.
    """

    merge_fraction: Tensor
    layer_cr: Tensor
    head_cr: Tensor

    @property
    def cr(self) -> Tensor:
        """Realised compression ratio of the whole model."""
        return realised_cr(self.merge_fraction)

    def loss(self, target_cr: float) -> Tensor:
        """One-sided compression loss against ``target_cr``."""
        return compression_loss(self.merge_fraction, target_cr)


def dmc_attention_modules(model: nn.Module) -> Iterator[DMCSelfAttention]:
    """The DMC self-attention modules of ``model`` in layer order."""
    return (m for m in model.modules() if isinstance(m, DMCSelfAttention))


def set_dmc_mode(model: nn.Module, mode: str, zero_out_scale: float = 1.0) -> None:
    """Switch every DMC layer to ``"dmc"`` or to ``"zero_out"`` with the given q/k scale."""
    if mode not in (DMC_MODE, ZERO_OUT_MODE):
        raise ValueError(f"DMC mode must be {DMC_MODE!r} or {ZERO_OUT_MODE!r}, got {mode!r}")
    for module in dmc_attention_modules(model):
        module.dmc_mode = mode
        module.zero_out_scale = zero_out_scale


def apply_stage(model: nn.Module, stage: Stage | str, step: int, steps: int,
                final_cr: float) -> Optional[float]:
    """Put the DMC layers in ``stage``'s mode for optimizer step ``step`` (0-based) of
    ``steps``; return that step's CR target (``None`` in pretraining and zero-out, which
    train the LM only; pretraining runs plain attention, i.e. zero-out mode at scale 1)."""
    stage = Stage(stage)
    if stage is Stage.PRETRAIN:
        set_dmc_mode(model, ZERO_OUT_MODE, 1.0)
        return None
    if stage is Stage.ZERO_OUT:
        set_dmc_mode(model, ZERO_OUT_MODE, zero_out_scale(step, steps))
        return None
    set_dmc_mode(model, DMC_MODE)
    return target_cr(stage, step + 1, steps, final_cr)


def collect_dmc_stats(model: nn.Module) -> Optional[DMCStats]:
    """Statistics of the model's last forward, or ``None`` if no layer took DMC decisions."""
    decisions = [m.last_decisions for m in dmc_attention_modules(model)]
    if not decisions or any(d is None for d in decisions):
        return None
    st_sum = torch.stack([d.straight_through.sum() for d in decisions])
    # Hard decisions summed over batch and sequence: [layers, local_kv_heads].
    head_merges = torch.stack([d.hard.sum(dim=(0, 2)) for d in decisions])
    tokens = decisions[0].hard.shape[0] * decisions[0].hard.shape[2]

    tp = parallel_state.get_tensor_model_parallel_world_size()
    if tp > 1:
        st_sum = reduce_from_tensor_model_parallel_region(st_sum)
        head_merges = gather_from_tensor_model_parallel_region(head_merges.contiguous())
    head_fraction = head_merges / tokens
    merge_fraction = st_sum.sum() / (tokens * head_merges.shape[1] * len(decisions))
    return DMCStats(merge_fraction=merge_fraction,
                    layer_cr=realised_cr(head_fraction.mean(dim=1)),
                    head_cr=realised_cr(head_fraction))
