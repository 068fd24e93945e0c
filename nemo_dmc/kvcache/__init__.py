"""The per-head paged DMC KV cache and the attention computations over it, shared by the
megatron inference engine (:mod:`nemo_dmc.inference`) and the transformers model
(:mod:`nemo_dmc.hf`).

:mod:`~nemo_dmc.kvcache.paged` holds the cache (:class:`PagedKVCache`),
:mod:`~nemo_dmc.kvcache.attention` one layer's prefill and decode attention against it, and
:mod:`~nemo_dmc.kvcache.ops` the pure-torch prefill operations they use (the decode step's
go through :mod:`nemo_dmc.kernels.dispatch`).
"""

from nemo_dmc.kvcache.attention import decode_attention, prefill_attention
from nemo_dmc.kvcache.paged import CacheFullError, CacheLayout, MemoryReport, PagedKVCache

__all__ = ["CacheFullError", "CacheLayout", "MemoryReport", "PagedKVCache", "decode_attention",
           "prefill_attention"]
