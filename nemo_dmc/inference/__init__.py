"""DMC inference with megatron-core models: parallel (chunked) prefill, batched decode with
continuous batching over the per-head paged cache of :mod:`nemo_dmc.kvcache`, sampling, and
tensor-parallel generation.

Typical use::

    from nemo_dmc.inference import EngineConfig, SamplingParams, generate
    results = generate(model, ["def main():"], SamplingParams(max_new_tokens=32),
                       EngineConfig(max_batch_size=4), tokenizer=tokenizer)
    print(results[0].text, results[0].cache.compression_ratio)
"""

from nemo_dmc.inference.config import EngineConfig
from nemo_dmc.inference.engine import CacheStats, GenerationResult, InferenceEngine, generate
from nemo_dmc.inference.runner import DMCModelRunner
from nemo_dmc.inference.sampling import SamplingParams, filter_logits, sample_tokens

__all__ = [
    "CacheStats", "DMCModelRunner", "EngineConfig", "GenerationResult", "InferenceEngine",
    "SamplingParams", "filter_logits", "generate", "sample_tokens",
]
