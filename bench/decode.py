"""Decode throughput: DMC at CR 2/4/8 vs the same engine with DMC off vs megatron-core's
static KV cache, over context lengths and batch sizes.

All variants share the base weights of :mod:`bench_model` (DMC variants differ only in their
wired decision tables). For each (context, batch) every variant's cache is filled to the
context, then decode steps of the variants are interleaved and the median step time is
reported (wall clock, and in parentheses the process CPU time, which other users of a
shared machine disturb less). Tokens/s = batch / step time, so the "vs" columns are
throughput ratios. ``--fill synthetic`` (default) writes random states straight into the paged cache
with the per-head lengths the model's decisions give for random prompts (megatron's cache
gets random keys/values); ``--fill prefill`` runs the real chunked prefill instead (slow at
long contexts).

Usage: python bench/decode.py [--contexts 1024 2048 ...] [--batches 1 4 8 16] [--steps 7]
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from bench_model import BENCH_SHAPE, build_bench_models, machine_line, median, merge_table, timed
from nemo_dmc.inference import DMCModelRunner
from nemo_dmc.megatron import parallel
from nemo_dmc.megatron.cpu_shims import causal_attention_mask

BLOCK = 16


def _fill_synthetic(runner: DMCModelRunner, merges: torch.Tensor, context: int) -> None:
    """Write random states for ``context`` tokens per row, merging per ``merges [b, L, hk, s]``."""
    cache, (b, layers, hk, _) = runner.cache, merges.shape
    rows = torch.arange(b)
    d = runner.head_dim
    for start in range(0, context, 2048):
        c = min(2048, context - start)
        for layer in range(layers):
            states = torch.randn(b, hk, c, d)
            assert cache.commit(rows, layer, states, states, merges[:, layer, :, start:start + c],
                                torch.full((b,), c))
    cache.positions[rows] = context


def _engine_variant(model, force, prompts: torch.Tensor, fill: str, steps: int) -> Dict:
    b, context = prompts.shape
    layers, hk = BENCH_SHAPE.num_layers, BENCH_SHAPE.kv_heads
    if force == "append":
        merges = torch.zeros(b, layers, hk, context, dtype=torch.bool)
    else:
        merges = merge_table(model)[prompts].permute(0, 2, 3, 1)  # [b, L, hk, s]
    merges[..., 0] = False
    lengths = context - merges.sum(-1)
    blocks = int(((lengths + steps + BLOCK) // BLOCK).sum()) + b * layers * hk
    runner = DMCModelRunner(model, block_size=BLOCK, num_blocks=blocks, max_sequences=b,
                            max_sequence_length=context + steps + 1, force_decision=force)
    rows = [runner.cache.acquire_row() for _ in range(b)]
    if fill == "prefill":
        runner.prefill(rows, prompts.tolist(), chunk_size=512)
    else:
        _fill_synthetic(runner, merges.float(), context)
    g = torch.Generator().manual_seed(1)

    def step() -> None:
        runner.decode(rows, torch.randint(0, BENCH_SHAPE.vocab_size, (b,), generator=g))

    return {"step": step, "runner": runner}


def _megatron_variant(model, prompts: torch.Tensor, fill: str, steps: int) -> Dict:
    b, context = prompts.shape
    ctx = StaticInferenceContext(b, context + steps + 1)
    with torch.no_grad():
        if fill == "prefill":
            model(prompts, torch.arange(context).expand(b, context), causal_attention_mask(context),
                  inference_context=ctx, runtime_gather_output=True)
        else:
            model(prompts[:, :1], torch.zeros(b, 1, dtype=torch.long), causal_attention_mask(1),
                  inference_context=ctx, runtime_gather_output=True)
            for keys, values in ctx.key_value_memory_dict.values():
                keys.normal_()
                values.normal_()
    ctx.sequence_len_offset = context
    ctx.enable_decode_mode()
    g = torch.Generator().manual_seed(1)

    def step() -> None:
        tokens = torch.randint(0, BENCH_SHAPE.vocab_size, (b, 1), generator=g)
        with torch.no_grad():
            model(tokens, torch.full((b, 1), ctx.sequence_len_offset), None,
                  inference_context=ctx, runtime_gather_output=True)
        ctx.sequence_len_offset += 1

    return {"step": step}


def run_point(models, ratios: List[float], context: int, batch: int, steps: int, fill: str,
              megatron: bool) -> Dict[str, float]:
    """Median wall and CPU milliseconds per decode step of every variant, realised ratios."""
    prompts = torch.randint(0, BENCH_SHAPE.vocab_size, (batch, context),
                            generator=torch.Generator().manual_seed(context + batch))
    variants: Dict[str, Dict] = {"off": _engine_variant(models.dmc[ratios[0]], "append", prompts,
                                                        fill, steps)}
    for cr in ratios:
        variants[f"cr{cr:g}"] = _engine_variant(models.dmc[cr], None, prompts, fill, steps)
    if megatron:
        variants["megatron"] = _megatron_variant(models.vanilla, prompts, fill, steps)
    times: Dict[str, List] = {k: [] for k in variants}
    for i in range(steps + 1):
        for name, v in variants.items():
            t = timed(v["step"])
            if i:  # the first step of each variant is a warm-up
                times[name].append(t)
    result = {}
    for name, values in times.items():
        result[f"{name}_ms"] = 1000 * median([w for w, _ in values])
        result[f"{name}_cpu_ms"] = 1000 * median([c for _, c in values])
    for cr in ratios:
        cache = variants[f"cr{cr:g}"]["runner"].cache
        result[f"cr{cr:g}_realised"] = cache.memory().compression_ratio
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--ratios", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--fill", choices=["synthetic", "prefill"], default="synthetic")
    parser.add_argument("--no-megatron", action="store_true", help="skip megatron's static cache")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    parallel.initialize(tensor_parallel_size=1, seed=0)
    models = build_bench_models(args.ratios)
    s = BENCH_SHAPE
    print(f"model: {s.num_layers} layers, hidden {s.hidden_size}, {s.num_attention_heads} heads / "
          f"{s.kv_heads} KV, head dim {s.head_dim}, vocab {s.vocab_size}, fp32; DMC window 12; "
          f"block {BLOCK}; fill {args.fill}; median of {args.steps} interleaved steps")
    print(machine_line())
    cols = ["megatron"] * (not args.no_megatron) + ["off"] + [f"cr{r:g}" for r in args.ratios]
    header = ["context", "batch"] + [f"{c} ms (cpu ms)" for c in cols]
    for r in args.ratios:
        header += [f"CR{r:g} realised", f"CR{r:g} vs off"]
        header += [] if args.no_megatron else [f"CR{r:g} vs megatron"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for context in args.contexts:
        for batch in args.batches:
            r = run_point(models, args.ratios, context, batch, args.steps, args.fill,
                          not args.no_megatron)
            cells = [f"{r[f'{c}_ms']:.1f} ({r[f'{c}_cpu_ms']:.1f})" for c in cols]
            for cr in args.ratios:
                key = f"cr{cr:g}"
                cells.append(f"{r[f'{key}_realised']:.2f}")
                for base in ["off"] + ([] if args.no_megatron else ["megatron"]):
                    cells.append(f"{r[f'{base}_ms'] / r[f'{key}_ms']:.2f}x "
                                 f"({r[f'{base}_cpu_ms'] / r[f'{key}_cpu_ms']:.2f}x)")
            print(f"| {context} | {batch} | " + " | ".join(cells) + " |", flush=True)
    print(machine_line())
    parallel.shutdown()


if __name__ == "__main__":
    sys.exit(main())
