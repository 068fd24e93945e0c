"""``DMCLlamaConfig``: NeMo's ``LlamaConfig`` whose layer spec is the DMC transform."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.spec_utils import ModuleSpec
from nemo.collections.llm.gpt.model.base import default_layer_spec
from nemo.collections.llm.gpt.model.llama import LlamaConfig

from nemo_dmc.core import DMCConfig, Stage
from nemo_dmc.megatron.model import ModelConfig
from nemo_dmc.megatron.spec import dmc_layer_spec


def dmc_transformer_layer_spec(config: "DMCLlamaConfig") -> ModuleSpec:
    """NeMo's default Llama layer spec (TE when installed, else local), made DMC."""
    return dmc_layer_spec(default_layer_spec(config), config.dmc_config())


@dataclass
class DMCLlamaConfig(LlamaConfig):
    """A Llama config with DMC attention and the stage it trains in.

    The DMC settings are flat fields so NeMo's checkpoint context (``io.json``) stores them.
    """

    dmc_init_offset: float = 5.0
    dmc_temperature: float = 0.1
    dmc_window: Optional[int] = 12
    dmc_decision_scale: float = 1.0
    dmc_loss_weight: float = 1.0
    dmc_target_cr: float = 4.0
    dmc_stage: str = "retrofit"
    dmc_stage_steps: int = 6000
    transformer_layer_spec: object = dmc_transformer_layer_spec

    def __post_init__(self) -> None:
        if self.attention_backend == AttnBackend.local:
            # NeMo would swap the DMC core attention for DotProductAttention.
            raise ValueError("attention_backend=local replaces DMC's core attention; use auto")
        if self.dmc_target_cr < 1:
            raise ValueError(f"dmc_target_cr must be >= 1, got {self.dmc_target_cr}")
        if self.dmc_loss_weight < 0:
            raise ValueError(f"dmc_loss_weight must be >= 0, got {self.dmc_loss_weight}")
        if self.dmc_stage_steps < 1:
            raise ValueError(f"dmc_stage_steps must be >= 1, got {self.dmc_stage_steps}")
        Stage(self.dmc_stage)  # raises ValueError naming an unknown stage
        super().__post_init__()

    def dmc_config(self) -> DMCConfig:
        return DMCConfig(init_offset=self.dmc_init_offset, temperature=self.dmc_temperature,
                         window=self.dmc_window, decision_scale=self.dmc_decision_scale)


_CPU_SAFE = dict(bias_activation_fusion=False, masked_softmax_fusion=False,
                 persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False,
                 cross_entropy_loss_fusion=False, gradient_accumulation_fusion=False,
                 use_cpu_initialization=True)


def cpu_overrides() -> dict[str, bool]:
    """Config settings this machine needs to build a model: without CUDA, fused kernels off
    and CPU initialisation; with CUDA, none. Apply them where a config is instantiated, never
    save them in a checkpoint's context (they would follow the model to GPU clusters)."""
    return {} if torch.cuda.is_available() else dict(_CPU_SAFE)


def _llama_shape(model: ModelConfig) -> dict:
    """``LlamaConfig`` keyword arguments of our model shape."""
    model.validate()
    if model.rope_scaling_factor is not None:
        raise ValueError("NeMo export of Llama-3.1 RoPE scaling is not supported yet "
                         "(model.rope_scaling_factor)")
    return dict(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads, num_query_groups=model.kv_heads,
        ffn_hidden_size=model.ffn_hidden_size, kv_channels=model.head_dim,
        seq_length=model.seq_length, rotary_base=model.rotary_base,
        layernorm_epsilon=model.norm_epsilon, init_method_std=model.init_method_std,
        share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
        make_vocab_size_divisible_by=model.make_vocab_size_divisible_by,
        vocab_size=model.padded_vocab_size(),
    )


def llama_config(model: ModelConfig) -> LlamaConfig:
    """A plain NeMo :class:`LlamaConfig` of our model shape (with :func:`cpu_overrides`)."""
    return LlamaConfig(**_llama_shape(model), **cpu_overrides())


def dmc_llama_config(model: ModelConfig, dmc: DMCConfig, target_cr: float = 4.0,
                     stage: str = "retrofit", stage_steps: int = 6000, loss_weight: float = 1.0,
                     **overrides) -> DMCLlamaConfig:
    """A :class:`DMCLlamaConfig` for our model shape (with :func:`cpu_overrides`)."""
    kwargs = dict(
        _llama_shape(model),
        dmc_init_offset=dmc.init_offset, dmc_temperature=dmc.temperature, dmc_window=dmc.window,
        dmc_decision_scale=dmc.decision_scale, dmc_target_cr=target_cr, dmc_stage=stage,
        dmc_stage_steps=stage_steps, dmc_loss_weight=loss_weight,
        **cpu_overrides(),
    )
    kwargs.update(overrides)
    return DMCLlamaConfig(**kwargs)


def model_config_from_nemo(config: LlamaConfig, vocab_size: int) -> ModelConfig:
    """Our :class:`ModelConfig` from a NeMo Llama config (``vocab_size``: the tokenizer's)."""
    names = {f.name for f in fields(ModelConfig)}
    shape = dict(num_layers=config.num_layers, hidden_size=config.hidden_size,
                 num_attention_heads=config.num_attention_heads,
                 num_query_groups=config.num_query_groups, ffn_hidden_size=config.ffn_hidden_size,
                 vocab_size=vocab_size, seq_length=config.seq_length,
                 rotary_base=float(config.rotary_base), norm_epsilon=config.layernorm_epsilon,
                 share_embeddings_and_output_weights=config.share_embeddings_and_output_weights,
                 init_method_std=config.init_method_std,
                 make_vocab_size_divisible_by=config.make_vocab_size_divisible_by)
    return ModelConfig(**{k: v for k, v in shape.items() if k in names})
