"""``DMCCache``: a transformers cache backed by nemo_dmc's per-head paged compressed cache.

``DMCLlamaForCausalLM.generate`` creates one; its attention layers then run their method's
cache policy (:mod:`nemo_dmc.kvcache.policies`) against it, the same code the megatron
inference engine uses.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache

from nemo_dmc.kvcache.paged import CacheLayout, MemoryReport, PagedKVCache
from nemo_dmc.kvcache.policies import policy_for
from nemo_dmc.methods import build_method


def left_padding(attention_mask: Tensor) -> Tensor:
    """``[b]`` leading pad tokens per row of a ``[b, s]`` 0/1 attention mask.

    Raises:
        ValueError: if a row has padding after (or between) its tokens, or no token.
    """
    mask = attention_mask.bool()
    if not bool(mask[:, -1].all()) or bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("DMCLlamaForCausalLM.generate takes left-padded batches (set the "
                         "tokenizer's padding_side='left'); this attention_mask has padding "
                         "after or between a row's tokens")
    return (~mask).sum(dim=1)


class DMCCache(DynamicCache):
    """Compressed cache for ``batch_size`` sequences of up to ``max_length`` tokens (padding
    included), left padded or not (see :meth:`set_left_padding`).

    The pool is sized for the worst case (no merges), so generation never runs out of blocks.
    """

    def __init__(self, config, batch_size: int, max_length: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        super().__init__()
        layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        blocks = batch_size * layers * kv_heads * -(-max_length // block_size)
        policy = policy_for(build_method(config.method_settings))  # every layer's method
        self.paged = PagedKVCache(CacheLayout(
            num_layers=layers, kv_heads=kv_heads, head_dim=head_dim, window=policy.window,
            block_size=block_size, num_blocks=blocks, max_sequences=batch_size,
            max_sequence_length=max_length, dtype=dtype, open_runs=policy.open_runs,
            slot_scores=policy.slot_scores), device=device)
        self.rows = torch.tensor([self.paged.acquire_row() for _ in range(batch_size)],
                                 device=device)
        self.padding = torch.zeros(batch_size, dtype=torch.int64, device=device)
        self.seen = 0

    def set_left_padding(self, attention_mask: Tensor) -> None:
        """Record each row's leading pad tokens (:func:`left_padding`) before the prompt; pad
        tokens are never cached and each row's positions start at its first real token."""
        if self.seen:
            raise ValueError("set_left_padding must precede the first forward")
        self.padding = left_padding(attention_mask).to(self.rows.device)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens processed so far, padding included (not slots: see :meth:`memory`)."""
        return self.seen

    def positions(self, tokens: int) -> Tensor:
        """``[b, tokens]`` positions of the next tokens, counted from each row's first real
        token (negative for pad tokens)."""
        start = self.seen - self.padding.view(-1, 1)
        return start + torch.arange(tokens, device=self.padding.device)

    def advance(self, tokens: int) -> None:
        """Called after the last layer processed ``tokens`` new tokens per sequence."""
        self.seen += tokens
        self.paged.positions[self.rows] = (self.seen - self.padding).clamp_min(0)

    def memory(self) -> MemoryReport:
        """KV bytes and the realised compression ratio of the cached sequences."""
        return self.paged.memory(self.rows.tolist())
