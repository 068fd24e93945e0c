"""Full (TP=1) state dicts <-> this rank's tensor-parallel shards of a megatron GPT model.

Tensor-parallel params are split along their ``partition_dim``; the SwiGLU ``fc1`` weight
holds ``[gate; up]`` globally and ``[gate_r; up_r]`` on each rank.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch import Tensor, nn


def _is_swiglu_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight")


def _tp() -> tuple[int, int]:
    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_rank())


def shard_full_state(full: dict, model: nn.Module) -> dict:
    """Cut a full state dict into this rank's shards of ``model`` (for ``load_state_dict``)."""
    tp, rank = _tp()
    params = dict(model.named_parameters())
    out = {}
    for name, tensor in full.items():
        param = params.get(name)
        if param is None or not getattr(param, "tensor_model_parallel", False) or tp == 1:
            out[name] = tensor
        elif _is_swiglu_fc1(name):
            gate, up = tensor.chunk(2, dim=0)
            out[name] = torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]])
        else:
            out[name] = tensor.chunk(tp, dim=param.partition_dim)[rank].clone()
    return out


def join_shards(name: str, parts: Sequence[Tensor], partition_dim: int) -> Tensor:
    """The full tensor of a tensor-parallel param from its per-rank ``parts`` (rank order):
    concatenated along ``partition_dim``, the SwiGLU ``fc1`` weight as ``[gate; up]``."""
    if _is_swiglu_fc1(name):
        gates, ups = zip(*(p.chunk(2, dim=0) for p in parts))
        return torch.cat([*gates, *ups])
    return torch.cat(list(parts), dim=partition_dim)


def _gather(name: str, param: nn.Parameter, local: Tensor, is_grad: bool) -> Tensor:
    tp, _ = _tp()
    group = parallel_state.get_tensor_model_parallel_group()
    if is_grad and getattr(param, "sequence_parallel", False) and tp > 1:
        local = local.clone()  # sequence-parallel norm grads are partial sums per rank
        dist.all_reduce(local, group=group)
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return local.detach().clone()
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    return join_shards(name, parts, param.partition_dim)


def _gather_all(model: nn.Module, pick: Callable[[nn.Parameter], Tensor], is_grad: bool) -> dict:
    return {name: _gather(name, p, pick(p), is_grad) for name, p in model.named_parameters()}


def gather_full_state(model: nn.Module) -> dict:
    """The full (TP=1 layout) parameters of ``model`` on every rank."""
    return _gather_all(model, lambda p: p.data, is_grad=False)


def gather_full_grads(model: nn.Module) -> dict:
    """The full (TP=1 layout) gradients of ``model`` on every rank."""
    return _gather_all(model, lambda p: p.grad, is_grad=True)
