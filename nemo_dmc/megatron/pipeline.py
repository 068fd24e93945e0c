"""Pipeline-parallel stages of a KV-method model, with the decision fractions riding along.

The compression loss is a function of every layer's decision fraction (``[batch, layers,
kv_heads]``, :func:`~nemo_dmc.core.loss.dmc_compression_loss`), but under pipeline parallelism
each stage holds only some layers and only the last stage computes the loss. A
:class:`PipelineStageModel` therefore appends a few *carry rows* to the activation it hands to
the next stage: a ``[rows, batch, hidden]`` block holding the (straight-through,
differentiable) fractions of every layer so far, each stage adding its own at its layers'
global places. The last stage reads the whole ``[batch, layers, kv_heads]`` tensor from its
input and composes the loss exactly as a single stage would. megatron's schedules send the
carry with the activation and, in backward, send its gradient back with the activation's, so
each stage's decision parameters receive their exact share of the compression loss's gradient
through plain autograd, for any schedule and any number of micro-batches in flight.

The carry travels in the pipeline's dtype (bf16 in bf16 training), which rounds the fractions
the loss sees to ~3 significant digits; their gradient is unaffected.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
from megatron.core.models.gpt import GPTModel
from torch import Tensor, nn

from nemo_dmc.megatron.stats import DMCStats, collect_dmc_stats, method_attentions


def carry_rows(num_layers: int, kv_heads: int, hidden_size: int) -> int:
    """Rows of ``hidden_size`` values needed to hold one sequence's ``[layers, kv_heads]``
    fractions."""
    return math.ceil(num_layers * kv_heads / hidden_size)


def first_layer(model: nn.Module) -> int:
    """Global index (0-based) of the first KV-method layer of a stage (0 without any)."""
    layers = method_attentions(model)
    return layers[0].layer_number - 1 if layers else 0


class PipelineStageModel(GPTModel):
    """A ``GPTModel`` pipeline stage whose activations carry the decision fractions (see the
    module docstring). ``carry_rows=0``: a plain ``GPTModel`` stage (no trained decisions)."""

    def __init__(self, *args, carry_rows: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.carry_rows = carry_rows
        self.carry_in: Optional[Tensor] = None

    def set_input_tensor(self, input_tensor) -> None:
        tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor
        self.carry_in = None
        if tensor is not None and self.carry_rows:
            tensor, self.carry_in = tensor[:-self.carry_rows], tensor[-self.carry_rows:]
        super().set_input_tensor(tensor)

    def forward(self, *args, **kwargs):
        output = super().forward(*args, **kwargs)
        if self.post_process or not self.carry_rows:
            return output
        batch, hidden = output.shape[1], output.shape[2]
        flat = self.fractions(batch).to(output.dtype).view(batch, -1)
        flat = torch.nn.functional.pad(flat, (0, self.carry_rows * hidden - flat.shape[1]))
        carry = flat.view(batch, self.carry_rows, hidden).transpose(0, 1)
        return torch.cat([output, carry], dim=0)

    def fractions(self, batch: int, stats: Optional[DMCStats] = None) -> Tensor:
        """``[batch, layers, kv_heads]`` decision fractions of every layer up to this stage's
        last (zeros for later layers, and for layers without decisions), differentiable
        towards every stage that took them; ``stats``: this stage's, if already collected."""
        layers, kv_heads = self.config.num_layers, self.config.num_query_groups
        received = torch.zeros(batch, layers * kv_heads, dtype=torch.float32,
                               device=self.embedding_device())
        if self.carry_in is not None:
            received = self.carry_in.transpose(0, 1).reshape(batch, -1)[:, :layers * kv_heads]
            received = received.float()
        stats = stats if stats is not None else collect_dmc_stats(self)
        if stats is None:
            return received.view(batch, layers, kv_heads)
        local = stats.head_fraction.reshape(batch, -1)
        start = first_layer(self) * kv_heads
        placed = torch.nn.functional.pad(local, (start, layers * kv_heads - start - local.shape[1]))
        return (received + placed).view(batch, layers, kv_heads)

    def embedding_device(self) -> torch.device:
        return next(self.parameters()).device


def pipeline_stages(model: nn.Module) -> List[PipelineStageModel]:
    """The :class:`PipelineStageModel` chunks inside ``model`` (e.g. under DDP)."""
    return [m for m in model.modules() if isinstance(m, PipelineStageModel)]


def whole_model_fractions(model: nn.Module, batch_size: int,
                          stats: Optional[DMCStats] = None) -> Optional[Tensor]:
    """On a pipeline's last stage, the ``[batch, layers, kv_heads]`` decision fractions of the
    whole model, for :func:`~nemo_dmc.megatron.stats.method_loss` (``stats``: the stage's own,
    if already collected); ``None`` without a carry (no pipeline: the model's own layers are
    the whole model)."""
    stages = [stage for stage in pipeline_stages(model) if stage.post_process]
    if not stages or not stages[0].carry_rows:
        return None
    return stages[0].fractions(batch_size, stats)


def as_pipeline_stage(model: GPTModel, rows: int) -> PipelineStageModel:
    """Make a built ``GPTModel`` stage (e.g. NeMo's ``configure_model``) a
    :class:`PipelineStageModel` carrying ``rows`` rows, in place: same parameters and state
    dict, only the class changes. Its config then lets megatron's point-to-point
    communication exchange tensor shapes (``variable_seq_lengths``), so a schedule sized for
    the sequence alone receives the carry rows too."""
    model.__class__ = PipelineStageModel
    model.carry_rows, model.carry_in = rows, None
    if rows:
        model.config.variable_seq_lengths = True
    return model


def stage_carry_rows(config, method_settings) -> int:
    """Carry rows a stage of a model with ``config`` (megatron ``TransformerConfig``) and
    KV method ``method_settings`` needs: none unless the method trains decisions."""
    from nemo_dmc.methods import build_method

    if method_settings is None or not build_method(method_settings).trains_decisions:
        return 0
    return carry_rows(config.num_layers, config.num_query_groups, config.hidden_size)


class ModelChunks(nn.Module):
    """A rank's model chunks under interleaved (virtual) pipeline stages, each wrapped on its
    own (e.g. in megatron's DDP), behaving as one model for the trainer: ``train``/``eval``,
    ``modules``, ``parameters`` and ``zero_grad_buffer`` reach every chunk;
    :meth:`sharded_state_dict` nests each chunk's under ``chunk<i>`` (the sharded keys are
    global, so a checkpoint loads under any layout)."""

    def __init__(self, chunks: List[nn.Module]) -> None:
        super().__init__()
        self.chunks = nn.ModuleList(chunks)

    @property
    def config(self):
        return self.chunks[0].config

    def zero_grad_buffer(self) -> None:
        for chunk in self.chunks:
            chunk.zero_grad_buffer()

    def sharded_state_dict(self, prefix: str = "", **kwargs) -> dict:
        return {f"chunk{i}": chunk.sharded_state_dict(prefix, **kwargs)
                for i, chunk in enumerate(self.chunks)}


def model_chunks(model: nn.Module) -> List[nn.Module]:
    """The chunks megatron's schedules take: those of a :class:`ModelChunks`, else ``[model]``."""
    return list(model.chunks) if isinstance(model, ModelChunks) else [model]
