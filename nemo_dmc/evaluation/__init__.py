"""Evaluation of DMC checkpoints: held-out perplexity at the realised compression ratio,
realised CR per layer and KV head, KV bytes, passkey retrieval, baseline cache policies
(``python -m nemo_dmc.evaluate``), and an lm-evaluation-harness model type
(:mod:`nemo_dmc.evaluation.lm_eval_adapter`, needs the ``eval`` extra)."""

from nemo_dmc.evaluation.config import METHODS, EvaluateConfig
from nemo_dmc.evaluation.passkey import PasskeyPrompt, make_passkey_prompt, passkey_prompts
from nemo_dmc.evaluation.perplexity import PerplexityResult, heldout_perplexity

__all__ = ["METHODS", "EvaluateConfig", "PasskeyPrompt", "PerplexityResult",
           "heldout_perplexity", "make_passkey_prompt", "passkey_prompts"]
