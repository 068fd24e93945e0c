"""Building a DMC model for inference from a checkpoint (see :mod:`nemo_dmc.checkpoints.resolve`
for the accepted paths)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

from nemo_dmc.checkpoints.resolve import ResolvedCheckpoint, load_weights, resolve_checkpoint
from nemo_dmc.checkpoints.weights import stores_decision_adapters
from nemo_dmc.core import DMCConfig, ModelConfig
from nemo_dmc.megatron.model import build_model


def build_inference_model(checkpoint: Optional[str | Path | ResolvedCheckpoint],
                          model_config: ModelConfig,
                          dmc: DMCConfig, prefer_checkpoint_config: bool = True,
                          key: str = "checkpoint",
                          method: Optional[Callable[[DMCConfig], Any]] = None):
    """Build the model (current TP size) and load ``checkpoint`` into it.

    The model shape and DMC settings come from the checkpoint when it records them
    (``prefer_checkpoint_config``), else from the arguments. The layers run DMC, or the KV
    method whose settings ``method(dmc)`` returns (e.g. an eviction policy, or plain
    attention). ``checkpoint=None`` keeps the random initialisation (smoke tests,
    benchmarks); a :class:`ResolvedCheckpoint` is used as resolved. Errors name the config
    ``key``. Weights with decision adapters were trained
    with ``dmc.decision_source=adapter``: with ``prefer_checkpoint_config`` that source is
    used even where the checkpoint records no DMC settings (a weights checkpoint).

    Returns:
        ``(model in eval mode, model_config, dmc_config, resolved checkpoint or None)``.
    """
    resolved = None
    if checkpoint is not None:
        resolved = (checkpoint if isinstance(checkpoint, ResolvedCheckpoint)
                    else resolve_checkpoint(checkpoint, key))
        if prefer_checkpoint_config:
            model_config = resolved.recorded_model_config() or model_config
            dmc = resolved.recorded_dmc_config() or dmc
            if (dmc.decision_source == "channel" and resolved.kind in ("weights", "trainer")
                    and stores_decision_adapters(resolved.path)):
                dmc = replace(dmc, decision_source="adapter")
    model = build_model(model_config, dmc if method is None else method(dmc))
    if resolved is not None:
        load_weights(model, resolved)
    return model.eval(), model_config, dmc, resolved
