"""DMC Llama for Hugging Face transformers: Llama whose attention is DMC.

Same weights and names as ``LlamaForCausalLM``; each layer's attention takes decisions,
accumulates keys/values and applies the survival bias through ``nemo_dmc.core`` (the same
functions the megatron model uses), so eval logits match the megatron DMC model.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb

from nemo_dmc.core import DMCConfig, dmc_attention, dmc_states


class DMCLlamaHFConfig(LlamaConfig):
    """``LlamaConfig`` plus the DMC settings (``dmc_*``)."""

    model_type = "dmc_llama"

    def __init__(self, dmc_init_offset: float = 5.0, dmc_temperature: float = 0.1,
                 dmc_window: Optional[int] = 12, dmc_target_cr: float = 4.0, **kwargs) -> None:
        self.dmc_init_offset = dmc_init_offset
        self.dmc_temperature = dmc_temperature
        self.dmc_window = dmc_window
        self.dmc_target_cr = dmc_target_cr
        super().__init__(**kwargs)

    def dmc_config(self) -> DMCConfig:
        return DMCConfig(init_offset=self.dmc_init_offset, temperature=self.dmc_temperature,
                         window=self.dmc_window)


def _padding_mask(attention_mask: Optional[Tensor]) -> Optional[Tensor]:
    """transformers' 4D additive mask -> bool (True = masked); causality is DMC's own."""
    if attention_mask is None or attention_mask.dim() != 4:
        return None
    if attention_mask.dtype == torch.bool:
        return ~attention_mask
    return attention_mask < torch.finfo(attention_mask.dtype).min / 2


class DMCLlamaAttention(LlamaAttention):
    """Llama attention with DMC states (full-sequence forward)."""

    def __init__(self, config: DMCLlamaHFConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.dmc_config = config.dmc_config()

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor],
                attention_mask: Optional[Tensor], past_key_values=None, cache_position=None,
                **kwargs) -> tuple[Tensor, None]:
        if past_key_values is not None and past_key_values.get_seq_length(self.layer_idx) > 0:
            raise ValueError("DMCLlamaForCausalLM recomputes the full sequence; pass "
                             "use_cache=False (compressed-cache generation: nemo_dmc.inference)")
        b, s, _ = hidden_states.shape
        shape = (b, s, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        q, k, v, decisions = dmc_states(q, k, v, self.dmc_config, self.training)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out = dmc_attention(q, k, v, decisions.state_bias, self.scaling,
                            mask=_padding_mask(attention_mask),
                            dropout_p=self.attention_dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), None


class DMCLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` with :class:`DMCLlamaAttention` in every layer."""

    config_class = DMCLlamaHFConfig

    def __init__(self, config: DMCLlamaHFConfig) -> None:
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = DMCLlamaAttention(config, i)
        self.post_init()
