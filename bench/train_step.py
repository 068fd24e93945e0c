"""DMC vs vanilla training step time (forward + backward) on the same model shape and batch.

Steps of the models are interleaved so all see the same machine state; the ratio of
medians is reported. ``--distill`` adds a third variant, the DMC step with distillation
from a frozen plain-attention teacher (its forward + the vocab-parallel KL), and reports
the teacher's parameter memory.
Usage: python bench/train_step.py [--seq 256 --batch 8 --steps 20] [--distill]

On a GPU: ``python bench/train_step.py --device cuda --gpu-sizes`` (bf16, 4 layers of a
Llama-2-7B-like width with 8 KV heads, batch 1 x 4096 tokens; the DMC model then runs the
fused Triton kernels, the vanilla one megatron's local-spec attention, or Transformer
Engine's when it is installed). Each step is timed between CUDA synchronisations.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from nemo_dmc.core import DistillConfig, DMCConfig, ModelConfig
from nemo_dmc.megatron import parallel
from nemo_dmc.megatron.cpu_shims import causal_attention_mask
from nemo_dmc.megatron.distill import Teacher
from nemo_dmc.megatron.model import build_model
from nemo_dmc.megatron.stats import collect_dmc_stats
from nemo_dmc.methods import VanillaSettings


GPU_SIZES = dict(num_layers=4, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                 ffn_hidden_size=14336, vocab_size=32000)
GPU_ARGS = dict(seq=4096, batch=1)


def _step(model, tokens, positions, mask, dmc: bool, cuda: bool = False,
          teacher: Teacher | None = None) -> float:
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    if teacher is None:
        loss = model(tokens, positions, mask, labels=tokens).mean()
    else:
        loss = teacher.terms(model, tokens, positions, mask, tokens).loss.mean()
    if dmc:
        loss = loss + collect_dmc_stats(model).loss(4.0)
    loss.backward()
    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--window", type=int, default=12, help="0 = unbounded")
    parser.add_argument("--distill", action="store_true",
                        help="also time DMC + distillation from a frozen teacher")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu",
                        help="auto: cuda when available")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--gpu-sizes", action="store_true",
                        help=f"model {GPU_SIZES}, {GPU_ARGS}")
    args = parser.parse_args()
    if args.gpu_sizes:
        for key, value in GPU_ARGS.items():
            setattr(args, key, value)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and cuda)

    parallel.initialize(tensor_parallel_size=1, seed=0)
    shape = replace(ModelConfig(**(GPU_SIZES if args.gpu_sizes else {})), seq_length=args.seq)
    vanilla = build_model(shape, method=None, bf16=bf16).train()
    dmc = build_model(shape, DMCConfig(window=args.window or None), bf16=bf16).train()
    dmc.load_state_dict(vanilla.state_dict())
    vanilla.to(device)
    dmc.to(device)
    teacher = None
    if args.distill:
        teacher = Teacher(build_model(shape, VanillaSettings(), bf16=bf16).to(device),
                          DistillConfig())
        teacher.module.load_state_dict(vanilla.state_dict())
    tokens = torch.randint(0, shape.vocab_size, (args.batch, args.seq)).to(device)
    positions = torch.arange(args.seq, device=device).expand(args.batch, -1)
    mask = causal_attention_mask(args.seq, device)

    times: dict[str, list[float]] = {"vanilla": [], "dmc": [], "distill": []}
    for i in range(args.steps + 3):
        step = {"vanilla": _step(vanilla, tokens, positions, mask, dmc=False, cuda=cuda),
                "dmc": _step(dmc, tokens, positions, mask, dmc=True, cuda=cuda)}
        if teacher is not None:
            step["distill"] = _step(dmc, tokens, positions, mask, dmc=True, cuda=cuda,
                                    teacher=teacher)
        if i >= 3:  # warm-up
            for name, seconds in step.items():
                times[name].append(seconds)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    print(f"model: {shape.num_layers} layers, hidden {shape.hidden_size}, "
          f"{shape.num_attention_heads} heads / {shape.kv_heads} KV, vocab {shape.vocab_size}; "
          f"batch {args.batch} x seq {args.seq}; window {args.window or 'unbounded'}; "
          f"{'bf16' if bf16 else 'fp32'}; device "
          f"{torch.cuda.get_device_name() if cuda else 'cpu'}; threads {torch.get_num_threads()}")
    print(f"vanilla step {med['vanilla'] * 1e3:.1f} ms | DMC step {med['dmc'] * 1e3:.1f} ms | "
          f"ratio DMC/vanilla {med['dmc'] / med['vanilla']:.3f}")
    if teacher is not None:
        student_bytes = sum(p.numel() * p.element_size() for p in dmc.parameters())
        print(f"DMC + distillation step {med['distill'] * 1e3:.1f} ms | ratio distill/DMC "
              f"{med['distill'] / med['dmc']:.3f} | teacher parameters "
              f"{teacher.param_bytes / 2**20:.1f} MiB (student {student_bytes / 2**20:.1f} MiB)")
    parallel.shutdown()


if __name__ == "__main__":
    main()
