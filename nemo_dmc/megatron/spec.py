"""The layer-spec transform that turns a GPT/Llama layer spec into its DMC version."""

from __future__ import annotations

import copy
from typing import Optional

from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from nemo_dmc.core import DMCConfig
from nemo_dmc.megatron.attention import DMCCoreAttention, DMCSelfAttention


def dmc_layer_spec(base: ModuleSpec, dmc_config: Optional[DMCConfig] = None) -> ModuleSpec:
    """Return a copy of ``base`` whose self-attention is DMC.

    Swaps ``self_attention.module`` for :class:`DMCSelfAttention` (with ``dmc_config`` in
    its params) and ``self_attention.submodules.core_attention`` for
    :class:`DMCCoreAttention`; the QKV/output projections (local or Transformer Engine)
    are kept as they are. ``base`` is not modified.
    """
    spec = copy.deepcopy(base)
    attention = getattr(spec.submodules, "self_attention", None)
    if not isinstance(attention, ModuleSpec) or not issubclass(attention.module, SelfAttention):
        found = getattr(attention, "module", attention)
        raise ValueError(f"DMC needs a layer spec with a SelfAttention module, found {found!r}")
    attention.module = DMCSelfAttention
    attention.params = {**attention.params, "attn_mask_type": AttnMaskType.causal,
                        "dmc_config": dmc_config or DMCConfig()}
    attention.submodules.core_attention = ModuleSpec(module=DMCCoreAttention)
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
