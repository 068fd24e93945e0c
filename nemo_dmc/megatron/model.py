"""Building Llama-family megatron-core GPT models, vanilla or with DMC attention."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_dmc.core import DMCConfig
from nemo_dmc.megatron.spec import dmc_layer_spec, llama_layer_spec


@dataclass
class ModelConfig:
    """Shape of a Llama-family decoder (RMSNorm, SwiGLU, RoPE, no biases).

    ``vocab_size`` is the tokenizer's; the embedding is padded to a multiple of
    ``make_vocab_size_divisible_by * tensor_parallel_size``.
    """

    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 8
    num_query_groups: Optional[int] = 4
    ffn_hidden_size: int = 704
    vocab_size: int = 8192
    seq_length: int = 256
    rotary_base: float = 10000.0
    rope_scaling_factor: Optional[float] = None  # Llama-3.1 frequency scaling (None: off)
    norm_epsilon: float = 1e-5
    share_embeddings_and_output_weights: bool = False
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    pretrain_tokens: Optional[int] = None

    @property
    def kv_heads(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self, tensor_parallel_size: int = 1) -> None:
        """Raise ``ValueError`` naming the offending ``model.*`` key."""
        for key in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                    "vocab_size", "seq_length"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model.hidden_size ({self.hidden_size}) must be divisible by "
                             f"model.num_attention_heads ({self.num_attention_heads})")
        if self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"head dim hidden_size/num_attention_heads = {self.head_dim} "
                             "must be even and >= 2 (RoPE pairs; DMC repurposes one channel)")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError(f"model.num_query_groups ({self.kv_heads}) must divide "
                             f"model.num_attention_heads ({self.num_attention_heads})")
        for key, heads in (("num_attention_heads", self.num_attention_heads),
                           ("num_query_groups", self.kv_heads)):
            if heads % tensor_parallel_size:
                raise ValueError(f"model.{key} ({heads}) is not divisible by the tensor-parallel "
                                 f"size ({tensor_parallel_size}): choose "
                                 f"parallel.tensor_model_parallel_size dividing it")

    def padded_vocab_size(self, tensor_parallel_size: int = 1) -> int:
        multiple = self.make_vocab_size_divisible_by * tensor_parallel_size
        return -(-self.vocab_size // multiple) * multiple


def _have_fused_norms() -> bool:
    for name in ("transformer_engine", "apex"):
        try:
            __import__(name)
            return True
        except ImportError:
            continue
    return False


def transformer_config(model: ModelConfig, tensor_parallel_size: int = 1,
                       sequence_parallel: bool = False, bf16: bool = False,
                       recompute_core_attention: bool = False) -> TransformerConfig:
    """megatron ``TransformerConfig`` of a Llama-family model (CPU-safe: no fused kernels)."""
    model.validate(tensor_parallel_size)
    if sequence_parallel and tensor_parallel_size > 1 and not _have_fused_norms():
        raise ValueError("parallel.sequence_parallel=true needs Transformer Engine or Apex "
                         "(megatron's torch RMSNorm does not support it); install one or "
                         "set parallel.sequence_parallel=false")
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.kv_heads,
        ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=tensor_parallel_size,
        sequence_parallel=sequence_parallel and tensor_parallel_size > 1,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        recompute_granularity="selective" if recompute_core_attention else None,
        recompute_modules=["core_attn"] if recompute_core_attention else None,
    )


def build_model(model: ModelConfig, dmc: Optional[DMCConfig] = None,
                sequence_parallel: bool = False, bf16: bool = False,
                recompute_core_attention: bool = False,
                use_transformer_engine: Optional[bool] = None) -> GPTModel:
    """A megatron ``GPTModel`` for the current tensor-parallel group.

    ``dmc=None`` builds the vanilla model; otherwise every layer uses DMC attention.
    Requires ``parallel_state`` to be initialised (``nemo_dmc.megatron.parallel``).
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    config = transformer_config(model, tp, sequence_parallel, bf16, recompute_core_attention)
    spec = llama_layer_spec(use_transformer_engine)
    if dmc is not None:
        spec = dmc_layer_spec(spec, dmc)
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=model.padded_vocab_size(tp),
        max_sequence_length=model.seq_length,
        share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=int(model.rotary_base),
        rope_scaling=model.rope_scaling_factor is not None,
        rope_scaling_factor=model.rope_scaling_factor or 8.0,
        parallel_output=True,
    )
