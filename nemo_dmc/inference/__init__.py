"""DMC inference with megatron-core models: parallel (chunked) prefill, batched decode with
continuous batching over the per-head paged cache of :mod:`nemo_dmc.kvcache`, sampling, and
tensor-parallel generation.

Typical use::

    from nemo_dmc.inference import EngineConfig, SamplingParams, generate
    results = generate(model, ["def main():"], SamplingParams(max_new_tokens=32),
                       EngineConfig(max_batch_size=4), tokenizer=tokenizer)
    print(results[0].text, results[0].cache.compression_ratio)
"""

from importlib import import_module
from typing import Any

# name -> submodule; imported on first use so that ``nemo_dmc.inference.config`` (the CLI's
# settings) loads without megatron (``--help`` and config validation stay fast)
_EXPORTS = {
    "EngineConfig": "config", "CacheStats": "engine", "GenerationResult": "engine",
    "InferenceEngine": "engine", "generate": "engine", "DMCModelRunner": "runner",
    "SamplingParams": "sampling", "filter_logits": "sampling", "sample_tokens": "sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
