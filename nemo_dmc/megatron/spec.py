"""The layer-spec transform that puts a KV-compression method into a GPT/Llama layer spec."""

from __future__ import annotations

import copy
from typing import Any, Optional

from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from nemo_dmc.megatron.attention import BiasedCoreAttention, MethodSelfAttention


def method_layer_spec(base: ModuleSpec, method_settings: Any) -> ModuleSpec:
    """Return a copy of ``base`` whose self-attention runs the KV method of ``method_settings``
    (a settings dataclass of :mod:`nemo_dmc.methods`, e.g. :class:`~nemo_dmc.core.DMCConfig`).

    Swaps ``self_attention.module`` for :class:`MethodSelfAttention` (with the settings in
    its params; each layer builds its own method object from them) and
    ``self_attention.submodules.core_attention`` for :class:`BiasedCoreAttention`; the
    QKV/output projections (local or Transformer Engine) are kept as they are. ``base`` is
    not modified.
    """
    spec = copy.deepcopy(base)
    attention = getattr(spec.submodules, "self_attention", None)
    if not isinstance(attention, ModuleSpec) or not issubclass(attention.module, SelfAttention):
        found = getattr(attention, "module", attention)
        raise ValueError(f"a KV method needs a layer spec with a SelfAttention module, "
                         f"found {found!r}")
    attention.module = MethodSelfAttention
    attention.params = {**attention.params, "attn_mask_type": AttnMaskType.causal,
                        "method_settings": method_settings}
    attention.submodules.core_attention = ModuleSpec(module=BiasedCoreAttention)
    return spec


def llama_layer_spec(use_transformer_engine: Optional[bool] = None) -> ModuleSpec:
    """The vanilla Llama (RMSNorm, SwiGLU) layer spec: Transformer Engine when installed."""
    if use_transformer_engine is None:
        try:
            import transformer_engine  # noqa: F401
            use_transformer_engine = True
        except ImportError:
            use_transformer_engine = False
    if use_transformer_engine:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )
        return get_gpt_layer_with_transformer_engine_spec()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    return get_gpt_layer_local_spec(normalization="RMSNorm")
