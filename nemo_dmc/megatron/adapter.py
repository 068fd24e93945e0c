"""The decision adapter: a small per-layer module giving a KV method its decision signals
from the attention input, so the model's queries and keys stay intact.

``RMSNorm(hidden) -> Linear(hidden -> n x KV heads)``, zero-initialised (weights and bias):
every signal starts at 0, which for DMC means "append, full importance" exactly as a zeroed
channel D-1 does, so a retrofit starts from the original model itself. The projection is
column-parallel: each tensor-parallel rank computes the signals of its own KV heads (outputs
ordered ``[kv head][signal]``, so the column split is a head split).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_dmc.methods import ADAPTER_MODULE

__all__ = ["ADAPTER_MODULE", "DecisionAdapter", "train_only_adapters"]

class DecisionAdapter(MegatronModule):
    """``[s, b, hidden]`` -> ``[b, hk_local, s, outputs]`` signals per KV head."""

    def __init__(self, config: TransformerConfig, num_kv_heads: int, outputs: int) -> None:
        super().__init__(config=config)
        self.outputs = outputs
        self.eps = config.layernorm_epsilon
        self.norm_weight = nn.Parameter(torch.ones(config.hidden_size,
                                                   dtype=config.params_dtype))
        # Under sequence parallelism the norm sees a sequence shard: its grad is summed over
        # the tensor-parallel ranks like megatron's own norms.
        setattr(self.norm_weight, "sequence_parallel", config.sequence_parallel)
        self.linear = tensor_parallel.ColumnParallelLinear(
            config.hidden_size, num_kv_heads * outputs, config=config,
            init_method=nn.init.zeros_, bias=True, gather_output=False, skip_bias_add=False)
        with torch.no_grad():
            self.linear.bias.zero_()

    def forward(self, hidden: Tensor) -> Tensor:
        x = hidden.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        x = (x * self.norm_weight.float()).to(hidden.dtype)
        out, _ = self.linear(x)  # [s, b, hk_local * outputs] (sequence gathered under SP)
        s, b = out.shape[0], out.shape[1]
        return out.view(s, b, -1, self.outputs).permute(1, 2, 0, 3)


def train_only_adapters(model: nn.Module) -> int:
    """Freeze every parameter of ``model`` but its decision adapters (before wrapping it in
    DDP); return how many parameters stay trainable (error if the model has no adapter)."""
    trainable = 0
    for name, param in model.named_parameters():
        param.requires_grad_(ADAPTER_MODULE in name)
        trainable += param.numel() if param.requires_grad else 0
    if not trainable:
        raise ValueError("optim.trainable=decisions: the model has no decision adapters "
                         "(set dmc.decision_source=adapter)")
    return trainable
