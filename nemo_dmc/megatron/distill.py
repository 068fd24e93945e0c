"""Logit distillation from a frozen teacher, vocab-parallel under tensor parallelism.

Each rank holds a slice of the vocabulary of both models' logits (``[b, s, V / TP]``, as a
megatron ``GPTModel`` returns them without labels). The softmax normalisers are taken over
the whole vocabulary with two all-reduces (max, then sum of exponentials) and the KL's
per-rank sums with a third; the gradient is written out (:class:`_VocabParallelKL`), so
it is exact for every layout: ``d(T^2 KL)/ds = T (p_s - p_t)`` for the forward direction,
``T p_s (log p_s - log p_t - KL)`` for the reverse one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
from torch import Tensor, nn

from nemo_dmc.core import DistillConfig


def _all_reduce(tensor: Tensor, op: dist.ReduceOp) -> Tensor:
    """``tensor`` reduced over the tensor-parallel group (in place; as is at TP=1)."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(tensor, op=op, group=parallel_state.get_tensor_model_parallel_group())
    return tensor


def vocab_parallel_log_softmax(logits: Tensor) -> Tensor:
    """``log softmax`` over the vocabulary split across TP ranks (no autograd)."""
    top = _all_reduce(logits.max(dim=-1, keepdim=True).values, dist.ReduceOp.MAX)
    shifted = logits - top
    total = _all_reduce(shifted.exp().sum(dim=-1, keepdim=True), dist.ReduceOp.SUM)
    return shifted - total.log()


class _VocabParallelKL(torch.autograd.Function):
    """``T^2 KL`` per token between two vocab-parallel logit tensors (see module docstring)."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, temperature: float,
                reverse: bool) -> Tensor:
        log_s = vocab_parallel_log_softmax(student.float() / temperature)
        log_t = vocab_parallel_log_softmax(teacher.float() / temperature)
        if reverse:
            p_s, gap = log_s.exp(), log_s - log_t
            kl = _all_reduce((p_s * gap).sum(dim=-1), dist.ReduceOp.SUM)
            ctx.save_for_backward(p_s, gap, kl)
        else:
            p_t = log_t.exp()
            kl = _all_reduce((p_t * (log_t - log_s)).sum(dim=-1), dist.ReduceOp.SUM)
            ctx.save_for_backward(log_s.exp(), p_t)
        ctx.temperature, ctx.reverse, ctx.dtype = temperature, reverse, student.dtype
        return kl * temperature ** 2

    @staticmethod
    def backward(ctx, grad: Tensor):
        if ctx.reverse:
            p_s, gap, kl = ctx.saved_tensors
            direction = p_s * (gap - kl.unsqueeze(-1))
        else:
            p_s, p_t = ctx.saved_tensors
            direction = p_s - p_t
        student_grad = direction * (ctx.temperature * grad.unsqueeze(-1))
        return student_grad.to(ctx.dtype), None, None, None


def vocab_parallel_kl(student: Tensor, teacher: Tensor, temperature: float = 1.0,
                      direction: str = "forward") -> Tensor:
    """``T^2 KL`` per token ``[...]`` of logits ``[..., V / TP]``; ``forward`` =
    ``KL(teacher || student)``, ``reverse`` = ``KL(student || teacher)``. Gradient to
    ``student`` only (the teacher is frozen)."""
    return _VocabParallelKL.apply(student, teacher.detach(), temperature, direction == "reverse")


@dataclass
class DistillTerms:
    """Per-token terms ``[b, s]`` of one micro-batch: the LM cross-entropy, the KL, and the
    objective ``lm_weight * ce + kl_weight * kl``."""

    ce: Tensor
    kl: Tensor
    loss: Tensor


def distill_terms(logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                  settings: DistillConfig) -> DistillTerms:
    """Cross-entropy (megatron's vocab-parallel one) and KL of student ``logits`` ``[b, s,
    V / TP]`` against the teacher's, mixed as ``settings`` say."""
    # megatron's cross-entropy overwrites its input: give it a copy.
    ce = vocab_parallel_cross_entropy(logits.float().clone(), labels)
    kl = vocab_parallel_kl(logits, teacher_logits, settings.temperature, settings.direction)
    return DistillTerms(ce=ce, kl=kl, loss=settings.lm_weight * ce + settings.kl_weight * kl)


def freeze(module: nn.Module) -> nn.Module:
    """``module`` in eval mode with every parameter's ``requires_grad`` off."""
    for param in module.parameters():
        param.requires_grad_(False)
    return module.eval()


class Teacher:
    """A frozen model (the original, in plain attention) and the distillation settings.

    Not an ``nn.Module``: a model holding it does not adopt its parameters (no optimizer
    state, no checkpoint entries, no DDP buckets).
    """

    def __init__(self, module: nn.Module, settings: DistillConfig) -> None:
        self.module = freeze(module)
        self.settings = settings

    @torch.no_grad()
    def logits(self, tokens: Tensor, position_ids: Tensor, mask: Optional[Tensor]) -> Tensor:
        """Vocab-parallel logits ``[b, s, V / TP]`` of one micro-batch."""
        self.module.eval()
        return self.module(tokens, position_ids, mask)

    def terms(self, model: nn.Module, tokens: Tensor, position_ids: Tensor,
              mask: Optional[Tensor], labels: Tensor) -> DistillTerms:
        """Forward the student ``model`` (no labels) and this teacher on the same micro-batch."""
        logits = model(tokens, position_ids, mask)
        return distill_terms(logits, self.logits(tokens, position_ids, mask), labels,
                             self.settings)

    @property
    def param_bytes(self) -> int:
        """Bytes of the teacher's parameters on this rank."""
        return sum(p.numel() * p.element_size() for p in self.module.parameters())
