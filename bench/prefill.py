"""Parallel prefill vs token-by-token prefill of one prompt (default 2048 tokens).

Token-by-token is what the reference implementation does: every prompt token goes through
the decode path (one forward per token, incremental cache update). Parallel prefill runs
the whole prompt (or chunks of it) in one forward per chunk and writes only the surviving
states. Both build the same cache (checked: equal per-head lengths and last-token logits).
Runs of the variants are interleaved; the median is reported.

Usage: python bench/prefill.py [--tokens 2048] [--cr 4] [--chunks 0 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
from typing import Dict, List, Optional

import torch

from bench_model import BENCH_SHAPE, build_bench_models, machine_line, median, timed
from nemo_dmc.inference import DMCModelRunner
from nemo_dmc.megatron import parallel


def _runner(model, tokens: int) -> DMCModelRunner:
    blocks = BENCH_SHAPE.num_layers * BENCH_SHAPE.kv_heads * (tokens // 16 + 1)
    return DMCModelRunner(model, block_size=16, num_blocks=blocks, max_sequences=1,
                          max_sequence_length=tokens)


def parallel_prefill(model, prompt: List[int], chunk: Optional[int]):
    runner = _runner(model, len(prompt))
    logits = runner.prefill([runner.cache.acquire_row()], [prompt], chunk_size=chunk)
    return logits[0], runner.cache.lengths[0]


def token_by_token(model, prompt: List[int]):
    runner = _runner(model, len(prompt))
    row = runner.cache.acquire_row()
    logits = runner.prefill([row], [prompt[:1]])  # the first token: a one-token "prefill"
    for token in prompt[1:]:
        logits = runner.decode([row], torch.tensor([token]))
    return logits[0], runner.cache.lengths[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--cr", type=float, default=4.0)
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 512],
                        help="parallel prefill chunk sizes (0 = whole prompt)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    parallel.initialize(tensor_parallel_size=1, seed=0)
    model = build_bench_models([args.cr]).dmc[args.cr]
    prompt = torch.randint(0, BENCH_SHAPE.vocab_size, (args.tokens,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    variants = {"token-by-token": lambda: token_by_token(model, prompt)}
    for chunk in args.chunks:
        variants[f"parallel (chunk {chunk or 'whole'})"] = (
            lambda c=chunk: parallel_prefill(model, prompt, c or None))
    reference = variants["token-by-token"]()
    for name, fn in variants.items():
        logits, lengths = fn()
        assert torch.equal(lengths, reference[1]), name
        torch.testing.assert_close(logits, reference[0], atol=1e-4, rtol=1e-4, msg=name)
    times: Dict[str, List] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    realised = args.tokens * reference[1].numel() / float(reference[1].sum())
    print(f"model: {BENCH_SHAPE.num_layers} layers, hidden {BENCH_SHAPE.hidden_size}, "
          f"{BENCH_SHAPE.num_attention_heads} heads / {BENCH_SHAPE.kv_heads} KV, fp32; "
          f"prompt {args.tokens} tokens; realised CR {realised:.2f}; median of {args.repeats}")
    print(machine_line())
    base = median([w for w, _ in times["token-by-token"]])
    base_cpu = median([c for _, c in times["token-by-token"]])
    print("| prefill | seconds (cpu s) | tokens/s | speed-up (cpu) |\n|---|---|---|---|")
    for name, values in times.items():
        wall, cpu = median([w for w, _ in values]), median([c for _, c in values])
        print(f"| {name} | {wall:.2f} ({cpu:.2f}) | {args.tokens / wall:.0f} | "
              f"{base / wall:.1f}x ({base_cpu / cpu:.1f}x) |")
    parallel.shutdown()


if __name__ == "__main__":
    main()
