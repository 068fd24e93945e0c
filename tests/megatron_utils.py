"""Helpers for megatron-level tests: tiny configs and full <-> tensor-parallel weights."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from nemo_dmc.megatron.model import ModelConfig

TINY_GQA = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=4,
                       ffn_hidden_size=96, vocab_size=256, seq_length=32)


def _is_swiglu_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight")


def shard_full_state(full: dict, model: torch.nn.Module) -> dict:
    """Cut a TP=1 state dict into this rank's shards of ``model``.

    Tensor-parallel params are split along their ``partition_dim``; the SwiGLU ``fc1``
    weight holds ``[gate; up]`` globally and ``[gate_r; up_r]`` on each rank.
    """
    tp, rank = (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_tensor_model_parallel_rank())
    params = dict(model.named_parameters())
    out = {}
    for name, tensor in full.items():
        param = params.get(name)
        if param is None or not getattr(param, "tensor_model_parallel", False):
            out[name] = tensor
        elif _is_swiglu_fc1(name):
            gate, up = tensor.chunk(2, dim=0)
            out[name] = torch.cat([gate.chunk(tp, 0)[rank], up.chunk(tp, 0)[rank]])
        else:
            out[name] = tensor.chunk(tp, dim=param.partition_dim)[rank].clone()
    return out


def gather_full_grads(model: torch.nn.Module) -> dict:
    """The inverse of :func:`shard_full_state` for gradients (all ranks get the full ones)."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group()
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad
        if getattr(param, "sequence_parallel", False) and tp > 1:
            grad = grad.clone()  # sequence-parallel norms hold partial sums per rank
            dist.all_reduce(grad, group=group)
        if not getattr(param, "tensor_model_parallel", False) or tp == 1:
            grads[name] = grad.clone()
            continue
        parts = [torch.empty_like(grad) for _ in range(tp)]
        dist.all_gather(parts, grad.contiguous(), group=group)
        if _is_swiglu_fc1(name):
            gates, ups = zip(*(p.chunk(2, dim=0) for p in parts))
            grads[name] = torch.cat([*gates, *ups])
        else:
            grads[name] = torch.cat(parts, dim=param.partition_dim)
    return grads
