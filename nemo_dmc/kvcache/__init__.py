"""The per-head paged KV cache and the attention computations over it, shared by the
megatron inference engine (:mod:`nemo_dmc.inference`) and the transformers model
(:mod:`nemo_dmc.hf`).

:mod:`~nemo_dmc.kvcache.paged` holds the cache (:class:`PagedKVCache`),
:mod:`~nemo_dmc.kvcache.view` one layer's slice of it (:class:`LayerCacheView`),
:mod:`~nemo_dmc.kvcache.policies` the cache policy of each KV method (DMC, DMS, plain attention,
eviction) acting on such a view, :mod:`~nemo_dmc.kvcache.attention` DMC's prefill and decode
attention, and
:mod:`~nemo_dmc.kvcache.ops` the pure-torch prefill operations they use (the decode step's
go through :mod:`nemo_dmc.kernels.dispatch`).
"""

from nemo_dmc.kvcache.attention import decode_attention, prefill_attention
from nemo_dmc.kvcache.paged import CacheFullError, CacheLayout, MemoryReport, PagedKVCache
from nemo_dmc.kvcache.policies import (
    CachePolicy,
    DecodeStep,
    DMCPolicy,
    DMSPolicy,
    EvictionPolicy,
    VanillaPolicy,
    policy_for,
)
from nemo_dmc.kvcache.view import LayerCacheView

__all__ = ["CacheFullError", "CacheLayout", "CachePolicy", "DMCPolicy", "DMSPolicy", "DecodeStep",
           "EvictionPolicy", "LayerCacheView", "MemoryReport", "PagedKVCache", "VanillaPolicy",
           "decode_attention", "policy_for", "prefill_attention"]
