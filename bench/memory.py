"""KV memory of DMC and the eviction methods vs the same engine with DMC off, and the
largest batch that fits a fixed KV budget.

1. KV bytes: the same prompts (real chunked prefill) in engines with DMC at each ratio, with
   each eviction method (``--evict``, same base weights, plain attention) at the same ratio,
   and with DMC off; allocated pool bytes (slots rounded up to whole blocks) and, separately,
   what is kept beside the pool: DMC's per-sequence open-run state (fp32 sums / window ring),
   eviction's per-slot position and mass (12 bytes a slot of the whole pool).
   Target: DMC bytes <= 1.1 / r x DMC-off bytes at realised ratio r.
2. Largest batch: a pool sized for ``--budget-seqs`` uncompressed sequences of ``--tokens``
   tokens; sequences of that length are prefilled one after another until one no longer
   fits. Target: >= 0.9 r x the DMC-off count.

Usage: python bench/memory.py [--tokens 2048] [--batch 4] [--budget-seqs 4] [--block 16]
                              [--evict h2o tova streaming]
"""

from __future__ import annotations

import argparse
from typing import Dict, List

import torch

from bench_model import BENCH_SHAPE, build_bench_models, machine_line
from nemo_dmc.core import DMCConfig
from nemo_dmc.inference import DMCModelRunner
from nemo_dmc.megatron import parallel
from nemo_dmc.megatron.model import build_model
from nemo_dmc.methods import settings_for


def eviction_model(base, name: str, ratio: float):
    """The bench model's base weights running eviction method ``name`` at ``ratio``."""
    model = build_model(BENCH_SHAPE, settings_for(name, DMCConfig(), ratio)).eval()
    model.load_state_dict(base.state_dict())
    return model


def _runner(model, force, blocks: int, rows: int, tokens: int, block: int) -> DMCModelRunner:
    return DMCModelRunner(model, block_size=block, num_blocks=blocks, max_sequences=rows,
                          max_sequence_length=tokens, force_decision=force)


def kv_bytes(model, force, prompts: List[List[int]], block: int, chunk: int):
    """``(memory report, bytes kept beside the pool for eviction)`` after the prompts."""
    tokens = len(prompts[0])
    heads = BENCH_SHAPE.num_layers * BENCH_SHAPE.kv_heads
    runner = _runner(model, force, len(prompts) * heads * (tokens // block + 1), len(prompts),
                     tokens, block)
    rows = [runner.cache.acquire_row() for _ in prompts]
    runner.prefill(rows, prompts, chunk_size=chunk)
    layout = runner.cache.layout
    report = runner.cache.memory()
    return report, report.allocated // layout.slot_bytes * layout.slot_score_bytes


def largest_batch(model, force, budget_blocks: int, tokens: int, block: int, chunk: int,
                  max_rows: int, seed: int = 0) -> Dict:
    runner = _runner(model, force, budget_blocks, max_rows, tokens, block)
    g = torch.Generator().manual_seed(seed)
    fitted: List[int] = []
    while runner.cache.num_free_rows:
        row = runner.cache.acquire_row()
        prompt = torch.randint(0, BENCH_SHAPE.vocab_size, (tokens,), generator=g).tolist()
        runner.prefill([row], [prompt], chunk_size=chunk, raise_on_overflow=False)
        if runner.cache.overflow:
            runner.cache.release_row(row)
            break
        fitted.append(row)
    if not runner.cache.num_free_rows:
        raise RuntimeError("raise max_rows: every row fitted")
    report = runner.cache.memory(fitted)
    return {"count": len(fitted), "report": report,
            "open_state_per_seq": runner.cache.layout.open_state_bytes_per_sequence}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4, help="prompts of the KV-bytes part")
    parser.add_argument("--budget-seqs", type=int, default=4)
    parser.add_argument("--ratios", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    parser.add_argument("--block", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--evict", nargs="*", default=["h2o", "tova", "streaming"],
                        help="eviction methods measured beside DMC at the same ratios")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    parallel.initialize(tensor_parallel_size=1, seed=0)
    models = build_bench_models(args.ratios)
    s = BENCH_SHAPE
    print(f"model: {s.num_layers} layers, {s.kv_heads} KV heads x head dim {s.head_dim}, fp32; "
          f"DMC window 12; block {args.block}; {args.tokens}-token prompts")
    print(machine_line())

    prompts = torch.randint(0, s.vocab_size, (args.batch, args.tokens),
                            generator=torch.Generator().manual_seed(1)).tolist()
    off, _ = kv_bytes(models.dmc[args.ratios[0]], "append", prompts, args.block, args.chunk)
    print(f"\nKV bytes, {args.batch} sequences: DMC off allocates {off.allocated / 2**20:.2f} MiB "
          f"(logical {off.logical / 2**20:.2f} MiB)")
    print("| method | target CR | realised r | allocated MiB | / DMC off | target 1.1/r | "
          "+ beside the pool MiB | (allocated + beside) / DMC off | block waste |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cr in args.ratios:
        runs = [("dmc", models.dmc[cr])] + [(name, eviction_model(models.vanilla, name, cr))
                                            for name in args.evict]
        for name, model in runs:
            rep, scores = kv_bytes(model, None, prompts, args.block, args.chunk)
            r, beside = rep.compression_ratio, rep.open_state + scores
            print(f"| {name} | {cr:g} | {r:.2f} | {rep.allocated / 2**20:.3f} | "
                  f"{rep.allocated / off.allocated:.3f} | {1.1 / r:.3f} | "
                  f"{beside / 2**20:.3f} | {(rep.allocated + beside) / off.allocated:.3f} | "
                  f"{rep.waste / rep.allocated:.1%} |", flush=True)

    heads = s.num_layers * s.kv_heads
    budget = args.budget_seqs * heads * -(-args.tokens // args.block)
    block_bytes = args.block * 2 * s.head_dim * 4
    rows = int(args.budget_seqs * max(args.ratios) * 1.3) + 2
    vanilla = largest_batch(models.dmc[args.ratios[0]], "append", budget, args.tokens, args.block,
                            args.chunk, rows)
    print(f"\nLargest batch of {args.tokens}-token sequences in {budget} blocks "
          f"({budget * block_bytes / 2**20:.1f} MiB): DMC off fits {vanilla['count']}")
    print("| method | target CR | realised r | sequences | / DMC off | target 0.9 r | "
          "sequences if open state counts against the budget |\n|---|---|---|---|---|---|---|")
    for cr in args.ratios:
        runs = [("dmc", models.dmc[cr])] + [(name, eviction_model(models.vanilla, name, cr))
                                            for name in args.evict]
        for name, model in runs:
            res = largest_batch(model, None, budget, args.tokens, args.block, args.chunk, rows)
            r = res["report"].compression_ratio
            per_seq = res["report"].allocated / res["count"] + res["open_state_per_seq"]
            with_open = int(budget * block_bytes // per_seq)
            print(f"| {name} | {cr:g} | {r:.2f} | {res['count']} | "
                  f"{res['count'] / vanilla['count']:.2f} | {0.9 * r:.2f} | "
                  f"{with_open} ({with_open / vanilla['count']:.2f}x) |", flush=True)
    parallel.shutdown()


if __name__ == "__main__":
    main()
