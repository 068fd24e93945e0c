"""Export megatron GPT weights to a Hugging Face Llama checkpoint (safetensors + config.json).

The inverse of :func:`nemo_dmc.convert.hf_import.hf_to_megatron`: un-fuse QKV per KV group
and SwiGLU ``fc1``, drop vocabulary padding. A model that was never retrofitted exports to a
plain Llama that stock ``LlamaForCausalLM`` loads.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from nemo_dmc.checkpoints.atomic import atomic_checkpoint_dir, is_rank0
from nemo_dmc.checkpoints.layout import to_local_names
from nemo_dmc.checkpoints.weights import SPECIAL_TOKEN_KEYS
from nemo_dmc.convert.progress import ProgressFn, silent
from nemo_dmc.core import ModelConfig
from nemo_dmc.convert.hf_import import ADAPTER_NAMES
from nemo_dmc.hf.remote_code import AUTO_MAP, write_remote_code
from nemo_dmc.methods import ADAPTER_MODULE, settings_to_dict


def megatron_to_hf(state: dict[str, Tensor], model: ModelConfig,
                   progress: ProgressFn = silent, adapters: Optional[bool] = None
                   ) -> dict[str, Tensor]:
    """Full (TP=1) megatron GPT state, local or Transformer Engine layer-spec names (see
    :mod:`nemo_dmc.checkpoints.layout`) -> HF Llama tensor names and layouts.

    ``adapters``: export the layers' decision adapters (``True``: required, ``False``: dropped,
    ``None``: those the state has)."""
    state = to_local_names(state)
    if adapters is None:
        adapters = any(f".{ADAPTER_MODULE}." in name for name in state)

    def take(name: str) -> Tensor:
        if name not in state:
            raise KeyError(f"tensor {name!r} missing from the megatron state")
        return state[name].detach().contiguous()

    d, groups = model.head_dim, model.kv_heads
    per_group = model.num_attention_heads // groups
    out = {"model.embed_tokens.weight": take("embedding.word_embeddings.weight")[:model.vocab_size],
           "model.norm.weight": take("decoder.final_layernorm.weight")}
    if not model.share_embeddings_and_output_weights:
        out["lm_head.weight"] = take("output_layer.weight")[:model.vocab_size]
    for i in range(model.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = take(src + "self_attention.linear_qkv.weight").view(groups, (per_group + 2) * d, -1)
        q, k, v = qkv.split([per_group * d, d, d], dim=1)
        out[dst + "self_attn.q_proj.weight"] = q.reshape(-1, qkv.shape[-1]).contiguous()
        out[dst + "self_attn.k_proj.weight"] = k.reshape(-1, qkv.shape[-1]).contiguous()
        out[dst + "self_attn.v_proj.weight"] = v.reshape(-1, qkv.shape[-1]).contiguous()
        out[dst + "self_attn.o_proj.weight"] = take(src + "self_attention.linear_proj.weight")
        out[dst + "input_layernorm.weight"] = take(src + "input_layernorm.weight")
        out[dst + "post_attention_layernorm.weight"] = take(src + "pre_mlp_layernorm.weight")
        gate, up = take(src + "mlp.linear_fc1.weight").chunk(2, dim=0)
        out[dst + "mlp.gate_proj.weight"] = gate.contiguous()
        out[dst + "mlp.up_proj.weight"] = up.contiguous()
        out[dst + "mlp.down_proj.weight"] = take(src + "mlp.linear_fc2.weight")
        for name, hf_name in ADAPTER_NAMES.items() if adapters else ():
            out[f"{dst}self_attn.{ADAPTER_MODULE}.{hf_name}"] = take(
                f"{src}self_attention.{ADAPTER_MODULE}.{name}")
        progress(f"converted layer {i + 1}/{model.num_layers}")
    return out


def special_token_ids(tokenizer: Any) -> dict[str, Optional[int]]:
    """bos/eos/pad ids of a :class:`nemo_dmc.data.tokenizer.Tokenizer` as exported (eos: its
    EOD token; pad: eos where it has none, see :func:`export_tokenizer`)."""
    hf = export_tokenizer(tokenizer)
    return {"bos_token_id": hf.bos_token_id, "eos_token_id": tokenizer.eod_id,
            "pad_token_id": hf.pad_token_id}


EXPORT_TOKENIZER_SETTINGS = {"model_input_names": ["input_ids", "attention_mask"],
                             "padding_side": "left"}
"""What the exported tokenizer returns and how it pads: exactly what ``model.generate(**tok(p,
return_tensors="pt", padding=True))`` takes, with left padding for batched generation."""


def export_tokenizer(tokenizer: Any) -> Any:
    """A copy of ``tokenizer``'s HF tokenizer as an export ships it: eos its EOD token, a pad
    token (eos where it has none) and :data:`EXPORT_TOKENIZER_SETTINGS`, saved with it."""
    hf = copy.deepcopy(tokenizer.hf_tokenizer)
    hf.eos_token = hf.convert_ids_to_tokens(tokenizer.eod_id)
    if hf.pad_token is None:
        hf.pad_token = hf.eos_token
    for key, value in EXPORT_TOKENIZER_SETTINGS.items():
        setattr(hf, key, value)
        hf.init_kwargs[key] = value  # what save_pretrained writes to tokenizer_config.json
    return hf


def llama_config(model: ModelConfig, dtype: torch.dtype = torch.float32,
                 method: Any = None,
                 special_tokens: Optional[dict[str, Any]] = None):
    """A transformers config with our model's shape: ``LlamaConfig``, or with ``method`` (a KV
    method's settings, e.g. :class:`~nemo_dmc.core.DMCConfig`) the ``DMCLlamaHFConfig``
    (``model_type: dmc_llama``) carrying them as ``kv_method``, with the ``auto_map`` of the
    modeling code an export bundles (:mod:`nemo_dmc.hf.remote_code`).

    ``special_tokens``: bos/eos/pad token ids (:data:`SPECIAL_TOKEN_KEYS`); unknown ones are
    written as ``null`` rather than ``LlamaConfig``'s defaults, which belong to no tokenizer.
    """
    from transformers import LlamaConfig

    rope_scaling = None
    if model.rope_scaling_factor is not None:
        rope_scaling = {"rope_type": "llama3", "factor": model.rope_scaling_factor,
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}
    extra: dict = {"architectures": ["LlamaForCausalLM"]}
    config_class = LlamaConfig
    if method is not None:
        from nemo_dmc.hf import DMCLlamaHFConfig

        config_class = DMCLlamaHFConfig
        extra = {"architectures": ["DMCLlamaForCausalLM"], "kv_method": settings_to_dict(method),
                 "auto_map": dict(AUTO_MAP)}
    return config_class(
        vocab_size=model.vocab_size, hidden_size=model.hidden_size,
        intermediate_size=model.ffn_hidden_size, num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_attention_heads, num_key_value_heads=model.kv_heads,
        max_position_embeddings=model.seq_length, rms_norm_eps=model.norm_epsilon,
        rope_theta=model.rotary_base, rope_scaling=rope_scaling,
        tie_word_embeddings=model.share_embeddings_and_output_weights,
        torch_dtype=str(dtype).removeprefix("torch."),
        **{key: (special_tokens or {}).get(key) for key in SPECIAL_TOKEN_KEYS}, **extra,
    )


def save_hf_checkpoint(state: dict[str, Tensor], model: ModelConfig, output: Path,
                       method: Any = None,
                       dtype: Optional[torch.dtype] = None, tokenizer: Any = None,
                       special_tokens: Optional[dict[str, Any]] = None,
                       progress: ProgressFn = silent) -> Path:
    """Write ``config.json``, ``generation_config.json``, ``model.safetensors``, the
    tokenizer's files and, for a KV method, its modeling code (``trust_remote_code=True``)
    atomically (temp dir, then rename).

    ``state`` is a full megatron state (:func:`nemo_dmc.checkpoints.sharding.gather_full_state`);
    ``method=None`` exports a plain Llama, else a ``dmc_llama`` checkpoint running that KV
    method (DMC, or e.g. H2O eviction); the decision adapters of ``state`` are exported for DMC
    with ``decision_source="adapter"`` only (required then). The bos/eos/pad ids
    come from ``tokenizer`` (a :class:`nemo_dmc.data.tokenizer.Tokenizer`, saved as
    :func:`export_tokenizer` makes it; load it with the checkpoint's recorded special tokens,
    ``load_tokenizer(path, special_tokens=...)``), else from ``special_tokens``.
    """
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    adapters = bool(getattr(method, "decision_source", None) == "adapter")
    hf_state = megatron_to_hf(state, model, progress, adapters=adapters)
    if dtype is not None:
        hf_state = {k: v.to(dtype) for k, v in hf_state.items()}
    if tokenizer is not None:
        special_tokens = special_token_ids(tokenizer)
    config = llama_config(model, dtype or torch.float32, method, special_tokens)
    with atomic_checkpoint_dir(output) as tmp:
        if is_rank0():
            config.save_pretrained(tmp)
            GenerationConfig.from_model_config(config).save_pretrained(tmp)
            if method is not None:  # trust_remote_code=True loads it without nemo_dmc
                write_remote_code(tmp)
            if tokenizer is not None:
                export_tokenizer(tokenizer).save_pretrained(str(tmp))
            progress(f"saving {len(hf_state)} tensors to {Path(output) / 'model.safetensors'}")
            save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    return Path(output)
