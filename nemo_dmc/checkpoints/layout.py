"""Parameter names of the two megatron GPT layer-spec layouts: local (CPU) and Transformer Engine.

megatron-core's Transformer Engine spec (``nemo_dmc.megatron.spec.llama_layer_spec`` picks it
when ``transformer_engine`` is installed) fuses each pre-norm into the linear after it::

    local                                    Transformer Engine
    decoder.layers.N.input_layernorm.*       decoder.layers.N.self_attention.linear_qkv.layer_norm_*
    decoder.layers.N.pre_mlp_layernorm.*     decoder.layers.N.mlp.linear_fc1.layer_norm_*

All other names (``decoder.final_layernorm``, the linears) agree. TE modules carry fp8 metadata
in ``*._extra_state`` entries, some where local modules have none (``core_attention``).

dist_checkpointing checkpoints need no renaming: the local spec's
``sharded_state_dict_keys_map`` saves its norms under the TE names, so either layout loads
the other's. Plain state dicts (``.pt`` files, Hugging Face conversion) go through
:func:`match_layout` or :func:`to_local_names`.
"""

from __future__ import annotations

from typing import Iterable, Mapping, TypeVar

Value = TypeVar("Value")

LOCAL_TO_TE: dict[str, str] = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}
"""Name infixes, local -> Transformer Engine (megatron-core's ``get_gpt_layer_local_spec``
``sharded_state_dict_keys_map``)."""
TE_TO_LOCAL: dict[str, str] = {te: local for local, te in LOCAL_TO_TE.items()}
EXTRA_STATE_SUFFIX = "_extra_state"


def _rename(key: str, table: Mapping[str, str]) -> str:
    """``key`` with the first infix of ``table`` found at a name boundary replaced."""
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old):]
        head, found, tail = key.partition("." + old)
        if found:
            return f"{head}.{new}{tail}"
    return key


def _counterpart(key: str) -> str:
    """``key`` in the other layout (``key`` itself when it names no pre-norm)."""
    local = _rename(key, TE_TO_LOCAL)
    return local if local != key else _rename(key, LOCAL_TO_TE)


def to_local_names(state: Mapping[str, Value]) -> dict[str, Value]:
    """``state`` (either layout, full or TP-sharded) with local-spec norm names."""
    return {_rename(key, TE_TO_LOCAL): value for key, value in state.items()}


def match_layout(state: Mapping[str, Value], target_keys: Iterable[str]) -> dict[str, Value]:
    """``state`` (either layout, full or TP-sharded) renamed for a model whose ``state_dict()``
    has ``target_keys``: norm names as the target spells them, ``_extra_state`` entries the
    target lacks dropped. Other keys stay as they are, for ``load_state_dict`` to report.

    Raises:
        ValueError: ``state`` holds one norm under both layouts' names.
    """
    target = set(target_keys)
    out: dict[str, Value] = {}
    for key, value in state.items():
        if key not in target:
            other = _counterpart(key)
            if other in target:
                key = other
            elif key.endswith(EXTRA_STATE_SUFFIX):
                continue
        if key in out:
            raise ValueError(f"state dict holds {key!r} under both the local and the "
                             "Transformer Engine name: keep one of them")
        out[key] = value
    return out
