"""DMC Llama for Hugging Face transformers: Llama whose attention runs a KV method.

Same weights and names as ``LlamaForCausalLM``; each layer builds the method of
``config.kv_method`` (:mod:`nemo_dmc.methods`: ``dmc`` by default, or ``dms``, ``vanilla``,
``h2o``, ``tova``, ``streaming``) and calls the same hooks as the megatron model (DMC's decisions,
accumulation and survival bias through ``nemo_dmc.core`` and ``nemo_dmc.kernels.dispatch``),
so eval logits match the megatron model; ``generate`` keeps the method's compressed cache
through the inference engine's cache policies (:mod:`nemo_dmc.kvcache.policies`).

With ``dmc.decision_source="adapter"`` each attention also holds the layer's decision adapter
(:class:`DMCDecisionAdapter`, weights ``model.layers.N.self_attn.decision_adapter.{norm.weight,
linear.weight, linear.bias}``), whose signals give DMC its decisions and importance.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    rotate_half,
)

from nemo_dmc.core import DMCConfig, after_rope, sample_logistic_noise
from nemo_dmc.hf.cache import DMCCache
from nemo_dmc.kernels import dispatch  # Triton kernels on CUDA, pure-torch references elsewhere
from nemo_dmc.kvcache.ops import rope_tables
from nemo_dmc.kvcache.policies import DecodeStep, policy_for
from nemo_dmc.kvcache.view import LayerCacheView
from nemo_dmc.methods import ADAPTER_MODULE, build_method, settings_from_dict, settings_to_dict


class DMCLlamaHFConfig(LlamaConfig):
    """``LlamaConfig`` plus the KV method's settings: ``kv_method`` in ``config.json`` is
    :func:`nemo_dmc.methods.settings_to_dict` of a :class:`~nemo_dmc.core.DMCConfig`."""

    model_type = "dmc_llama"

    def __init__(self, kv_method: Optional[dict] = None, **kwargs) -> None:
        self.kv_method = kv_method if kv_method is not None else settings_to_dict(DMCConfig())
        super().__init__(**kwargs)

    @property
    def method_settings(self):
        """The settings of ``kv_method`` (any registered method)."""
        return settings_from_dict(self.kv_method, key="config.json kv_method")

    @property
    def dmc_config(self) -> DMCConfig:
        """The DMC settings of ``kv_method`` (error naming the key if they are not DMC's)."""
        settings = settings_from_dict(self.kv_method, key="config.json kv_method")
        if not isinstance(settings, DMCConfig):
            raise ValueError(f"config.json kv_method: DMCLlamaForCausalLM runs the dmc method, "
                             f"got {self.kv_method.get('name')!r}")
        return settings


def _rotate_tokens(x: Tensor, shift: Tensor) -> Tensor:
    """``x [b, h, c, d]`` with each row's tokens rotated ``shift[b]`` places to the left."""
    c = x.shape[2]
    index = (torch.arange(c, device=x.device) + shift.view(-1, 1)) % c  # [b, c]
    return x.gather(2, index[:, None, :, None].expand_as(x))


def _padding_mask(attention_mask: Optional[Tensor]) -> Optional[Tensor]:
    """transformers' 4D additive mask -> bool (True = masked); causality is DMC's own."""
    if attention_mask is None or attention_mask.dim() != 4:
        return None
    if attention_mask.dtype == torch.bool:
        return ~attention_mask
    return attention_mask < torch.finfo(attention_mask.dtype).min / 2


class DMCDecisionAdapter(nn.Module):
    """The megatron decision adapter (:class:`nemo_dmc.megatron.adapter.DecisionAdapter`, same
    numerics, its TP=1 weights): ``RMSNorm`` + ``Linear(hidden -> kv_heads x outputs)``, outputs
    ordered ``[kv head][signal]``; ``[b, s, hidden]`` -> ``[b, kv_heads, s, outputs]``."""

    def __init__(self, hidden_size: int, kv_heads: int, outputs: int, eps: float) -> None:
        super().__init__()
        self.outputs = outputs
        self.norm = LlamaRMSNorm(hidden_size, eps)
        self.linear = nn.Linear(hidden_size, kv_heads * outputs, bias=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The megatron init: a unit norm and a zero projection (every signal 0)."""
        with torch.no_grad():
            self.norm.weight.fill_(1.0)
            self.linear.weight.zero_()
            self.linear.bias.zero_()

    def forward(self, hidden: Tensor) -> Tensor:
        x = hidden.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.norm.variance_epsilon)
        x = (x * self.norm.weight.float()).to(hidden.dtype)
        b, s, _ = hidden.shape
        return self.linear(x).view(b, s, -1, self.outputs).permute(0, 2, 1, 3)


class DMCLlamaAttention(LlamaAttention):
    """Llama attention through the layer's KV method: the full sequence in parallel, or
    against a :class:`DMCCache` (prefill and decode through the method's cache policy)."""

    def __init__(self, config: DMCLlamaHFConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.method = build_method(config.method_settings)
        self.policy = policy_for(self.method)  # how generate() reads and writes the cache
        if self.method.adapter_outputs:
            setattr(self, ADAPTER_MODULE, DMCDecisionAdapter(
                config.hidden_size, config.num_key_value_heads, self.method.adapter_outputs,
                config.rms_norm_eps))
        self.is_last_layer = layer_idx == config.num_hidden_layers - 1
        self.rotary = LlamaRotaryEmbedding(config)

    @property
    def dmc_config(self) -> DMCConfig:
        """The layer's DMC settings (a DMC model only)."""
        if not isinstance(self.method.settings, DMCConfig):
            raise ValueError(f"this layer runs {self.method.name!r}, not dmc")
        return self.method.settings

    def _rope(self, x: Tensor, positions: Tensor) -> Tensor:
        """``nemo_dmc.core.RoPE`` form of the model's rotary embedding: ``x [..., n, d]``."""
        cos, sin = self.rotary(x, positions.view(1, -1))
        return x * cos[0] + rotate_half(x) * sin[0]

    def decision_signals(self, hidden_states: Tensor) -> Optional[Tensor]:
        """``[b, hk, s, n]`` signals of the layer's decision adapter for its attention input
        ``[b, s, hidden]`` (``None`` when the method takes none)."""
        adapter = getattr(self, ADAPTER_MODULE, None)
        return None if adapter is None else adapter(hidden_states)

    def _cached(self, cache: DMCCache, q: Tensor, k: Tensor, v: Tensor,
                signals: Optional[Tensor]) -> Tensor:
        c = q.shape[2]
        positions = cache.positions(c)  # [b, c]
        policy = self.policy
        view = LayerCacheView(cache.paged, self.layer_idx, cache.rows)
        if c == 1 and cache.seen > 0:
            step = DecodeStep(rope_tables(self._rope, positions[:, 0], self.head_dim, q.dtype),
                              int(positions.max()) + 1)  # a head holds <= 1 slot per token
            out = policy.decode(view, q, k, v, positions, self._rope, self.scaling, step,
                                signals)
        else:
            # Left padding: rotate each row's pad tokens behind its real ones, the right
            # padding prefill_attention takes (``counts`` real tokens from position 0), and
            # rotate the outputs back (those of pad tokens are never used).
            pad = (cache.padding - cache.seen).clamp(0, c)  # [b] pad tokens in this chunk
            if bool((pad >= c).any()):
                raise ValueError("a chunk holds only padding for some row: the first forward "
                                 "of a left-padded batch must cover all of its padding")
            q, k, v = (_rotate_tokens(x, pad) for x in (q, k, v))
            if signals is not None:
                signals = _rotate_tokens(signals, pad)
            out = policy.prefill(view, q, k, v, positions + pad.view(-1, 1), c - pad,
                                 self._rope, self.scaling, signals)
            out = _rotate_tokens(out, -pad)
        if self.is_last_layer:
            cache.advance(c)
        return out

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor],
                attention_mask: Optional[Tensor], past_key_values=None, cache_position=None,
                **kwargs) -> tuple[Tensor, None]:
        b, s, _ = hidden_states.shape
        shape = (b, s, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        signals = self.decision_signals(hidden_states)
        if isinstance(past_key_values, DMCCache):
            out = self._cached(past_key_values, q, k, v, signals)
            return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), None
        if past_key_values is not None and past_key_values.get_seq_length(self.layer_idx) > 0:
            raise ValueError("DMC attention needs a DMCCache (DMCLlamaForCausalLM.generate "
                             "creates one) or use_cache=False")
        hk = k.shape[1]
        prepared = self.method.prepare(
            q, k, v, training=self.training, accumulate=dispatch.partial_accumulate,
            noise=lambda: sample_logistic_noise((b, hk, s), k.device), signals=signals)
        cos, sin = position_embeddings
        q, k = (after_rope(x, prepared.zero_after_rope)
                for x in apply_rotary_pos_emb(prepared.query, prepared.key, cos, sin))
        mask = _padding_mask(attention_mask)
        if self.method.simulates_cache:
            below = torch.ones(s, s, dtype=torch.bool, device=k.device).tril()
            if mask is not None and bool((mask[..., -s:, -s:] & below).any()):
                raise ValueError(f"{self.method.name} scores padded batches only through the "
                                 "cache: use generate() (left padding) or unpadded inputs")
            out = self.method.attend(q, k, prepared.value, self.scaling)
        else:
            bias = prepared.bias if prepared.bias is not None else \
                torch.zeros(b, hk, s, device=k.device, dtype=torch.float32)
            out = dispatch.dmc_attention(q, k, prepared.value, bias, self.scaling, mask=mask,
                                         dropout_p=self.attention_dropout if self.training
                                         else 0.0, bias_window=prepared.bias_window)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), None


class DMCLlamaForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` with :class:`DMCLlamaAttention` in every layer; ``generate``
    keeps DMC's compressed per-head cache (:class:`DMCCache`)."""

    config_class = DMCLlamaHFConfig

    def __init__(self, config: DMCLlamaHFConfig) -> None:
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = DMCLlamaAttention(config, i)
        # transformers initialises the inner LlamaModel's missing weights with that model's
        # own _init_weights: route it through ours, which knows the decision adapters
        self.model._init_weights = self._init_weights
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Llama's init, and decision adapters at megatron's (a checkpoint without adapter
        weights, e.g. an original model, thus starts from "append all, full importance")."""
        super()._init_weights(module)
        if isinstance(module, DMCDecisionAdapter):  # after its children (children go first)
            module.reset_parameters()

    @staticmethod
    def _inferred_attention_mask(input_ids: Tensor, config, kwargs: dict) -> Optional[Tensor]:
        """The mask transformers infers when none is given: pad ids in the prompt are padding
        when the pad id differs from the eos id (``None``: no padding to infer)."""
        pad = kwargs.get("pad_token_id", config.pad_token_id)
        eos = kwargs.get("eos_token_id", config.eos_token_id)
        eos = set(eos) if isinstance(eos, (list, tuple)) else {eos}
        if pad is None or pad in eos or not bool((input_ids == pad).any()):
            return None
        return (input_ids != pad).long()

    def generate(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                 past_key_values=None, **kwargs):
        """``transformers`` generation with a :class:`DMCCache` (unless ``use_cache=False``).

        Prompts of mixed lengths must be left padded (``attention_mask`` 0 before each
        prompt); pad tokens are not cached and each row's positions start at its first token.
        """
        config = kwargs.get("generation_config") or self.generation_config
        if attention_mask is None and input_ids is not None:
            attention_mask = self._inferred_attention_mask(input_ids, config, kwargs)
        padded = attention_mask is not None and not bool(attention_mask.bool().all())
        if not kwargs.get("use_cache", True):
            if padded:
                raise ValueError("padded batches need the DMC cache: DMC would merge pad "
                                 "tokens into the states of use_cache=False")
        elif past_key_values is None and input_ids is not None:
            new = kwargs.get("max_new_tokens") or config.max_new_tokens
            length = input_ids.shape[1] + new if new else kwargs.get("max_length", config.max_length)
            past_key_values = DMCCache(self.config, input_ids.shape[0], length,
                                       dtype=self.dtype, device=input_ids.device)
        if padded and isinstance(past_key_values, DMCCache) and past_key_values.seen == 0:
            past_key_values.set_left_padding(attention_mask)
        return super().generate(input_ids=input_ids, attention_mask=attention_mask,
                                past_key_values=past_key_values, **kwargs)
