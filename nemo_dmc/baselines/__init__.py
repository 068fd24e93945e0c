"""Baselines DMC is compared against at equal compression ratio, in the same model code:
training-free KV eviction (:mod:`.eviction`: H2O, TOVA, StreamingLLM) and up-trained GQA
(:mod:`.gqa`: KV heads mean-pooled into fewer groups, then continued training;
``python -m nemo_dmc.baselines.gqa``)."""

from nemo_dmc.baselines.eviction import (
    EvictionPolicy,
    evicted_attention,
    kv_policy,
    realised_ratio,
)

__all__ = ["EvictionPolicy", "evicted_attention", "kv_policy", "realised_ratio"]
