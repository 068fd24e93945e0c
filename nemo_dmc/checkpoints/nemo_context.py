"""Reading a NeMo 2 checkpoint's ``context/`` (fiddle-serialised model and config): the model
shape and DMC settings it records, no weights loaded.

NeMo (the optional ``nemo`` extra) is imported lazily, so the rest of :mod:`nemo_dmc.checkpoints`
works without it; :func:`nemo_checkpoint_settings` then returns ``None``.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

import torch

from nemo_dmc.core import DMCConfig, ModelConfig

NEMO_CONTEXT = "context"  # a NeMo 2 checkpoint's serialised model and config

_CPU_SAFE = dict(bias_activation_fusion=False, masked_softmax_fusion=False,
                 persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False,
                 cross_entropy_loss_fusion=False, gradient_accumulation_fusion=False,
                 use_cpu_initialization=True)


def cpu_overrides() -> dict[str, bool]:
    """Config settings this machine needs to build a model: without CUDA, fused kernels off
    and CPU initialisation; with CUDA, none. Apply them where a config is instantiated, never
    save them in a checkpoint's context (they would follow the model to GPU clusters)."""
    return {} if torch.cuda.is_available() else dict(_CPU_SAFE)


def load_context_model(path: Path) -> Any:
    """The (unconfigured) NeMo ``GPTModel`` of a checkpoint's ``context/``, built with
    :func:`cpu_overrides`."""
    import fiddle as fdl
    from nemo.collections.llm.gpt.model.base import GPTModel
    from nemo.lightning import io

    context = Path(path) / NEMO_CONTEXT
    if not context.is_dir():
        raise FileNotFoundError(f"{context} not found: not a NeMo 2 checkpoint")
    spec = io.load_context(context, subpath="model", build=False)
    for key, value in cpu_overrides().items():
        setattr(spec.config, key, value)
    model = fdl.build(spec)
    if not isinstance(model, GPTModel):
        raise ValueError(f"{context} holds a {type(model).__name__}, not a NeMo GPTModel")
    return model


def model_config_from_nemo(config: Any, vocab_size: int) -> ModelConfig:
    """Our :class:`ModelConfig` from a NeMo Llama config (``vocab_size``: the tokenizer's)."""
    names = {f.name for f in fields(ModelConfig)}
    shape = dict(num_layers=config.num_layers, hidden_size=config.hidden_size,
                 num_attention_heads=config.num_attention_heads,
                 num_query_groups=config.num_query_groups, ffn_hidden_size=config.ffn_hidden_size,
                 vocab_size=vocab_size, seq_length=config.seq_length,
                 rotary_base=float(config.rotary_base), norm_epsilon=config.layernorm_epsilon,
                 share_embeddings_and_output_weights=config.share_embeddings_and_output_weights,
                 init_method_std=config.init_method_std,
                 make_vocab_size_divisible_by=config.make_vocab_size_divisible_by)
    return ModelConfig(**{k: v for k, v in shape.items() if k in names})


def read_nemo_settings(path: Path, vocab_size: int | None = None,
                       ) -> tuple[ModelConfig, Optional[DMCConfig]]:
    """Our :class:`ModelConfig` and the DMC settings (``None`` for a plain Llama) a NeMo 2
    checkpoint's context records (no weights loaded).

    ``vocab_size`` is the tokenizer's; by default the checkpoint's (padded) vocabulary.
    """
    config = load_context_model(path).config
    # A DMCLlamaConfig (nemo_dmc.nemo.config) records its DMC settings; a LlamaConfig has none.
    dmc = getattr(config, "dmc", None)
    return model_config_from_nemo(config, vocab_size or config.vocab_size), dmc


def read_nemo_model_config(path: Path, vocab_size: int | None = None) -> ModelConfig:
    """The shape part of :func:`read_nemo_settings`."""
    return read_nemo_settings(path, vocab_size)[0]


def nemo_checkpoint_settings(path: Path) -> Optional[tuple[ModelConfig, Optional[DMCConfig]]]:
    """Shape and DMC settings a NeMo 2 checkpoint's ``context/`` records (see
    :func:`read_nemo_settings`); ``None`` without ``nemo`` installed (its ``weights/`` still
    load). Raises ValueError for an unreadable context."""
    try:
        import fiddle  # noqa: F401
        import nemo.collections.llm  # noqa: F401
    except ImportError:
        return None
    try:
        return read_nemo_settings(path)
    except Exception as err:  # fiddle/NeMo raise many types for an unreadable context
        raise ValueError(f"cannot read the NeMo 2 model config in {path / NEMO_CONTEXT}: "
                         f"{err}") from err
