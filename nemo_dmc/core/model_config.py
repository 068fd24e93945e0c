"""``ModelConfig``: the shape of a Llama-family decoder, shared by every part of nemo_dmc."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelConfig:
    """Shape of a Llama-family decoder (RMSNorm, SwiGLU, RoPE, no biases).

    Attributes:
        num_layers: decoder layers.
        hidden_size: model width.
        num_attention_heads: query heads (head dim = hidden_size / num_attention_heads).
        num_query_groups: KV heads (GQA); null = one per query head (MHA).
        ffn_hidden_size: SwiGLU inner width.
        vocab_size: the tokenizer's vocabulary; the embedding is padded to a multiple of
            make_vocab_size_divisible_by x the tensor-parallel size.
        seq_length: training sequence length (tokens per sample).
        rotary_base: RoPE base (theta).
        rope_scaling_factor: Llama-3.1 RoPE frequency scaling factor; null = off.
        norm_epsilon: RMSNorm epsilon.
        share_embeddings_and_output_weights: tie the output layer to the input embedding.
        init_method_std: std of the random initialisation (runs without a checkpoint).
        make_vocab_size_divisible_by: padding multiple of the embedding rows.
        pretrain_tokens: tokens the model was pretrained on; with dmc.budget_pct it sets the
            token budget of the stages that have a budget_share.
    """

    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 8
    num_query_groups: Optional[int] = 4
    ffn_hidden_size: int = 704
    vocab_size: int = 8192
    seq_length: int = 256
    rotary_base: float = 10000.0
    rope_scaling_factor: Optional[float] = None
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
