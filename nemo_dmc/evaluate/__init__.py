"""Evaluation of DMC checkpoints: held-out perplexity at the realised compression ratio,
realised CR per layer and KV head, KV bytes, passkey retrieval, baseline cache policies
(``python -m nemo_dmc.evaluate``: :mod:`.__main__`, :func:`.runner.run`), and an
lm-evaluation-harness model type (:mod:`nemo_dmc.evaluate.lm_eval_adapter`, needs the
``eval`` extra)."""

from importlib import import_module
from typing import Any

# name -> submodule; imported on first use so that the CLI's config (``--help``, validation)
# loads without megatron
_EXPORTS = {
    "EvaluateConfig": "config", "PasskeyPrompt": "passkey", "make_passkey_prompt": "passkey",
    "passkey_prompts": "passkey", "PerplexityResult": "perplexity",
    "heldout_perplexity": "perplexity", "run": "runner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
