"""Decode kernels: paged decode attention (Triton vs the PyTorch reference, DMC at CR r vs a
vanilla cache at CR 1 through the same kernel) and the fused decode cache update.

Per-head lengths at CR r are spread evenly over [0.5, 1.5] x context / r (mean context / r);
the vanilla cache holds the whole context in every head; at CR 1 a "torch SDPA (dense)" row
also times PyTorch's scaled_dot_product_attention over the same keys/values gathered once into
a contiguous [b, kv_heads, context, d] cache (a vanilla non-paged decode baseline; its
FlashAttention / memory-efficient backends on CUDA). "KV read" counts the key and value
bytes of the slots the attention reads (what a bandwidth-bound kernel moves). Triton rows run
only on CUDA; on CPU the reference rows run at small default sizes.

Usage:
    python bench/kernels_decode.py                  # CPU: references, context 2048, batch 4
    python bench/kernels_decode.py --gpu-sizes      # the issue's target: 8k context, batch 16,
                                                    # CR 4, page 16, 32 / 8 heads, dim 128, bf16
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch

from nemo_dmc.core import DMCConfig, rotate_half_rope
from nemo_dmc.kernels import references
from nemo_dmc.kvcache import ops

GPU_SIZES = dict(context=8192, batch=16, heads=32, kv_heads=8, head_dim=128, dtype="bfloat16")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _median_ms(fn: Callable[[], object], steps: int, cuda: bool) -> float:
    """Median milliseconds of ``fn`` over ``steps`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def _paged_cache(lengths: torch.Tensor, args, device) -> Dict[str, torch.Tensor]:
    """Pools holding exactly the blocks of ``lengths [b, hk]`` (shuffled) and block tables."""
    bs, dtype = args.block_size, DTYPES[args.dtype]
    blocks = -(-lengths // bs)
    n, m = int(blocks.sum()), int(blocks.max())
    ids = torch.randperm(n, device=device)
    tables = torch.full((*lengths.shape, m), -1, dtype=torch.int64, device=device)
    used = torch.arange(m, device=device) < blocks.unsqueeze(-1)
    tables[used] = ids
    pool = lambda: torch.randn(n, bs, args.head_dim, device=device).to(dtype)  # noqa: E731
    query = torch.randn(lengths.shape[0], args.heads, args.head_dim, device=device).to(dtype)
    return dict(query=query, key_pool=pool(), value_pool=pool(), block_tables=tables,
                lengths=lengths)


def _lengths(args, cr: float, device) -> torch.Tensor:
    shape = (args.batch, args.kv_heads)
    if cr == 1:
        return torch.full(shape, args.context, dtype=torch.int64, device=device)
    count = shape[0] * shape[1]  # evenly spread over [0.5, 1.5) x mean, shuffled
    spread = (torch.randperm(count, generator=torch.Generator().manual_seed(0)) + 0.5) / count
    mean = args.context / cr
    return (mean * (0.5 + spread)).round().clamp_min(1).long().view(shape).to(device)


def _dense_sdpa(cache: Dict[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
    """SDPA over the paged cache's keys/values copied once into contiguous ``[b, hk, s, d]``
    (every head full, as at CR 1); the returned function ignores the paged arguments."""
    tables, lengths = cache["block_tables"], cache["lengths"]
    s = int(lengths.max())
    bs = cache["key_pool"].shape[1]
    dense = [pool[tables.clamp_min(0)].flatten(2, 3)[:, :, :s].contiguous()
             for pool in (cache["key_pool"], cache["value_pool"])]  # [b, hk, s, d]
    query = cache["query"].unsqueeze(2)  # [b, h, 1, d]
    assert s <= tables.shape[-1] * bs

    def run(scale: float, **_) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(
            query, dense[0], dense[1], scale=scale, enable_gqa=True).squeeze(2)

    return run


def bench_attention(args, device, use_triton: bool) -> List[Dict]:
    """Rows for the reference (and Triton) attention at CR r and at CR 1."""
    rows, scale = [], args.head_dim ** -0.5
    element = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    for cr in (args.cr, 1.0):
        cache = _paged_cache(_lengths(args, cr, device), args, device)
        kv_bytes = int(cache["lengths"].sum()) * 2 * args.head_dim * element
        label = f"CR {cr:g}" if cr != 1 else "vanilla (CR 1)"
        impls = [("torch reference", references.paged_decode_attention)]
        if use_triton:
            from nemo_dmc.kernels.decode_attention import paged_decode_attention

            impls.insert(0, ("triton", paged_decode_attention))
            ref = references.paged_decode_attention(**cache, scale=scale)
            err = (paged_decode_attention(**cache, scale=scale).float() - ref.float()).abs().max()
            print(f"  {label}: triton vs reference max |diff| = {float(err):.2e}")
        if cr == 1:
            sdpa = _dense_sdpa(cache)
            impls.append(("torch SDPA (dense)", sdpa))
            ref = references.paged_decode_attention(**cache, scale=scale)
            err = (sdpa(scale=scale).float() - ref.float()).abs().max()
            print(f"  {label}: torch SDPA (dense) vs reference max |diff| = {float(err):.2e}")
        for name, fn in impls:
            ms = _median_ms(lambda: fn(**cache, scale=scale), args.steps, device.type == "cuda")
            rows.append(dict(kernel=f"decode attention, {name}", cache=label,
                             slots=float(cache["lengths"].float().mean()), kv_bytes=kv_bytes,
                             ms=ms))
    return rows


def bench_cache_update(args, device, use_triton: bool) -> List[Dict]:
    """Rows for the fused update and its reference (one layer, one decode token)."""
    b, hk, d, bs = args.batch, args.kv_heads, args.head_dim, args.block_size
    dtype, window = DTYPES[args.dtype], args.window
    steps = args.steps + 1
    lengths = _lengths(args, args.cr, device)
    cap = -(-(lengths + steps) // bs) + 1
    n = int(cap.sum())
    tables = torch.full((b, hk, int(cap.max())), -1, dtype=torch.int64, device=device)
    held = -(-lengths // bs)
    tables[torch.arange(tables.shape[-1], device=device) < held.unsqueeze(-1)] = \
        torch.arange(int(held.sum()), device=device)
    free_ids = torch.arange(int(held.sum()), n, device=device).flip(0)
    runs = torch.rand(b, hk, ops.run_entries(window), 2 * d + 1, device=device) + 0.1
    ring = torch.zeros(b, hk, dtype=torch.int64, device=device)
    pools = [torch.zeros(n, bs, d, dtype=dtype, device=device) for _ in range(2)]
    q = torch.randn(b, args.heads, d, device=device).to(dtype)
    k, v = (torch.randn(b, hk, d, device=device).to(dtype) for _ in range(2))
    positions = torch.full((b,), args.context, device=device)
    rows_ = torch.arange(b, device=device)
    tables_rope = ops.rope_tables(rotate_half_rope(), positions, d, dtype)
    config = DMCConfig(window=window)
    impls = [("torch reference", references.decode_cache_update)]
    if use_triton:
        from nemo_dmc.kernels.cache_update import decode_cache_update

        impls.insert(0, ("triton", decode_cache_update))
    out = []
    for name, fn in impls:
        state = [runs.clone(), ring.clone(), lengths.clone(), tables.clone()]
        free = references.FreeBlocks(free_ids, len(free_ids),
                                     torch.zeros(1, dtype=torch.int32, device=device))

        def step() -> None:
            fn(q, k, v, positions, rows_, *state, *pools, free, tables_rope, config, window)

        ms = _median_ms(step, args.steps, device.type == "cuda")
        # open runs read and written (fp32), the new k/v read, the slot's key and value written
        state_bytes = runs.numel() * 4 * 2 + 4 * b * hk * d * element_size(dtype)
        out.append(dict(kernel=f"cache update, {name}", cache=f"CR {args.cr:g}, W={window}",
                        slots=float(lengths.float().mean()), kv_bytes=state_bytes, ms=ms))
    return out


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _print(rows: List[Dict], args) -> None:
    print(f"\nbatch {args.batch}, context {args.context}, {args.heads} query / {args.kv_heads} KV "
          f"heads, head dim {args.head_dim}, page {args.block_size}, {args.dtype}")
    print("| kernel | cache | mean slots/head | bytes read | ms | GB/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mib, rate = r["kv_bytes"] / 2**20, r["kv_bytes"] / r["ms"] / 1e6
        print(f"| {r['kernel']} | {r['cache']} | {r['slots']:.0f} | {mib:.1f} MiB "
              f"| {r['ms']:.3f} | {rate:.1f} |")
    by = {(r["kernel"], r["cache"]): r for r in rows}
    sdpa = by.get(("decode attention, torch SDPA (dense)", "vanilla (CR 1)"))
    for impl in ("triton", "torch reference"):
        dmc = by.get((f"decode attention, {impl}", f"CR {args.cr:g}"))
        if dmc and sdpa:
            print(f"{impl} at CR {args.cr:g} vs torch SDPA over a dense vanilla cache: "
                  f"{sdpa['ms'] / dmc['ms']:.2f}x")
    for impl in ("triton", "torch reference"):
        dmc = by.get((f"decode attention, {impl}", f"CR {args.cr:g}"))
        van = by.get((f"decode attention, {impl}", "vanilla (CR 1)"))
        if dmc and van:
            print(f"{impl}: CR {args.cr:g} reads {dmc['kv_bytes'] / van['kv_bytes']:.3f} of the "
                  f"vanilla bytes and is {van['ms'] / dmc['ms']:.2f}x faster than vanilla "
                  "paged decode (same kernel at CR 1)")
    tri = by.get(("decode attention, triton", f"CR {args.cr:g}"))
    ref = by.get(("decode attention, torch reference", f"CR {args.cr:g}"))
    if tri and ref:
        print(f"triton vs torch reference at CR {args.cr:g}: {ref['ms'] / tri['ms']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-sizes", action="store_true", help=f"use {GPU_SIZES}")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--cr", type=float, default=4.0)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--window", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.gpu_sizes:
        for key, value in GPU_SIZES.items():
            setattr(args, key, value)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}"
          + ("" if cuda else " (no CUDA: Triton rows skipped)"))
    rows = bench_attention(args, device, cuda) + bench_cache_update(args, device, cuda)
    _print(rows, args)


if __name__ == "__main__":
    main()
