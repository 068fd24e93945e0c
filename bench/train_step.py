"""DMC vs vanilla training step time (forward + backward) on the same model shape and batch.

Steps of the models are interleaved so all see the same machine state; the ratio of
medians is reported. ``--distill`` adds a third variant, the DMC step with distillation
from a frozen plain-attention teacher (its forward + the vocab-parallel KL), and reports
the teacher's parameter memory.
Usage: python bench/train_step.py [--seq 256 --batch 8 --steps 20] [--distill]
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


def _step(model, tokens, positions, mask, dmc: bool, teacher: Teacher | None = None) -> float:
    start = time.perf_counter()
    if teacher is None:
        loss = model(tokens, positions, mask, labels=tokens).mean()
    else:
        loss = teacher.terms(model, tokens, positions, mask, tokens).loss.mean()
    if dmc:
        loss = loss + collect_dmc_stats(model).loss(4.0)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--window", type=int, default=12, help="0 = unbounded")
    parser.add_argument("--distill", action="store_true",
                        help="also time DMC + distillation from a frozen teacher")
    args = parser.parse_args()

    parallel.initialize(tensor_parallel_size=1, seed=0)
    shape = replace(ModelConfig(), seq_length=args.seq)
    vanilla = build_model(shape, method=None).train()
    dmc = build_model(shape, DMCConfig(window=args.window or None)).train()
    dmc.load_state_dict(vanilla.state_dict())
    teacher = None
    if args.distill:
        teacher = Teacher(build_model(shape, VanillaSettings()), DistillConfig())
        teacher.module.load_state_dict(vanilla.state_dict())
    tokens = torch.randint(0, shape.vocab_size, (args.batch, args.seq))
    positions = torch.arange(args.seq).expand(args.batch, -1)
    mask = causal_attention_mask(args.seq)

    times: dict[str, list[float]] = {"vanilla": [], "dmc": [], "distill": []}
    for i in range(args.steps + 3):
        step = {"vanilla": _step(vanilla, tokens, positions, mask, dmc=False),
                "dmc": _step(dmc, tokens, positions, mask, dmc=True)}
        if teacher is not None:
            step["distill"] = _step(dmc, tokens, positions, mask, dmc=True, teacher=teacher)
        if i >= 3:  # warm-up
            for name, seconds in step.items():
                times[name].append(seconds)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    print(f"model: {shape.num_layers} layers, hidden {shape.hidden_size}, "
          f"{shape.num_attention_heads} heads / {shape.kv_heads} KV, vocab {shape.vocab_size}; "
          f"batch {args.batch} x seq {args.seq}; window {args.window or 'unbounded'}; "
          f"threads {torch.get_num_threads()}")
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
