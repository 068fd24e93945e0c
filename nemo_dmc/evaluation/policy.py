"""The cache policy a checkpoint is evaluated under (``method=``).

* ``dmc``: the model's own hard decisions (eval mode), i.e. DMC's compressed cache;
* ``vanilla``: plain attention, no compression (zero-out mode at scale 1);
* ``h2o`` | ``tova`` | ``streaming``: plain attention with a training-free evicting cache at
  ``ratio`` (:mod:`nemo_dmc.baselines.eviction`).

In every case one parallel forward scores a whole sequence exactly as token-by-token
inference under that cache would.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from torch import nn

from nemo_dmc.baselines.eviction import EvictionPolicy, kv_policy, realised_ratio
from nemo_dmc.evaluation.config import EVICTION_METHODS, METHODS
from nemo_dmc.megatron.attention import DMC_MODE
from nemo_dmc.megatron.stats import dmc_attention_modules, set_dmc_mode


@contextmanager
def cache_policy(model: nn.Module, method: str, ratio: Optional[float] = None,
                 sinks: int = 4) -> Iterator[None]:
    """Run ``model`` under ``method`` inside the block; restore its DMC modes afterwards."""
    if method not in METHODS:
        raise ValueError(f"method: must be one of {', '.join(METHODS)}, got {method!r}")
    modules = list(dmc_attention_modules(model))
    if not modules:
        raise ValueError("load: the model has no DMC attention layers")
    if method != "dmc":  # plain attention, full (vanilla) or through an evicting cache
        policy = None if method == "vanilla" else EvictionPolicy(name=method, ratio=float(ratio),
                                                                 sinks=sinks)
        with kv_policy(model, policy):
            yield
        return
    saved = [(m.dmc_mode, m.zero_out_scale) for m in modules]
    set_dmc_mode(model, DMC_MODE)
    try:
        yield
    finally:
        for module, (mode, scale) in zip(modules, saved):
            module.dmc_mode, module.zero_out_scale = mode, scale


def eviction_ratio(model: nn.Module, method: str) -> Optional[float]:
    """Tokens per slot an eviction policy held at the last position of the last forward
    (``None`` for ``dmc``/``vanilla``)."""
    if method not in EVICTION_METHODS:
        return None
    return float(realised_ratio(model))
