"""Pure-torch DMC math: decisions, accumulation, attention bias, loss, schedules, reference;
and the plain settings dataclasses shared by every package (``DMCConfig``, ``ModelConfig``).

Nothing here imports megatron; every other part of nemo_dmc builds on these functions.
"""

from importlib import import_module
from typing import Any

# The settings dataclasses import nothing heavy: configs validate and ``--help`` answers
# without torch. The math is imported on first use (PEP 562).
from nemo_dmc.core.config import DMCConfig
from nemo_dmc.core.distill import DistillConfig
from nemo_dmc.core.model_config import ModelConfig
from nemo_dmc.core.schedule import Stage, target_cr, zero_out_scale

_LAZY = {
    "accumulation": ("linear_scan", "normalize_sums", "partial_accumulate", "weighted_entries",
                     "windowed_scan"),
    "attention": ("RoPE", "attended_rope", "dmc_attention", "dmc_score_bias",
                  "dmc_self_attention", "dmc_states", "decision_inputs"),
    "decisions": ("Decisions", "after_rope", "attended", "decision_logits", "hard_merges",
                  "importance", "make_decisions", "sample_logistic_noise", "signal_importance",
                  "signal_logits", "source_logits", "zero_decision_channel",
                  "zeroes_after_rope"),
    "loss": ("cap_fraction", "compression_loss", "dmc_compression_loss", "merge_target",
             "realised_cr"),
    "reference": ("SimulationResult", "rotate_half_rope", "simulate_inference"),
}
_HOME = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "DMCConfig", "Decisions", "after_rope", "attended", "attended_rope", "DistillConfig",
    "ModelConfig", "RoPE", "SimulationResult", "Stage",
    "cap_fraction", "compression_loss", "decision_inputs", "decision_logits",
    "dmc_compression_loss", "dmc_attention", "dmc_score_bias",
    "dmc_self_attention", "dmc_states", "hard_merges", "importance", "linear_scan", "make_decisions", "normalize_sums", "weighted_entries", "merge_target",
    "partial_accumulate", "realised_cr", "rotate_half_rope", "sample_logistic_noise",
    "signal_importance", "signal_logits", "source_logits", "simulate_inference", "target_cr", "windowed_scan", "zero_decision_channel",
    "zero_out_scale", "zeroes_after_rope",
]
