"""GQA up-training baseline (Ainslie et al. 2023): mean-pool a checkpoint's KV heads into
fewer groups, then continue training it with plain attention.

    python -m nemo_dmc.convert.gqa --src <run | step_N | weights dir> --dst <dir> --groups N
    python -m nemo_dmc.train stage=pretrain checkpoint.pretrained=<dir> model.num_query_groups=N ...

megatron's fused ``linear_qkv`` weight ``[groups * (q_per_group + 2) * d, hidden]`` is laid
out per KV group as ``[q heads of the group | k | v]`` (``SelfAttention.
get_query_key_value_tensors``). A new group takes ``kv / groups`` consecutive old groups:
its K and V rows are their mean, its query heads are theirs in the same order, so the
global query-head order (and ``linear_proj``) is unchanged. The KV cache shrinks
``kv / groups`` times.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from nemo_dmc.core import ModelConfig

QKV_SUFFIXES = ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias")


def _pool_qkv(tensor: Tensor, config: ModelConfig, groups: int) -> Tensor:
    """Pool one fused qkv weight or bias (rows first) from ``config.kv_heads`` to ``groups``."""
    kv, d = config.kv_heads, config.head_dim
    per_group = config.num_attention_heads // kv
    merged = kv // groups
    tail = tensor.shape[1:]
    x = tensor.float().reshape(kv, per_group + 2, d, *tail)
    q = x[:, :per_group].reshape(groups, merged * per_group, d, *tail)
    k = x[:, per_group].reshape(groups, merged, d, *tail).mean(dim=1, keepdim=True)
    v = x[:, per_group + 1].reshape(groups, merged, d, *tail).mean(dim=1, keepdim=True)
    return torch.cat([q, k, v], dim=1).reshape(-1, *tail).to(tensor.dtype)


def mean_pool_kv_heads(state_dict: Dict[str, Tensor], model_config: ModelConfig,
                       groups: int) -> Tuple[Dict[str, Tensor], ModelConfig]:
    """Mean-pool the KV heads of a full (TP=1) megatron GPT state dict into ``groups``.

    Returns a new state dict (other entries shared, not copied) and the model config with
    ``num_query_groups=groups``. Raises ``ValueError`` if ``groups`` does not divide the KV
    heads or the state dict has no fused qkv weights of the expected size.
    """
    kv = model_config.kv_heads
    if groups < 1 or kv % groups:
        raise ValueError(f"groups={groups} must divide the checkpoint's {kv} KV heads "
                         f"(model.num_query_groups); choose one of "
                         f"{[g for g in range(1, kv + 1) if kv % g == 0]}")
    rows = (model_config.num_attention_heads + 2 * kv) * model_config.head_dim
    pooled = dict(state_dict)
    found = 0
    for name, tensor in state_dict.items():
        if not name.endswith(QKV_SUFFIXES):
            continue
        if tensor.shape[0] != rows:
            raise ValueError(f"{name} has {tensor.shape[0]} rows, expected {rows} for "
                             f"{model_config.num_attention_heads} heads / {kv} KV groups of dim "
                             f"{model_config.head_dim}: is this a full (TP=1) state dict of "
                             "this model shape?")
        pooled[name] = _pool_qkv(tensor, model_config, groups)
        found += 1
    if found < model_config.num_layers:
        raise ValueError(f"found {found} fused qkv weights (*.{QKV_SUFFIXES[0]}) for "
                         f"{model_config.num_layers} layers: not a megatron GPT state dict")
    return pooled, replace(model_config, num_query_groups=groups)


def _source_model_config(resolved) -> ModelConfig:
    recorded = resolved.recorded_model_config()
    if recorded is not None:
        return recorded
    raise ValueError(f"--src: {resolved.path} records no model shape (neither model_config.yaml "
                     "nor a training run's .hydra/config.yaml); convert it with "
                     "python -m nemo_dmc.convert first")


def convert(src: Path, dst: Path, groups: int) -> Tuple[Path, ModelConfig, ModelConfig]:
    """Pool checkpoint ``src`` into a weights checkpoint at ``dst`` (written atomically).

    Initialises and tears down a single-process megatron (TP=1). Returns
    ``(dst, source config, pooled config)``.
    """
    from nemo_dmc.checkpoints.resolve import load_weights, resolve_checkpoint
    from nemo_dmc.checkpoints.weights import save_weights_checkpoint
    from nemo_dmc.megatron import parallel
    from nemo_dmc.megatron.model import build_model
    from nemo_dmc.training.launch import local_rendezvous

    resolved = resolve_checkpoint(src, key="--src")
    source = _source_model_config(resolved)
    if groups < 1 or source.kv_heads % groups:  # fail before loading any weights
        mean_pool_kv_heads({}, source, groups)
    with local_rendezvous():  # a free port unless a launcher set one
        parallel.initialize(tensor_parallel_size=1, seed=0)
        try:
            model = build_model(source, method=None)
            load_weights(model, resolved)
            state, pooled_config = mean_pool_kv_heads(model.state_dict(), source, groups)
            pooled = build_model(pooled_config, method=None)
            pooled.load_state_dict(state)
            out = save_weights_checkpoint(pooled, pooled_config, Path(dst))
        finally:
            parallel.shutdown()
    return out, source, pooled_config


def main(argv: Optional[Sequence[str]] = None) -> int:
    from nemo_dmc.quiet import quiet_third_party

    quiet_third_party()
    parser = argparse.ArgumentParser(prog="python -m nemo_dmc.convert.gqa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, type=Path,
                        help="trainer run/stage/step_N directory or weights checkpoint")
    parser.add_argument("--dst", required=True, type=Path, help="output weights checkpoint")
    parser.add_argument("--groups", required=True, type=int, help="KV groups after pooling")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing, non-empty --dst")
    args = parser.parse_args(argv)
    from nemo_dmc.checkpoints.atomic import check_output

    try:
        check_output(args.dst, (args.src,), args.overwrite, flag="--dst")
        out, source, pooled = convert(args.src, args.dst, args.groups)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"[gqa] {source.kv_heads} -> {pooled.kv_heads} KV groups "
          f"({source.kv_heads // pooled.kv_heads}x smaller KV cache); wrote {out}. Continue "
          f"training with: python -m nemo_dmc.train stage=pretrain checkpoint.pretrained={out} "
          f"model.num_query_groups={pooled.kv_heads}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
