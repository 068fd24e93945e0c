"""Evaluation of DMC checkpoints: held-out perplexity at the realised compression ratio,
realised CR per layer and KV head, KV bytes, passkey retrieval, baseline cache policies
(``python -m nemo_dmc.evaluate``: :mod:`.__main__`, :func:`.runner.run`), and an
lm-evaluation-harness model type (:mod:`nemo_dmc.evaluate.lm_eval_adapter`, needs the
``eval`` extra)."""

from nemo_dmc.evaluate.config import EvaluateConfig
from nemo_dmc.evaluate.passkey import PasskeyPrompt, make_passkey_prompt, passkey_prompts
from nemo_dmc.evaluate.perplexity import PerplexityResult, heldout_perplexity
from nemo_dmc.evaluate.runner import run

__all__ = ["EvaluateConfig", "PasskeyPrompt", "PerplexityResult",
           "heldout_perplexity", "make_passkey_prompt", "passkey_prompts", "run"]
