"""Import Hugging Face Llama-family checkpoints (safetensors directories or GGUF files).

Weights map onto megatron's GPT layout (TP=1 "full" names of the local layer spec;
:func:`nemo_dmc.checkpoints.layout.match_layout` renames them for a Transformer Engine
model); :mod:`nemo_dmc.checkpoints.sharding` cuts them for tensor parallelism. HF Llama already
stores q/k in rotate-half order, which is megatron's non-interleaved RoPE, so no permutation is
needed; transformers undoes llama.cpp's permutation when it reads a GGUF file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from nemo_dmc.checkpoints.weights import SPECIAL_TOKEN_KEYS
from nemo_dmc.convert.progress import ProgressFn, silent
from nemo_dmc.core import ModelConfig
from nemo_dmc.methods import ADAPTER_MODULE

ADAPTER_NAMES = {"norm_weight": "norm.weight", "linear.weight": "linear.weight",
                 "linear.bias": "linear.bias"}
"""A layer's decision-adapter tensors: megatron name (under ``self_attention.decision_adapter.``)
-> HF name (under ``self_attn.decision_adapter.``); the TP=1 layouts are the same."""

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "dmc_llama")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
"""Checkpoint tensors the import skips: buffers the model recomputes."""
# megatron's Llama-3.1 RoPE scaling has these values built in.
_MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}


@dataclass
class HFCheckpoint:
    """A loaded Hugging Face checkpoint: its config, our model shape and its tensors."""

    hf_config: Any
    model: ModelConfig
    state: dict[str, Tensor]

    @property
    def special_tokens(self) -> dict[str, Any]:
        """The config's bos/eos/pad token ids (``None`` where unset)."""
        return {key: getattr(self.hf_config, key, None) for key in SPECIAL_TOKEN_KEYS}

    @property
    def num_parameters(self) -> int:
        """Parameters of the model, a tied output layer counted once (with the embedding)."""
        tied = self.model.share_embeddings_and_output_weights
        return sum(t.numel() for name, t in self.state.items()
                   if not (tied and name == "lm_head.weight")
                   and not name.endswith(IGNORED_SUFFIXES))


def _rope_settings(cfg: Any) -> tuple[float, Optional[float]]:
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None)) or 10000.0
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type == "llama3":
        for key, expected in _MEGATRON_LLAMA3_ROPE.items():
            if float(params.get(key, expected)) != expected:
                raise ValueError(f"rope_parameters.{key}={params[key]} is not supported "
                                 f"(megatron's Llama-3.1 scaling fixes it to {expected})")
        return float(theta), float(params.get("factor", 8.0))
    raise ValueError(f"RoPE type {rope_type!r} is not supported (only default and llama3)")


def model_config_from_hf(cfg: Any) -> ModelConfig:
    """Our :class:`ModelConfig` for a transformers config; unsupported features raise."""
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported architecture model_type={model_type!r}: nemo-dmc imports "
                         f"Llama-family decoders ({', '.join(SUPPORTED_MODEL_TYPES)})")
    problems = []
    if getattr(cfg, "sliding_window", None):
        problems.append(f"sliding_window={cfg.sliding_window} (sliding-window attention)")
    if getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None):
        problems.append("mixture-of-experts layers")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        problems.append("linear-layer biases (attention_bias / mlp_bias)")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg.hidden_act!r} (SwiGLU with silu expected)")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if head_dim * cfg.num_attention_heads != cfg.hidden_size:
        problems.append(f"head_dim={head_dim} != hidden_size / num_attention_heads")
    if problems:
        raise ValueError(f"unsupported {model_type} checkpoint: " + "; ".join(problems))
    theta, scaling = _rope_settings(cfg)
    return ModelConfig(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        ffn_hidden_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        seq_length=getattr(cfg, "max_position_embeddings", None) or 4096,
        rotary_base=theta,
        rope_scaling_factor=scaling,
        norm_epsilon=cfg.rms_norm_eps,
        share_embeddings_and_output_weights=bool(getattr(cfg, "tie_word_embeddings", False)),
    )


def hf_to_megatron(state: dict[str, Tensor], model: ModelConfig,
                   tensor_parallel_size: int = 1, progress: ProgressFn = silent
                   ) -> dict[str, Tensor]:
    """Rename and fuse HF Llama tensors into megatron's full GPT state dict.

    QKV is fused per KV group, ``[q_g0 .. q_g(G-1), k_g, v_g]`` for each group ``g``; gate
    and up projections become ``linear_fc1 = [gate; up]``; embeddings and the output layer
    are zero-padded to the padded vocabulary. Decision adapters of a ``dmc_llama`` export
    (``model.layers.N.self_attn.decision_adapter.*``) map back to megatron's names.

    Raises:
        KeyError: a tensor the config implies is missing.
        ValueError: a tensor's shape differs from what the config implies, or ``state``
            holds tensors the conversion does not use (other than :data:`IGNORED_SUFFIXES`).
    """
    consumed: set[str] = set()

    def check(name: str, *shape: int) -> None:
        if name not in state:
            raise KeyError(f"tensor {name!r} missing from the checkpoint")
        if tuple(state[name].shape) != shape:
            raise ValueError(f"shape mismatch for tensor {name!r}: the config implies {shape}, "
                             f"the checkpoint has {tuple(state[name].shape)}")
        consumed.add(name)

    def take(name: str, *shape: int) -> Tensor:
        check(name, *shape)
        return state[name].float()

    vocab = model.padded_vocab_size(tensor_parallel_size)
    h, d, groups = model.hidden_size, model.head_dim, model.kv_heads
    per_group = model.num_attention_heads // groups
    ffn, rows, q_rows = model.ffn_hidden_size, model.vocab_size, model.num_attention_heads * d

    def pad_vocab(t: Tensor) -> Tensor:
        return torch.cat([t, t.new_zeros(vocab - t.shape[0], t.shape[1])])

    embedding = take("model.embed_tokens.weight", rows, h)
    out = {"embedding.word_embeddings.weight": pad_vocab(embedding),
           "decoder.final_layernorm.weight": take("model.norm.weight", h)}
    if not model.share_embeddings_and_output_weights:
        out["output_layer.weight"] = pad_vocab(take("lm_head.weight", rows, h))
    elif "lm_head.weight" in state:  # tied: a copy of the embedding (e.g. transformers' GGUF load)
        check("lm_head.weight", rows, h)
    for i in range(model.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        q = take(src + "self_attn.q_proj.weight", q_rows, h)
        k = take(src + "self_attn.k_proj.weight", groups * d, h)
        v = take(src + "self_attn.v_proj.weight", groups * d, h)
        qkv = [q.view(groups, per_group * d, h), k.view(groups, d, h), v.view(groups, d, h)]
        out[dst + "self_attention.linear_qkv.weight"] = torch.cat(qkv, 1).flatten(0, 1)
        out[dst + "self_attention.linear_proj.weight"] = take(src + "self_attn.o_proj.weight",
                                                              h, q_rows)
        out[dst + "input_layernorm.weight"] = take(src + "input_layernorm.weight", h)
        out[dst + "pre_mlp_layernorm.weight"] = take(src + "post_attention_layernorm.weight", h)
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([take(src + "mlp.gate_proj.weight", ffn, h),
                                                         take(src + "mlp.up_proj.weight", ffn, h)])
        out[dst + "mlp.linear_fc2.weight"] = take(src + "mlp.down_proj.weight", h, ffn)
        adapter = f"{src}self_attn.{ADAPTER_MODULE}."
        if adapter + "linear.weight" in state:
            signals = state[adapter + "linear.weight"].shape[0]  # KV heads x signals per head
            if signals % groups:
                raise ValueError(f"tensor {adapter}linear.weight has {signals} rows, not a "
                                 f"multiple of the {groups} KV heads")
            for name, hf_name in ADAPTER_NAMES.items():
                shape = (signals, h) if name == "linear.weight" else \
                    (signals,) if name == "linear.bias" else (h,)
                out[f"{dst}self_attention.{ADAPTER_MODULE}.{name}"] = take(adapter + hf_name,
                                                                           *shape)
        progress(f"converted layer {i + 1}/{model.num_layers}")
    unknown = sorted(n for n in state if n not in consumed and not n.endswith(IGNORED_SUFFIXES))
    if unknown:
        more = f" (and {len(unknown) - 8} more)" if len(unknown) > 8 else ""
        shown = ", ".join(unknown[:8]) + more
        raise ValueError(f"unknown keys in checkpoint: {shown}; nemo-dmc imports bias-free Llama "
                         "layers only")
    return out


INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER = 100_000_000  # safetensors' own limit on a header's size


def _safetensors_problem(file: Path) -> str:
    """Why safetensors could not read ``file``: truncated (shorter than its header says) or
    not a safetensors file at all."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little")
        if len(head) < 8 or size < 8 + length <= 8 + _MAX_HEADER:
            return f"{file} is truncated ({size} bytes, its header is incomplete)"
        header = handle.read(length) if length <= _MAX_HEADER else b""
    try:
        expected = 8 + length + max((int(entry["data_offsets"][1]) for key, entry
                                     in json.loads(header).items() if key != "__metadata__"),
                                    default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return f"{file} is not a safetensors file (its header is not valid)"
    if size < expected:
        return f"{file} is truncated ({size} of {expected} bytes)"
    return f"{file} is not a valid safetensors file"


def _load_safetensors(file: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except SafetensorError as err:
        raise ValueError(f"{_safetensors_problem(file)}: download or copy it again "
                         f"(safetensors: {err})") from None


def _read_index(folder: Path) -> Optional[dict[str, str]]:
    """The tensor -> file map of ``model.safetensors.index.json`` in ``folder``, or ``None``.
    Every file it names must be a plain file name present in ``folder``."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = set(weight_map.values())
    except (ValueError, KeyError, TypeError, AttributeError):
        weight_map = None
    if weight_map is None or not all(isinstance(name, str) for name in names):
        raise ValueError(f"{index} is not a safetensors index (a JSON weight_map of tensor "
                         "names to shard files): fix or remove it")
    for name in sorted(names):
        if Path(name).name != name or name in (".", ".."):
            raise ValueError(f"{index} names {name!r}, not a file in {folder}: fix the index")
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} is missing: {index} maps tensors to it "
                                    "(download the missing shard)")
    return weight_map


def load_safetensors_dir(folder: Path, progress: ProgressFn = silent) -> dict[str, Tensor]:
    """Every tensor of a HF safetensors folder.

    With ``model.safetensors.index.json``, exactly the shards it names are read, each tensor
    must come from the shard the index gives, and every indexed tensor must be found; without
    one, every ``*.safetensors`` file is read. A tensor name in two files is refused.

    Raises:
        FileNotFoundError: no shards, or a shard the index names is missing.
        ValueError: a truncated or corrupt shard, a tensor in two files, or a shard that
            disagrees with the index (names both files, or the index and the shard).
    """
    weight_map = _read_index(folder)
    if weight_map is None:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {folder}")
    else:
        files = [folder / name for name in sorted(set(weight_map.values()))]
        ignored = sorted(set(folder.glob("*.safetensors")) - set(files))
        if ignored:
            progress(f"ignoring {', '.join(f.name for f in ignored)} (not in {INDEX_FILE})")
    state: dict[str, Tensor] = {}
    source: dict[str, Path] = {}
    for i, file in enumerate(files):
        for name, tensor in _load_safetensors(file).items():
            if name in source:
                raise ValueError(f"tensor {name!r} is in both {source[name]} and {file}: remove "
                                 "the stale file (or add a model.safetensors.index.json)")
            if weight_map is not None and weight_map.get(name) != file.name:
                where = (f"maps it to {weight_map[name]}" if name in weight_map
                         else "does not list it")
                raise ValueError(f"tensor {name!r} is in {file}, but {folder / INDEX_FILE} "
                                 f"{where}: the shards and the index disagree")
            state[name], source[name] = tensor, file
        progress(f"read shard {i + 1}/{len(files)} {file.name}")
    missing = sorted(set(weight_map or ()) - set(state))
    if missing:
        more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
        raise ValueError(f"{folder / INDEX_FILE} lists tensors no shard holds: "
                         f"{', '.join(missing[:8])}{more}")
    return state


def _check_gguf(path: Path) -> None:
    """Read ``path``'s GGUF header and tensor table, so that a truncated or corrupt file stops
    with a message saying so (rather than an error from deep inside the loader)."""
    from gguf import GGUFReader

    class _Truncated(Exception):
        """A read past the end of the file."""

    class _CheckedReader(GGUFReader):  # every read of the GGUF reader goes through _get
        def _get(self, offset, dtype, count=1, override_order=None):  # type: ignore[override]
            end = int(offset) + int(np.dtype(dtype).itemsize) * int(count)
            if end > len(self.data):
                raise _Truncated(end)
            return super()._get(offset, dtype, count, override_order)

    size = path.stat().st_size
    try:
        if size == 0:
            raise _Truncated(4)
        _CheckedReader(path)
    except _Truncated as cut:
        raise ValueError(f"{path} is truncated ({size} bytes, its contents need at least "
                         f"{cut.args[0]}): download or copy it again") from None
    except (ValueError, KeyError, IndexError, OverflowError) as err:
        raise ValueError(f"{path} is not a valid GGUF file ({err}): check that it is the "
                         "model's .gguf, or download it again") from None


def load_hf_checkpoint(path: str | Path, progress: ProgressFn = silent) -> HFCheckpoint:
    """Load a HF checkpoint directory (config.json + safetensors, see
    :func:`load_safetensors_dir`) or a ``.gguf`` file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".gguf":
        from transformers import AutoModelForCausalLM

        _check_gguf(path)
        progress(f"reading {path.name} with transformers' GGUF loader")
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                  dtype=torch.float32)
        state = {k: v.detach() for k, v in hf.state_dict().items()}
        return HFCheckpoint(hf.config, model_config_from_hf(hf.config), state)
    from transformers import AutoConfig

    import nemo_dmc.hf  # noqa: F401  (registers model_type dmc_llama)

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is neither a .gguf file nor a directory with config.json")
    cfg = AutoConfig.from_pretrained(path)
    state = load_safetensors_dir(path, progress)
    return HFCheckpoint(cfg, model_config_from_hf(cfg), state)
