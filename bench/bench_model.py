"""Shared pieces of the inference benchmarks: a model whose DMC decision channel gives a
chosen compression ratio, and timing helpers.

Before a trained DMC model exists, a random-weight model is wired so that its decisions
follow a fixed table: for every (layer, KV head), a random (seeded) set of exactly
``round((1 - 1/CR) * vocab)`` token ids merges and the others append. The table is carried
by one embedding dimension per (layer, head), set to +A (merge) or -A (append); those
dimensions are removed from every attention/MLP output projection, so the residual stream
keeps them unchanged; and the key row of channel D-1 of that head reads only its dimension
with a large gain, so the decision logit ``k[D-1] - c`` is positive exactly for "merge"
tokens. The query rows of channel D-1 are zeroed (importance = sigmoid(c)). Channel D-1 is
zeroed before attention scores, so nothing else about the model changes. Random prompts
then give a realised ratio close to CR on every layer and head.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

from nemo_dmc.core import DMCConfig, ModelConfig
from nemo_dmc.megatron.model import build_model
from nemo_dmc.megatron.zero_out import decision_channel_rows

BENCH_SHAPE = ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=8,
                          num_query_groups=2, ffn_hidden_size=704, vocab_size=512,
                          seq_length=16384)
FLAG = 1.0   # embedding value of a decision-flag dimension
GAIN = 50.0  # weight of the key row of channel D-1 on its flag dimension


@dataclass
class BenchModels:
    """Random weights shared by a vanilla model (for megatron's static cache) and DMC models
    whose decision tables give each target ratio (``None`` key: DMC off, all decisions 0)."""

    vanilla: torch.nn.Module
    dmc: Dict[float, torch.nn.Module]


def _wire_decisions(model: torch.nn.Module, shape: ModelConfig, cr: float, seed: int) -> None:
    """Wire ``model`` (in place) so token t merges at (layer, head) per a Bernoulli table."""
    layers, heads, d = shape.num_layers, shape.kv_heads, shape.head_dim
    g = torch.Generator().manual_seed(seed)
    merging = round((1.0 - 1.0 / cr) * shape.vocab_size)  # exactly this many merge tokens
    ranks = torch.rand(shape.vocab_size, layers, heads, generator=g).argsort(dim=0).argsort(dim=0)
    merge = ranks < merging
    flags = torch.where(merge, FLAG, -FLAG)  # [vocab, layers, heads]
    group = shape.num_attention_heads // heads
    with torch.no_grad():
        embedding = model.embedding.word_embeddings.weight
        embedding[:flags.shape[0], :layers * heads] = flags.view(shape.vocab_size, -1)
        for layer_number, layer in enumerate(model.decoder.layers):
            attn = layer.self_attention
            attn.linear_proj.weight[:layers * heads] = 0
            layer.mlp.linear_fc2.weight[:layers * heads] = 0
            qkv = attn.linear_qkv.weight
            qkv[decision_channel_rows(heads, group, d)] = 0
            for h in range(heads):
                key_row = h * (group + 2) * d + group * d + d - 1
                qkv[key_row, layer_number * heads + h] = GAIN


def build_bench_models(ratios: List[float], shape: ModelConfig = BENCH_SHAPE,
                       window: int = 12, seed: int = 0, bf16: bool = False) -> BenchModels:
    """One vanilla model and one DMC model per target ratio, on the same base weights
    (built on CPU; ``bf16``: bf16 parameters, so the paged cache is bf16 too)."""
    torch.manual_seed(seed)
    vanilla = build_model(shape, method=None, bf16=bf16).eval()
    base = vanilla.state_dict()
    models = {}
    for cr in ratios:
        model = build_model(shape, DMCConfig(window=window), bf16=bf16).eval()
        model.load_state_dict(base)
        if cr > 1.0:
            _wire_decisions(model, shape, cr, seed + int(cr * 100))
        else:
            _wire_decisions(model, shape, 1.0, seed)  # flags all "append"
        models[cr] = model
    return BenchModels(vanilla=vanilla, dmc=models)


def merge_table(model: torch.nn.Module, shape: ModelConfig = BENCH_SHAPE) -> torch.Tensor:
    """``[vocab, layers, kv_heads]`` bool: where the wired model merges (read back)."""
    flags = model.embedding.word_embeddings.weight[:shape.vocab_size,
                                                   :shape.num_layers * shape.kv_heads]
    return (flags > 0).view(shape.vocab_size, shape.num_layers, shape.kv_heads)


def timed(fn: Callable[[], object], cuda: bool = False) -> Tuple[float, float]:
    """``(wall seconds, CPU seconds of this process)`` of one call (``cuda``: synchronised
    before and after, so the wall time covers the queued device work)."""
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def median(values: List[float]) -> float:
    return statistics.median(values)


def machine_line() -> str:
    load = os.getloadavg()
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)")
