"""Training kernels: forward + backward time (and CUDA peak memory) of one attention layer's
DMC work vs vanilla causal attention.

Variants (all on the same random q/k/v ``[b, h, s, d]``, GQA with ``--kv-heads``):
  vanilla      torch SDPA, causal (what megatron/TE would run without DMC)
  dmc-triton   Triton partial accumulation of [k | v] + fused DMC attention (CUDA only)
  dmc-torch    the pure-torch references (nemo_dmc.core)
plus each DMC piece alone (accumulation / attention). Variants are interleaved per step;
medians are reported. Usage:
  python bench/kernels_training.py                       # CUDA: b=1, s=4096, h=32, d=128, bf16
  python bench/kernels_training.py --batch 8 --seq 2048
  python bench/kernels_training.py --threads 1           # CPU: small defaults, references only
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from nemo_dmc.core import dmc_attention as attention_torch
from nemo_dmc.core import partial_accumulate as accumulate_torch

Step = Callable[[], None]


def _inputs(args, device: torch.device, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    b, h, hk, s, d = args.batch, args.heads, args.kv_heads, args.seq, args.dim
    make = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    alpha = torch.sigmoid(torch.randn(b, hk, s, device=device) * 4)  # relaxed decisions
    alpha[..., 0] = 0
    return dict(q=make(b, h, s, d), k=make(b, hk, s, d), v=make(b, hk, s, d), alpha=alpha,
                omega=torch.rand(b, hk, s, device=device) * 0.9 + 0.1,
                bias=torch.log1p(-alpha.roll(-1, -1) * 0.999))


def _steps(t: Dict[str, torch.Tensor], window, accumulate, attention) -> Dict[str, Step]:
    """Forward + backward closures: the DMC pieces alone and together."""
    leaf = {k: v.detach().requires_grad_() for k, v in t.items()}

    def acc():
        out = accumulate(torch.cat([leaf["k"], leaf["v"]], -1), leaf["alpha"], leaf["omega"], window)
        out.backward(torch.ones_like(out))

    def att():
        out = attention(leaf["q"], leaf["k"], leaf["v"], leaf["bias"])
        out.backward(torch.ones_like(out))

    def both():
        states = accumulate(torch.cat([leaf["k"], leaf["v"]], -1), leaf["alpha"], leaf["omega"], window)
        k, v = states.split(leaf["k"].shape[-1], dim=-1)
        out = attention(leaf["q"], k, v, leaf["bias"])
        out.backward(torch.ones_like(out))

    return {"accumulation": acc, "attention": att, "dmc": both}


def _vanilla(t: Dict[str, torch.Tensor]) -> Step:
    q, k, v = (t[n].detach().requires_grad_() for n in "qkv")

    def step():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.backward(torch.ones_like(out))

    return step


def _time(step: Step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _peak_mib(step: Step, device: torch.device) -> float:
    """Memory allocated by one step on top of what was allocated before it (CUDA only)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096 if cuda else 512)
    parser.add_argument("--heads", type=int, default=32 if cuda else 8)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
    parser.add_argument("--dim", type=int, default=128 if cuda else 64)
    parser.add_argument("--window", type=int, default=12, help="0 = unbounded")
    parser.add_argument("--dtype", default="bf16" if cuda else "fp32", choices=["bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=20 if cuda else 5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    args.kv_heads = args.kv_heads or args.heads
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    window = args.window or None
    tensors = _inputs(args, device, dtype)

    variants: Dict[str, Step] = {"vanilla": _vanilla(tensors)}
    if cuda:
        from nemo_dmc.kernels.dmc_attention import dmc_attention as attention_triton
        from nemo_dmc.kernels.partial_accumulation import partial_accumulate as accumulate_triton

        for name, step in _steps(tensors, window, accumulate_triton, attention_triton).items():
            variants[f"{name}-triton"] = step
    for name, step in _steps(tensors, window, accumulate_torch, attention_torch).items():
        variants[f"{name}-torch"] = step

    times: Dict[str, List[float]] = {name: [] for name in variants}
    for i in range(args.steps + 2):
        for name, step in variants.items():
            elapsed = _time(step, device)
            if i >= 2:  # warm-up (Triton compilation, allocator)
                times[name].append(elapsed)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"device {device} ({torch.cuda.get_device_name() if cuda else f'{torch.get_num_threads()} threads'}), "
          f"{args.dtype}; b={args.batch} s={args.seq} h={args.heads} kv={args.kv_heads} d={args.dim} "
          f"window={window or 'unbounded'}; median of {args.steps} fwd+bwd")
    print(f"{'variant':<24}{'ms':>10}{'/ vanilla':>11}{'peak MiB':>11}")
    for name in variants:
        peak = f"{_peak_mib(variants[name], device):.1f}" if cuda else "-"
        print(f"{name:<24}{med[name] * 1e3:>10.2f}{med[name] / med['vanilla']:>10.2f}x{peak:>11}")


if __name__ == "__main__":
    main()
