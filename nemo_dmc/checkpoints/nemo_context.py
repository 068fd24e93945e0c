"""Reading a NeMo 2 checkpoint's ``context/`` (fiddle-serialised model and config): the model
shape and DMC settings it records, no weights loaded.

``context/io.json`` names Python callables that fiddle imports and NeMo builds, so a downloaded
checkpoint could run any of them. Without the opt-in, only the references of
:func:`is_safe_reference` (NeMo's and our Llama model and config classes and the plain values
their configs hold) are imported, and only the part read is built (the config for the
settings, the model for :func:`load_context_model`); anything else stops with
:class:`UntrustedContextError` naming ``io.json``. Setting the environment variable
``NEMO_DMC_TRUST_NEMO_CONTEXT=1`` hands the context to NeMo's own loader, building whatever it
names (for checkpoints of your own with custom classes).

NeMo (the optional ``nemo`` extra) is imported lazily, so the rest of :mod:`nemo_dmc.checkpoints`
works without it; :func:`nemo_checkpoint_settings` then returns ``None``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

import torch

from nemo_dmc.core import DMCConfig, ModelConfig
from nemo_dmc.core.config import LEGACY_DEFAULTS

NEMO_CONTEXT = "context"  # a NeMo 2 checkpoint's serialised model and config
NEMO_TOKENIZER = "nemo_tokenizer"  # the HF tokenizer folder an export carries in context/
CONTEXT_FILE = "io.json"
TRUST_ENV = "NEMO_DMC_TRUST_NEMO_CONTEXT"  # "1": let NeMo build whatever a context names

# module -> names a context may reference without the opt-in (a compiled pattern: full match)
_SAFE_REFERENCES: dict[str, frozenset[str] | re.Pattern[str]] = {
    "builtins": frozenset({"tuple", "list", "dict"}),
    "fiddle._src.config": frozenset({"Config", "Partial", "BuildableTraverserMetadata"}),
    "fiddle._src.partial": frozenset({"Partial"}),
    "nemo_dmc.core.config": frozenset({"DMCConfig"}),
    "nemo_dmc.nemo.config": frozenset({"DMCLlamaConfig", "dmc_transformer_layer_spec"}),
    "nemo_dmc.nemo.model": frozenset({"DMCGPTModel"}),
    "nemo.collections.llm.gpt.model.llama": re.compile(r"(Code)?Llama\w*(Config\w*|Model)"),
    "nemo.collections.llm.gpt.model.base": frozenset({
        "GPTConfig", "GPTModel", "gpt_data_step", "gpt_forward_step", "default_layer_spec",
        "local_layer_spec", "transformer_engine_layer_spec",
        "transformer_engine_full_layer_spec"}),
    "nemo.lightning.pytorch.optim.megatron": frozenset({"MegatronOptimizerModule"}),
    # parsed, never built here (load_context_model drops it; see there)
    "nemo.collections.common.tokenizers.huggingface.auto_tokenizer": frozenset({"AutoTokenizer"}),
    "megatron.core.optimizer.optimizer_config": frozenset({"OptimizerConfig"}),
    "megatron.core.transformer.enums": re.compile(r"[A-Z]\w*(\.\w+)?"),  # enum or member
    "torch": frozenset({"float32", "float16", "bfloat16"}),
    "torch.nn.functional": frozenset({"silu", "gelu", "relu"}),
    # weight initialisers (recorded as Partial(normal_, std=...) once NeMo tracks them)
    "torch.nn.init": frozenset({"normal_", "zeros_", "ones_", "xavier_normal_",
                                "xavier_uniform_", "kaiming_normal_", "kaiming_uniform_"}),
}

_CPU_SAFE = dict(bias_activation_fusion=False, masked_softmax_fusion=False,
                 persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False,
                 cross_entropy_loss_fusion=False, gradient_accumulation_fusion=False,
                 use_cpu_initialization=True)


class UntrustedContextError(ValueError):
    """A NeMo 2 context names a callable outside :func:`is_safe_reference`; the message names
    ``io.json``, the reference and the opt-in."""


def cpu_overrides() -> dict[str, bool]:
    """Config settings this machine needs to build a model: without CUDA, fused kernels off
    and CPU initialisation; with CUDA, none. Apply them where a config is instantiated, never
    save them in a checkpoint's context (they would follow the model to GPU clusters)."""
    return {} if torch.cuda.is_available() else dict(_CPU_SAFE)


def trusts_nemo_context() -> bool:
    """Whether the user opted in (``NEMO_DMC_TRUST_NEMO_CONTEXT=1``) to NeMo building every
    object a checkpoint's context names."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def is_safe_reference(module: str, name: str) -> bool:
    """Whether a context may reference ``module.name`` without the opt-in (checked on the
    import path, before anything is imported)."""
    allowed = _SAFE_REFERENCES.get(module)
    if isinstance(allowed, re.Pattern):
        return allowed.fullmatch(name) is not None
    return allowed is not None and name in allowed


def _context_part(path: Path, part: str) -> Any:
    """The unbuilt fiddle config of ``model`` or ``config`` in a checkpoint's ``io.json`` (its
    own model, or the ``model`` of a trainer context), importing only safe references."""
    from fiddle._src.experimental import serialization
    from nemo.lightning.io.mixin import drop_unexpected_params

    file = Path(path) / NEMO_CONTEXT / CONTEXT_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: not a NeMo 2 checkpoint")
    data = json.loads(file.read_text())
    wanted = ("<root>.model", "<root>") if part == "model" else ("<root>.model.config",
                                                                   "<root>.config")
    objects = data.get("objects", {})
    key = next((key for name in wanted for key, value in objects.items()
                if name in (value.get("paths") or ())), None)
    if part == "model" and key is None and data.get("root", {}).get("type") == "ref":
        key = data["root"]["key"]
    if key is None:
        raise ValueError(f"{file} records no model {part}")

    class SafeReferences(serialization.PyrefPolicy):
        def allows_import(self, module: str, symbol: str) -> bool:
            return is_safe_reference(module, symbol)

        def allows_value(self, value: Any) -> bool:
            return True

    try:
        spec = serialization.Deserialization({**data, "root": {"type": "ref", "key": key}},
                                             pyref_policy=SafeReferences()).result
    except serialization.PyrefPolicyError as err:
        raise UntrustedContextError(
            f"{file} names {err.module}.{err.symbol}, which nemo-dmc does not build from a "
            "checkpoint (only NeMo's and nemo-dmc's Llama model and config classes); if you "
            f"trust this checkpoint, set {TRUST_ENV}=1 to let NeMo build it") from err
    drop_unexpected_params(spec)
    return spec


def _keep_recorded_behaviour(config: Any) -> None:
    """Give the ``dmc`` of an unbuilt ``DMCLlamaConfig`` the
    :data:`~nemo_dmc.core.config.LEGACY_DEFAULTS` of the settings it does not record (a
    context written before they existed keeps the behaviour it was trained with)."""
    dmc = getattr(config, "__arguments__", {}).get("dmc")
    if getattr(dmc, "__fn_or_cls__", None) is not DMCConfig:
        return
    for name, value in LEGACY_DEFAULTS.items():
        if name not in dmc.__arguments__:
            setattr(dmc, name, value)


def load_context_model(path: Path) -> Any:
    """The (unconfigured) NeMo ``GPTModel`` of a checkpoint's ``context/``, built with
    :func:`cpu_overrides` (only from safe references unless the user opted in)."""
    import fiddle as fdl
    from nemo.collections.llm.gpt.model.base import GPTModel
    from nemo.lightning import io

    context = Path(path) / NEMO_CONTEXT
    if not context.is_dir():
        raise FileNotFoundError(f"{context} not found: not a NeMo 2 checkpoint")
    if trusts_nemo_context():
        spec = io.load_context(context, subpath="model", build=False)
    else:
        spec = _context_part(path, "model")
    _keep_recorded_behaviour(spec.config)
    for key, value in cpu_overrides().items():
        setattr(spec.config, key, value)
    if getattr(spec, "tokenizer", None) is not None:
        # nemo-dmc reads tokenizers itself (find_tokenizer_path); building NeMo's would load
        # files named by the context, with options (trust_remote_code) it must not follow
        spec.tokenizer = None
    model = fdl.build(spec)
    if not isinstance(model, GPTModel):
        raise ValueError(f"{context} holds a {type(model).__name__}, not a NeMo GPTModel")
    return model


def read_context_config(path: Path) -> Any:
    """The NeMo model config (e.g. a ``LlamaConfig``) a checkpoint's ``context/`` records,
    built alone (no model, tokenizer or optimizer) with :func:`cpu_overrides`."""
    import fiddle as fdl

    if trusts_nemo_context():
        return load_context_model(path).config
    spec = _context_part(path, "config")
    _keep_recorded_behaviour(spec)
    for key, value in cpu_overrides().items():
        setattr(spec, key, value)
    return fdl.build(spec)


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
    config = read_context_config(path)
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
    except UntrustedContextError:
        raise
    except Exception as err:  # fiddle/NeMo raise many types for an unreadable context
        raise ValueError(f"cannot read the NeMo 2 model config in {path / NEMO_CONTEXT}: "
                         f"{err}") from err
