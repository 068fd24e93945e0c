"""Self-attention and core-attention modules of a KV-compression method, for megatron layer specs.

``MethodSelfAttention`` replaces ``SelfAttention``: it builds its layer's method object
(:mod:`nemo_dmc.methods`) from the settings in its spec params, lets the method turn the
pre-RoPE q/k/v into what attention sees (DMC: decisions and partial accumulations), rotates
queries and keys (then zeroes channel D-1 again where the method asks,
``Prepared.zero_after_rope``), and hands the per-key score bias to ``BiasedCoreAttention``,
which replaces ``DotProductAttention`` (megatron's asserts ``attention_bias is None``); a
method that simulates its own cache (eviction) attends itself. Tensors entering and leaving these
modules use megatron's ``[seq, batch, heads, dim]``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_dmc.core import RoPE, after_rope, sample_logistic_noise
from nemo_dmc.kernels import dispatch  # Triton kernels on CUDA, pure-torch references elsewhere
from nemo_dmc.megatron.adapter import ADAPTER_MODULE, DecisionAdapter
from nemo_dmc.megatron.noise import layer_generator
from nemo_dmc.methods import KVMethod, build_method


def _to_bhsd(x: Tensor) -> Tensor:
    """``[s, b, h, d]`` -> ``[b, h, s, d]``."""
    return x.permute(1, 2, 0, 3)


def _to_sbhd(x: Tensor) -> Tensor:
    """``[b, h, s, d]`` -> ``[s, b, h, d]``."""
    return x.permute(2, 0, 1, 3)


def megatron_rope(freqs: Tensor, config: TransformerConfig) -> RoPE:
    """Wrap megatron's rotary frequencies ``[max_s, 1, 1, d]`` as a ``rope(x, positions)``
    callable (``x``: ``[..., s, d]``) for :mod:`nemo_dmc.core` functions."""

    def rope(x: Tensor, positions: Tensor) -> Tensor:
        t = x.movedim(-2, 0)
        shape = t.shape
        t = t.reshape(shape[0], 1, -1, shape[-1])
        out = apply_rotary_pos_emb(t, freqs[positions.to(freqs.device)], config=config)
        return out.reshape(shape).movedim(0, -2)

    return rope


class BiasedCoreAttention(MegatronModule):
    """Causal softmax attention with a per-key score bias (DMC's survival bias) and GQA.

    ``attention_bias`` is the compact per-key bias ``[b, hk_local, s]`` from
    :class:`~nemo_dmc.core.Decisions` (``None``: plain causal attention), added where
    ``t - i > bias_window`` (0: DMC; DMS: its eviction window).
    """

    def __init__(self, config: TransformerConfig, layer_number: int,
                 attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("KV-method attention does not support context parallelism "
                             "(context_parallel_size must be 1)")
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[Tensor] = None, packed_seq_params=None,
                bias_window: int = 0) -> Tensor:
        """q ``[s, b, hq, d]``, k/v ``[s, b, hk, d]`` -> ``[s, b, hq * d]``."""
        if packed_seq_params is not None:
            raise ValueError("KV-method attention does not support packed sequences (THD format)")
        s, b, hk = key.shape[0], key.shape[1], key.shape[2]
        if (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal:
            # Causality is built into the DMC bias; like Transformer Engine, a causal mask
            # type ignores the (redundant) explicit mask. Padding masks use padding types.
            attention_mask = None
        if attention_bias is None:
            attention_bias = torch.zeros(b, hk, s, device=key.device, dtype=torch.float32)
        dropout_p = self.dropout_p if self.training else 0.0
        args = (_to_bhsd(query), _to_bhsd(key), _to_bhsd(value), attention_bias,
                self.softmax_scale, attention_mask, dropout_p, bias_window)
        if dropout_p > 0:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = dispatch.dmc_attention(*args)
        else:
            out = dispatch.dmc_attention(*args)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def _check_heads_divide(config: TransformerConfig, pg_collection) -> None:
    """Query heads and KV heads must split evenly over the tensor-parallel ranks (megatron
    itself only asserts this deep inside ``Attention.__init__``)."""
    tp_group = getattr(pg_collection, "tp", None)
    tp = tp_group.size() if tp_group is not None else \
        parallel_state.get_tensor_model_parallel_world_size()
    groups = config.num_query_groups or config.num_attention_heads
    for name, value in (("num_attention_heads", config.num_attention_heads),
                        ("num_query_groups", groups)):
        if value % tp:
            raise ValueError(f"attention: {name} ({value}) must be divisible by the "
                             f"tensor-parallel size ({tp})")


class MethodSelfAttention(SelfAttention):
    """Self-attention whose keys/values go through a KV-compression method (see module
    docstring); ``method`` is this layer's method object, built from ``method_settings``."""

    def __init__(self, config: TransformerConfig, submodules: SelfAttentionSubmodules,
                 layer_number: int, attn_mask_type: AttnMaskType = AttnMaskType.causal,
                 cp_comm_type: Optional[str] = None, pg_collection=None,
                 method_settings=None):
        _check_heads_divide(config, pg_collection)
        super().__init__(config, submodules, layer_number, attn_mask_type=attn_mask_type,
                         cp_comm_type=cp_comm_type, pg_collection=pg_collection)
        if method_settings is None:
            raise ValueError("MethodSelfAttention needs method_settings in its spec params "
                             "(nemo_dmc.megatron.spec.method_layer_spec)")
        self.method: KVMethod = build_method(method_settings)
        if self.method.adapter_outputs:
            setattr(self, ADAPTER_MODULE, DecisionAdapter(
                config, self.config.num_query_groups, self.method.adapter_outputs))
        if self.method.trains_decisions and config.recompute_granularity == "full":
            raise ValueError(f"{self.method.name} needs each layer's decisions for its loss: use "
                             "recompute_granularity='selective' (core_attn), not 'full'")

    def _training_noise(self, batch: int, seq: int, device: torch.device) -> Tensor:
        """Noise for this rank's KV heads, cut from one sample over all KV heads.

        Sampling the global ``[b, H_kv, s]`` tensor from a generator seeded alike on all
        tensor-parallel ranks (the layer's in a :func:`~nemo_dmc.megatron.noise.noise_scope`,
        else the default one) makes training decisions independent of TP (and, in a scope,
        of the pipeline layout).
        """
        local = self.num_query_groups_per_partition
        rank = parallel_state.get_tensor_model_parallel_rank()
        noise = sample_logistic_noise((batch, self.config.num_query_groups, seq), device,
                                      layer_generator(self.layer_number, device))
        return noise[:, rank * local:(rank + 1) * local]

    def decision_signals(self, hidden_states: Tensor) -> Optional[Tensor]:
        """``[b, hk_local, s, n]`` signals of the layer's decision adapter for its attention
        input ``[s, b, hidden]`` (``None`` when the method takes none)."""
        adapter = getattr(self, ADAPTER_MODULE, None)
        return None if adapter is None else adapter(hidden_states)

    def _rope(self, x: Tensor, freqs: Optional[Tensor]) -> Tensor:
        if freqs is None:
            return x
        return apply_rotary_pos_emb(x, freqs, config=self.config,
                                    cp_group=self.pg_collection.cp)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor],
                key_value_states=None, inference_context=None, rotary_pos_emb=None,
                rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                attention_bias=None, packed_seq_params=None, sequence_len_offset=None, *,
                inference_params=None):
        """``[s, b, hidden]`` -> ``([s, b, hidden], bias)`` like ``SelfAttention.forward``."""
        if inference_context is not None or inference_params is not None:
            raise ValueError("megatron inference contexts keep an uncompressed cache; generate "
                             "with the compressed cache through nemo_dmc.inference instead")
        if packed_seq_params is not None:
            raise ValueError("KV-method attention does not support packed sequences (THD format)")
        if isinstance(rotary_pos_emb, tuple):
            rotary_pos_emb = rotary_pos_emb[0]

        query, key, value = self.get_query_key_value_tensors(hidden_states)
        s, b = key.shape[0], key.shape[1]
        prepared = self.method.prepare(
            _to_bhsd(query), _to_bhsd(key), _to_bhsd(value), training=self.training,
            noise=lambda: self._training_noise(b, s, key.device),
            accumulate=dispatch.partial_accumulate, signals=self.decision_signals(hidden_states))
        query, key, value = (_to_sbhd(prepared.query), _to_sbhd(prepared.key),
                             _to_sbhd(prepared.value))
        query, key = (after_rope(self._rope(x, rotary_pos_emb), prepared.zero_after_rope)
                      for x in (query, key))
        if self.method.simulates_cache:
            out = self.method.attend(_to_bhsd(query), _to_bhsd(key), _to_bhsd(value),
                                     self.core_attention.softmax_scale)
            core_out = out.permute(2, 0, 1, 3).reshape(s, b, -1)
        else:
            core_out = self._core_attention(query, key, value, attention_mask, prepared.bias,
                                            prepared.bias_window)
        return self.linear_proj(core_out)

    def _core_attention(self, query: Tensor, key: Tensor, value: Tensor,
                        mask: Optional[Tensor], score_bias: Optional[Tensor],
                        bias_window: int = 0) -> Tensor:
        """Core attention, recomputed in backward under selective recompute.

        megatron's own checkpointed path closes over ``attention_bias``, which would cut its
        gradient; here the bias is an explicit checkpoint input.
        """
        if not (self.checkpoint_core_attention and self.training):
            return self.core_attention(query, key, value, mask, attention_bias=score_bias,
                                       bias_window=bias_window)

        def run(q: Tensor, k: Tensor, v: Tensor, m: Optional[Tensor], *bias: Tensor) -> Tensor:
            return self.core_attention(q, k, v, m, attention_bias=bias[0] if bias else None,
                                       bias_window=bias_window)

        extra = () if score_bias is None else (score_bias,)
        return tensor_parallel.checkpoint(run, False, query, key, value, mask, *extra)
