"""Tiny model shapes shared by megatron-level tests."""

from nemo_dmc.core import ModelConfig

TINY_GQA = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=4,
                       ffn_hidden_size=96, vocab_size=256, seq_length=32)
