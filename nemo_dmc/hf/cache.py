"""``DMCCache``: a transformers cache backed by nemo_dmc's per-head paged compressed cache.

``DMCLlamaForCausalLM.generate`` creates one; its attention layers then run
:func:`nemo_dmc.inference.attention.prefill_attention` / ``decode_attention`` against it,
the same functions the megatron inference engine uses.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from nemo_dmc.inference.cache import CacheLayout, MemoryReport, PagedKVCache


class DMCCache(DynamicCache):
    """Compressed cache for ``batch_size`` unpadded sequences of up to ``max_length`` tokens.

    The pool is sized for the worst case (no merges), so generation never runs out of blocks.
    """

    def __init__(self, config, batch_size: int, max_length: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        super().__init__()
        layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        blocks = batch_size * layers * kv_heads * -(-max_length // block_size)
        self.paged = PagedKVCache(CacheLayout(
            num_layers=layers, kv_heads=kv_heads, head_dim=head_dim, window=config.dmc_window,
            block_size=block_size, num_blocks=blocks, max_sequences=batch_size,
            max_sequence_length=max_length, dtype=dtype), device=device)
        self.rows = torch.tensor([self.paged.acquire_row() for _ in range(batch_size)],
                                 device=device)
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens processed so far (not slots: those are per head, see :meth:`memory`)."""
        return self.seen

    def advance(self, tokens: int) -> None:
        """Called after the last layer processed ``tokens`` new tokens per sequence."""
        self.seen += tokens
        self.paged.positions[self.rows] += tokens

    def memory(self) -> MemoryReport:
        """KV bytes and the realised compression ratio of the cached sequences."""
        return self.paged.memory(self.rows.tolist())
