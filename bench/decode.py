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
       python bench/decode.py --device cuda --shape gpu --contexts 8192 --batches 8 16 \
           --ratios 4 --steps 10          # on a GPU: bf16, a 4-layer 7B-like shape (head dim 128)

``--device cuda`` moves the models and caches to the GPU (the paged engine then runs the
Triton kernels; megatron's static cache runs its unfused local-spec attention) and times
each step between CUDA synchronisations. ``--shape gpu`` (bf16 by default) is 4 layers of
a Llama-2-7B-like width with 8 KV heads, so at 8k context the KV reads are a large share of
each decode step, as on a real model; the default ``bench`` shape is the tiny CPU one.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from bench_model import BENCH_SHAPE, build_bench_models, machine_line, median, merge_table, timed
from nemo_dmc.core import ModelConfig
from nemo_dmc.inference import DMCModelRunner
from nemo_dmc.megatron import parallel
from nemo_dmc.megatron.cpu_shims import causal_attention_mask

BLOCK = 16
SHAPES = {"bench": BENCH_SHAPE,
          "gpu": ModelConfig(num_layers=4, hidden_size=4096, num_attention_heads=32,
                             num_query_groups=8, ffn_hidden_size=14336, vocab_size=32000,
                             seq_length=16384)}
SHAPE = BENCH_SHAPE  # set by main() from --shape


def _fill_synthetic(runner: DMCModelRunner, merges: torch.Tensor, context: int) -> None:
    """Write random states for ``context`` tokens per row, merging per ``merges [b, L, hk, s]``."""
    cache, (b, layers, hk, _) = runner.cache, merges.shape
    device = merges.device
    rows = torch.arange(b, device=device)
    d = runner.head_dim
    for start in range(0, context, 2048):
        c = min(2048, context - start)
        for layer in range(layers):
            states = torch.randn(b, hk, c, d, device=device)
            assert cache.commit(rows, layer, states, states, merges[:, layer, :, start:start + c],
                                torch.full((b,), c, device=device))
    cache.positions[rows] = context


def _engine_variant(model, force, prompts: torch.Tensor, fill: str, steps: int) -> Dict:
    b, context = prompts.shape
    layers, hk = SHAPE.num_layers, SHAPE.kv_heads
    if force == "append":
        merges = torch.zeros(b, layers, hk, context, dtype=torch.bool, device=prompts.device)
    else:
        merges = merge_table(model, SHAPE)[prompts].permute(0, 2, 3, 1)  # [b, L, hk, s]
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
        runner.decode(rows, torch.randint(0, SHAPE.vocab_size, (b,), generator=g))

    return {"step": step, "runner": runner}


def _megatron_variant(model, prompts: torch.Tensor, fill: str, steps: int) -> Dict:
    b, context = prompts.shape
    device = prompts.device
    ctx = StaticInferenceContext(b, context + steps + 1)
    with torch.no_grad():
        if fill == "prefill":
            model(prompts, torch.arange(context, device=device).expand(b, context),
                  causal_attention_mask(context, device),
                  inference_context=ctx, runtime_gather_output=True)
        else:
            model(prompts[:, :1], torch.zeros(b, 1, dtype=torch.long, device=device),
                  causal_attention_mask(1, device),
                  inference_context=ctx, runtime_gather_output=True)
            for keys, values in ctx.key_value_memory_dict.values():
                keys.normal_()
                values.normal_()
    ctx.sequence_len_offset = context
    ctx.enable_decode_mode()
    g = torch.Generator().manual_seed(1)

    def step() -> None:
        tokens = torch.randint(0, SHAPE.vocab_size, (b, 1), generator=g).to(device)
        with torch.no_grad():
            model(tokens, torch.full((b, 1), ctx.sequence_len_offset, device=device), None,
                  inference_context=ctx, runtime_gather_output=True)
        ctx.sequence_len_offset += 1

    return {"step": step}


def run_point(models, ratios: List[float], context: int, batch: int, steps: int, fill: str,
              megatron: bool) -> Dict[str, float]:
    """Median wall and CPU milliseconds per decode step of every variant, realised ratios."""
    device = models.vanilla.embedding.word_embeddings.weight.device
    prompts = torch.randint(0, SHAPE.vocab_size, (batch, context),
                            generator=torch.Generator().manual_seed(context + batch)).to(device)
    cuda = device.type == "cuda"
    variants: Dict[str, Dict] = {"off": _engine_variant(models.dmc[ratios[0]], "append", prompts,
                                                        fill, steps)}
    for cr in ratios:
        variants[f"cr{cr:g}"] = _engine_variant(models.dmc[cr], None, prompts, fill, steps)
    if megatron:
        variants["megatron"] = _megatron_variant(models.vanilla, prompts, fill, steps)
    times: Dict[str, List] = {k: [] for k in variants}
    for i in range(steps + 1):
        for name, v in variants.items():
            t = timed(v["step"], cuda)
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
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                        help="auto: cuda when available")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bench")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="auto: bfloat16 for --shape gpu, else float32")
    args = parser.parse_args()

    global SHAPE
    SHAPE = SHAPES[args.shape]
    device = torch.device("cuda" if args.device == "cuda" or (
        args.device == "auto" and torch.cuda.is_available()) else "cpu")
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and args.shape == "gpu")
    torch.set_num_threads(args.threads)
    parallel.initialize(tensor_parallel_size=1, seed=0)
    models = build_bench_models(args.ratios, SHAPE, bf16=bf16)
    models.vanilla.to(device)
    for model in models.dmc.values():
        model.to(device)
    s = SHAPE
    print(f"model: {s.num_layers} layers, hidden {s.hidden_size}, {s.num_attention_heads} heads / "
          f"{s.kv_heads} KV, head dim {s.head_dim}, vocab {s.vocab_size}, "
          f"{'bf16' if bf16 else 'fp32'}; DMC window 12; block {BLOCK}; fill {args.fill}; "
          f"median of {args.steps} interleaved steps; device "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
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
