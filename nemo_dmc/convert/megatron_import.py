"""Import Megatron-LM ``torch``-format checkpoints, such as NVIDIA's released DMC models
(``nvidia/Llama-2-{7,13}B-DMC-{4,8}x``), into megatron's full GPT state dict.

The layout, as written by the ``dmc`` branch of NVIDIA/Megatron-LM
(``megatron/training/checkpointing.py``: ``get_checkpoint_name``, ``read_metadata``,
``generate_state_dict``)::

    <root>/latest_checkpointed_iteration.txt     "<iteration>" or "release"
    <root>/iter_<7-digit iteration>/mp_rank_<TP rank, 2 digits>/model_optim_rng.pt
    <root>/release/mp_rank_NN/model_optim_rng.pt (pipeline parallelism: mp_rank_NN_PPP)

Each ``model_optim_rng.pt`` is a pickled dict: ``args`` (the run's ``argparse.Namespace``),
``checkpoint_version`` (3.0), ``iteration``, ``model`` (this rank's state dict) and,
unless stripped, ``optimizer``, ``opt_param_scheduler`` and ``rng_state`` (numpy arrays).

``model`` holds one of two naming schemes:

* megatron-core ``GPTModel`` (what ``pretrain_gpt_with_dmc.py`` trains; DMC replaces only
  the attention class, adding no parameters): ``embedding.word_embeddings.weight``,
  ``decoder.layers.N.{input_layernorm, self_attention.linear_qkv, self_attention.linear_proj,
  pre_mlp_layernorm, mlp.linear_fc1, mlp.linear_fc2}.weight``, ``decoder.final_layernorm.weight``,
  ``output_layer.weight``; with Transformer Engine the norms are ``linear_qkv.layer_norm_weight``
  / ``linear_fc1.layer_norm_weight`` and modules add ``*._extra_state`` (fp8 metadata, ignored).
* the legacy model (``megatron/legacy/model/language_model.py``, ``transformer.py``), nested
  ``language_model -> {embedding -> word_embeddings -> weight, encoder -> {layers.N.*,
  final_norm.weight}, output_layer -> weight}`` with ``input_norm``, ``self_attention.
  query_key_value``, ``self_attention.dense``, ``post_attention_norm``, ``mlp.dense_h_to_4h``,
  ``mlp.dense_4h_to_h`` (older releases: ``transformer`` for ``encoder``, ``input_layernorm``,
  ``post_attention_layernorm``, ``final_layernorm``).

Both fuse QKV per query group, ``[q_1 .. q_{heads/groups}, k, v]`` for each group (MHA: one
head per group), and give each TP rank whole groups, so concatenating the ranks on dim 0
restores the full layout; the SwiGLU ``fc1`` holds ``[gate_r; up_r]`` on rank r; row-parallel
weights join on dim 1; the vocabulary-parallel embedding and output layer on dim 0, padded
to ``args.padded_vocab_size`` (``tools/checkpoint/loader_megatron.py`` and
``loader_mcore.py`` merge the same way). The model shape and DMC settings come from ``args``
(``megatron/training/arguments.py``; the ``--dmc-*`` arguments of
``megatron/contrib/dmc/arguments.py``). Loading never runs pickled code unless asked:
see :func:`load_shard`.
"""

from __future__ import annotations

import argparse
import io
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from nemo_dmc.checkpoints.layout import EXTRA_STATE_SUFFIX, to_local_names
from nemo_dmc.checkpoints.safe_load import UnsafeCheckpointError, unpickling_reason
from nemo_dmc.checkpoints.sharding import join_shards
from nemo_dmc.convert.progress import ProgressFn, silent
from nemo_dmc.core import DMCConfig, ModelConfig

TRACKER_FILE = "latest_checkpointed_iteration.txt"
SHARD_FILE = "model_optim_rng.pt"
TRUST_FLAG = "--trust-pickle"

_LEGACY_PREFIXES = (("language_model.embedding.", "embedding."),
                    ("language_model.encoder.", "decoder."),
                    ("language_model.transformer.", "decoder."),
                    ("language_model.output_layer.", "output_layer."))
_LEGACY_INFIXES = ((".self_attention.query_key_value.", ".self_attention.linear_qkv."),
                   (".self_attention.dense.", ".self_attention.linear_proj."),
                   (".mlp.dense_h_to_4h.", ".mlp.linear_fc1."),
                   (".mlp.dense_4h_to_h.", ".mlp.linear_fc2."),
                   (".input_norm.", ".input_layernorm."),
                   (".post_attention_norm.", ".pre_mlp_layernorm."),
                   (".post_attention_layernorm.", ".pre_mlp_layernorm."),
                   ("decoder.final_norm.", "decoder.final_layernorm."))
"""Legacy-model names -> megatron-core local-spec names (applied in order)."""

PARTITION_DIMS = {"embedding.word_embeddings.weight": 0, "output_layer.weight": 0,
                  "self_attention.linear_qkv.weight": 0, "mlp.linear_fc1.weight": 0,
                  "self_attention.linear_proj.weight": 1, "mlp.linear_fc2.weight": 1}
"""Tensor-parallel split dim by name suffix; other tensors (norms) are replicated."""

_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")
_SKIPPED_SUFFIXES = (EXTRA_STATE_SUFFIX, "rotary_pos_emb.inv_freq")
"""Entries the import leaves out: fp8 metadata, and a RoPE buffer the model recomputes."""


def _safe_globals() -> list[Any]:
    """Harmless types a Megatron-LM checkpoint pickles: the args Namespace, the numpy RNG
    state, BytesIO (old Transformer Engine ``_extra_state``) and megatron's enums in args."""
    import numpy as np
    from megatron.core import enums
    from megatron.core.transformer import enums as transformer_enums

    reconstruct = np.zeros(1).__reduce__()[0]  # numpy's array unpickler; numpy 2 moved it
    found = [getattr(transformer_enums, name, None) for name in ("AttnBackend", "AttnMaskType")]
    return [argparse.Namespace, io.BytesIO, np.ndarray, np.dtype, enums.ModelType,
            *((reconstruct, f"{package}.multiarray._reconstruct")  # saved by numpy 1 or 2
              for package in ("numpy.core", "numpy._core")),
            *(e for e in found if e is not None)]


def load_shard(path: Path, trust_pickle: bool = False) -> dict[str, Any]:
    """One ``model_optim_rng.pt``, read with ``torch.load(weights_only=True)`` and
    :func:`_safe_globals` (or unrestricted with ``trust_pickle``).

    Raises:
        UnsafeCheckpointError: the file names another Python global (message names the file
            and :data:`TRUST_FLAG`).
        ValueError: the file is truncated, not a PyTorch checkpoint, or lacks ``model``/``args``.
    """
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a complete PyTorch checkpoint (no zip directory at its "
                         "end: truncated, or another kind of file): download or copy it again")
    try:
        if trust_pickle:
            shard = torch.load(path, map_location="cpu", weights_only=False)
        else:
            # only what is not safe already: leaving the context un-marks what it added,
            # and megatron.core marks some of these for the whole process at import
            known = torch.serialization.get_safe_globals()
            with torch.serialization.safe_globals([g for g in _safe_globals() if g not in known]):
                shard = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = unpickling_reason(err)
        if "GLOBAL" not in reason:
            raise ValueError(f"{path} is unreadable ({reason}): download or copy it "
                             "again") from None
        raise UnsafeCheckpointError(
            f"{path}: {reason}. The file names Python code outside the allow-list of types a "
            f"Megatron-LM checkpoint holds; if you trust where it came from, pass {TRUST_FLAG} "
            "to load it unrestricted (this runs whatever the file names)") from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, ModuleNotFoundError) as err:
        raise ValueError(f"{path} is unreadable ({type(err).__name__}: {err}): download or copy "
                         "it again") from None
    if not (isinstance(shard, dict) and isinstance(shard.get("model"), Mapping)
            and isinstance(shard.get("args"), argparse.Namespace)):
        held = sorted(shard) if isinstance(shard, dict) else type(shard).__name__
        raise ValueError(f"{path} is not a Megatron-LM checkpoint (a dict with 'model' and "
                         f"'args'; it holds {held})")
    return shard


def find_shards(root: Path) -> list[Path]:
    """The ``mp_rank_NN/model_optim_rng.pt`` files of a checkpoint, in rank order: ``root`` is
    the save directory (its tracker file names the iteration) or one ``iter_*``/``release``
    directory."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory (expected a Megatron-LM checkpoint "
                                f"with {TRACKER_FILE}, or its iter_*/ folder)")
    folder = root
    if (root / TRACKER_FILE).is_file():
        text = (root / TRACKER_FILE).read_text().strip()
        if not (text == "release" or text.isdigit()):
            raise ValueError(f"{root / TRACKER_FILE} holds {text!r}, not an iteration number "
                             "or 'release'")
        folder = root / ("release" if text == "release" else f"iter_{int(text):07d}")
    ranks = sorted(p for p in folder.glob("mp_rank_*") if p.is_dir())
    if not ranks:
        raise FileNotFoundError(f"no mp_rank_* folders in {folder} (expected a Megatron-LM "
                                f"torch-format checkpoint: {TRACKER_FILE} + iter_*/mp_rank_NN/)")
    names = [p.name for p in ranks]
    if any(re.fullmatch(r"mp_rank_\d{2}", n) is None for n in names):
        raise ValueError(f"{folder} holds {', '.join(names)}: pipeline- or expert-parallel "
                         "checkpoints are not supported (merge them with Megatron-LM's "
                         "tools/checkpoint to TP-only first)")
    expected = [f"mp_rank_{i:02d}" for i in range(len(names))]
    if names != expected:
        missing = sorted(set(expected) - set(names))
        raise FileNotFoundError(f"{folder}: tensor-parallel shard(s) {missing} missing")
    for rank in ranks:
        if not (rank / SHARD_FILE).is_file():
            raise FileNotFoundError(f"{rank / SHARD_FILE} is missing")
    return [rank / SHARD_FILE for rank in ranks]


def _arg(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value


def model_config_from_args(args: argparse.Namespace, source: Path,
                           vocab_size: Optional[int] = None) -> ModelConfig:
    """Our :class:`ModelConfig` from a run's stored ``args``; features nemo-dmc's Llama lacks
    raise ``ValueError`` naming the arg and ``source``. ``vocab_size``: the tokenizer's
    vocabulary (default ``args.padded_vocab_size``, padding rows kept)."""
    heads, hidden = args.num_attention_heads, args.hidden_size
    problems = []
    if not _arg(args, "swiglu", False):
        problems.append("swiglu=False (SwiGLU MLP expected)")
    if _arg(args, "add_bias_linear", not _arg(args, "disable_bias_linear", False)):
        problems.append("add_bias_linear=True (bias-free linears expected)")
    if _arg(args, "add_qkv_bias", False):
        problems.append("add_qkv_bias=True")
    if _arg(args, "normalization", "LayerNorm") != "RMSNorm":
        problems.append(f"normalization={_arg(args, 'normalization', 'LayerNorm')!r} "
                        "(RMSNorm expected)")
    rope = _arg(args, "position_embedding_type", "rope" if _arg(
        args, "use_rotary_position_embeddings", False) else "learned_absolute")
    if rope != "rope":
        problems.append(f"position_embedding_type={rope!r} (RoPE expected)")
    for name, expected in (("rotary_percent", 1.0), ("rotary_interleaved", False),
                           ("apply_layernorm_1p", False), ("qk_layernorm", False),
                           ("num_experts", None), ("pipeline_model_parallel_size", 1)):
        if getattr(args, name, expected) not in (expected, None):
            problems.append(f"{name}={getattr(args, name)!r} ({expected} expected)")
    if _arg(args, "kv_channels", hidden // heads) * heads != hidden:
        problems.append(f"kv_channels={args.kv_channels} != hidden_size / num_attention_heads")
    if problems:
        raise ValueError(f"{source}: unsupported model in the stored args: " + "; ".join(problems))
    groups = args.num_query_groups if _arg(args, "group_query_attention", False) else heads
    padded = args.padded_vocab_size
    if vocab_size is not None and not 0 < vocab_size <= padded:
        raise ValueError(f"--vocab-size {vocab_size} must be in 1..{padded} "
                         f"(args.padded_vocab_size of {source})")
    scaling = _arg(args, "rope_scaling_factor", 8.0) if _arg(args, "use_rope_scaling", False) \
        else None
    return ModelConfig(
        num_layers=args.num_layers, hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=groups, ffn_hidden_size=args.ffn_hidden_size,
        vocab_size=vocab_size or padded, seq_length=args.seq_length,
        rotary_base=float(_arg(args, "rotary_base", 10000)), rope_scaling_factor=scaling,
        norm_epsilon=float(_arg(args, "norm_epsilon", _arg(args, "layernorm_epsilon", 1e-5))),
        share_embeddings_and_output_weights=not _arg(
            args, "untie_embeddings_and_output_weights", False))


def dmc_settings_from_args(args: argparse.Namespace, source: Path) -> Optional[DMCConfig]:
    """The DMC settings of a run of the reference's ``dmc`` branch, from its ``--dmc-*``
    arguments: ``dmc_init_val`` -> ``init_offset``, ``dmc_window_size`` -> ``window``,
    ``dmc_temp`` -> ``temperature``, ``dmc_cr`` -> ``target_cr``; its compression loss is a
    per-sequence hinge (``loss_reduction="sequence"``) and it zeroes channel D-1 of q and k
    after RoPE as well (``zero_after_rope``). ``None`` for a run without them (a plain
    Megatron-LM model)."""
    if not any(name.startswith("dmc_") for name in vars(args)):
        return None
    try:
        return DMCConfig(init_offset=float(_arg(args, "dmc_init_val", 5.0)),
                         window=int(_arg(args, "dmc_window_size", 12)),
                         temperature=float(_arg(args, "dmc_temp", 0.1)),
                         target_cr=float(_arg(args, "dmc_cr", 4.0)),
                         loss_reduction="sequence", zero_after_rope=True)
    except ValueError as err:
        raise ValueError(f"{source}: the stored --dmc-* args give invalid DMC settings "
                         f"({err})") from None


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _mcore_name(name: str) -> str:
    """A legacy-model name as megatron-core spells it (other names unchanged)."""
    for old, new in _LEGACY_PREFIXES:
        if name.startswith(old):
            name = new + name[len(old):]
    for old, new in _LEGACY_INFIXES:
        name = name.replace(old, new)
    return name


def expected_shapes(model: ModelConfig, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    """Full (TP=1) shapes of every tensor of ``model`` in megatron-core local-spec names,
    the vocabulary padded to ``padded_vocab`` rows."""
    h, d, heads = model.hidden_size, model.head_dim, model.num_attention_heads
    qkv = (heads + 2 * model.kv_heads) * d
    shapes = {"embedding.word_embeddings.weight": (padded_vocab, h),
              "decoder.final_layernorm.weight": (h,)}
    if not model.share_embeddings_and_output_weights:
        shapes["output_layer.weight"] = (padded_vocab, h)
    for i in range(model.num_layers):
        layer = f"decoder.layers.{i}."
        shapes.update({layer + "input_layernorm.weight": (h,),
                       layer + "self_attention.linear_qkv.weight": (qkv, h),
                       layer + "self_attention.linear_proj.weight": (h, heads * d),
                       layer + "pre_mlp_layernorm.weight": (h,),
                       layer + "mlp.linear_fc1.weight": (2 * model.ffn_hidden_size, h),
                       layer + "mlp.linear_fc2.weight": (h, model.ffn_hidden_size)})
    return shapes


def _partition_dim(name: str) -> Optional[int]:
    return next((dim for suffix, dim in PARTITION_DIMS.items() if name.endswith(suffix)), None)


def shard_tensors(shard: Mapping[str, Any], source: Path, shapes: Mapping[str, tuple[int, ...]],
                  tp: int, args_note: str) -> dict[str, Tensor]:
    """One rank's ``model`` entry in local-spec names, every tensor checked against its
    ``shapes`` (full shapes, split by ``tp`` along the partition dim).

    Raises:
        ValueError: a tensor is missing, unknown, or of another shape than the args imply
            (``args_note`` names the args that fix the shapes).
    """
    state: dict[str, Tensor] = {}
    for name, value in _flatten(shard["model"]).items():
        if name.endswith(_SKIPPED_SUFFIXES):
            continue
        if not torch.is_tensor(value):
            raise ValueError(f"{source}: model entry {name!r} is a {type(value).__name__}, "
                             "not a tensor")
        state[_mcore_name(name)] = value
    state = to_local_names(state)  # Transformer Engine's fused norm names
    missing = sorted(set(shapes) - set(state))
    unknown = sorted(set(state) - set(shapes))
    if missing or unknown:
        raise ValueError(f"{source}: the tensors do not match the model its args describe "
                         f"({args_note}): missing {missing[:6]}, unknown {unknown[:6]}"
                         + ("; nemo-dmc imports bias-free Llama layers only" if unknown else ""))
    for name, tensor in state.items():
        expected = list(shapes[name])
        dim = _partition_dim(name)
        if dim is not None:
            expected[dim] //= tp
        if list(tensor.shape) != expected:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, but the "
                             f"args ({args_note}, tensor_model_parallel_size={tp}) imply "
                             f"{tuple(expected)} per rank")
    return state


@dataclass
class MegatronCheckpoint:
    """A merged Megatron-LM checkpoint: our model shape, DMC settings (``None`` for a plain
    model), the full state dict in megatron-core local-spec names, and where it came from."""

    model: ModelConfig
    dmc: Optional[DMCConfig]
    state: dict[str, Tensor]
    shards: list[Path]

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.state.values())


def load_megatron_checkpoint(root: Path, vocab_size: Optional[int] = None,
                             trust_pickle: bool = False,
                             progress: ProgressFn = silent) -> MegatronCheckpoint:
    """Read, check and merge every tensor-parallel shard of a Megatron-LM checkpoint (see the
    module docstring); the vocabulary trimmed to ``vocab_size`` rows, then zero-padded as
    :class:`ModelConfig` pads it. Errors name the file and what is wrong with it."""
    files = find_shards(root)
    first = load_shard(files[0], trust_pickle)
    args = first["args"]
    if first.get("checkpoint_version", 0.0) < 3.0:
        raise ValueError(f"{files[0]}: checkpoint_version={first.get('checkpoint_version')} "
                         "(< 3.0: an old QKV ordering); convert it with a Megatron-LM of its time")
    tp = _arg(args, "tensor_model_parallel_size", 1)
    if tp != len(files):
        raise ValueError(f"{files[0]}: args.tensor_model_parallel_size={tp}, but "
                         f"{files[0].parent.parent} holds {len(files)} mp_rank_* shard(s)")
    model = model_config_from_args(args, files[0], vocab_size)
    dmc = dmc_settings_from_args(args, files[0])
    shapes = expected_shapes(model, args.padded_vocab_size)
    note = (f"num_layers={model.num_layers}, hidden_size={model.hidden_size}, "
            f"num_attention_heads={model.num_attention_heads}, num_query_groups={model.kv_heads}, "
            f"ffn_hidden_size={model.ffn_hidden_size}, padded_vocab_size={args.padded_vocab_size}")
    ranks = [shard_tensors(first, files[0], shapes, tp, note)]
    del first  # its optimizer state, if any
    progress(f"read shard 1/{tp} {files[0].parent.name}")
    for rank, path in enumerate(files[1:], start=2):
        ranks.append(shard_tensors(load_shard(path, trust_pickle), path, shapes, tp, note))
        progress(f"read shard {rank}/{tp} {path.parent.name}")
    state: dict[str, Tensor] = {}
    for name in shapes:
        dim = _partition_dim(name)
        parts = [r.pop(name) for r in ranks]
        state[name] = parts[0] if dim is None else join_shards(name, parts, dim)
    rows = model.padded_vocab_size()
    for name in _VOCAB_ROWS:
        if name in state:
            kept = state[name][:model.vocab_size]
            state[name] = torch.cat([kept, kept.new_zeros(rows - len(kept), kept.shape[1])])
    return MegatronCheckpoint(model, dmc, state, files)
