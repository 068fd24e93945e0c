"""DMC vs vanilla training step time (forward + backward) on the same model shape and batch.

Steps of the two models are interleaved so both see the same machine state; the ratio of
medians is reported. Usage: python bench/train_step.py [--seq 256 --batch 8 --steps 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from nemo_dmc.core import DMCConfig, ModelConfig
from nemo_dmc.megatron import parallel
from nemo_dmc.megatron.cpu_shims import causal_attention_mask
from nemo_dmc.megatron.model import build_model
from nemo_dmc.megatron.stats import collect_dmc_stats


def _step(model, tokens, positions, mask, dmc: bool) -> float:
    start = time.perf_counter()
    loss = model(tokens, positions, mask, labels=tokens).mean()
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
    args = parser.parse_args()

    parallel.initialize(tensor_parallel_size=1, seed=0)
    shape = replace(ModelConfig(), seq_length=args.seq)
    vanilla = build_model(shape, method=None).train()
    dmc = build_model(shape, DMCConfig(window=args.window or None)).train()
    dmc.load_state_dict(vanilla.state_dict())
    tokens = torch.randint(0, shape.vocab_size, (args.batch, args.seq))
    positions = torch.arange(args.seq).expand(args.batch, -1)
    mask = causal_attention_mask(args.seq)

    times: dict[str, list[float]] = {"vanilla": [], "dmc": []}
    for i in range(args.steps + 3):
        t_v = _step(vanilla, tokens, positions, mask, dmc=False)
        t_d = _step(dmc, tokens, positions, mask, dmc=True)
        if i >= 3:  # warm-up
            times["vanilla"].append(t_v)
            times["dmc"].append(t_d)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model: {shape.num_layers} layers, hidden {shape.hidden_size}, "
          f"{shape.num_attention_heads} heads / {shape.kv_heads} KV, vocab {shape.vocab_size}; "
          f"batch {args.batch} x seq {args.seq}; window {args.window or 'unbounded'}; "
          f"threads {torch.get_num_threads()}")
    print(f"vanilla step {med['vanilla'] * 1e3:.1f} ms | DMC step {med['dmc'] * 1e3:.1f} ms | "
          f"ratio DMC/vanilla {med['dmc'] / med['vanilla']:.3f}")
    parallel.shutdown()


if __name__ == "__main__":
    main()
