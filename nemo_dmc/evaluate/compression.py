"""Realised compression and KV bytes of evaluated sequences, and the per-head CR heatmap.

A head's cache after ``s`` tokens holds one slot per append: ``s - merges`` slots under DMC's
hard decisions (the first token always appends), ``s`` for plain attention, and what the
eviction policy kept at the last position under eviction (each layer's method records them:
:func:`nemo_dmc.megatron.stats.layer_slots`). Realised CR is tokens over slots, so the
overall, per-layer and per-head figures here equal ``1 / (1 - merge fraction)`` of
:func:`nemo_dmc.megatron.stats.collect_dmc_stats`. Bytes follow the inference cache's
conventions (:class:`~nemo_dmc.kvcache.paged.CacheLayout`,
:class:`~nemo_dmc.kvcache.paged.MemoryReport`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import Tensor

from nemo_dmc.kvcache.paged import CacheLayout, MemoryReport

KV_DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                     "fp16": torch.float16}


@dataclass
class CompressionTally:
    """Slots held at the end of each evaluated sequence, summed over sequences.

    ``head_slots`` ``[layers, kv_heads]``; ``blocks``: blocks of ``layout.block_size`` a paged
    cache would allocate; ``open_state``: bytes of DMC's open-run sums (0 for other policies).
    """

    layout: CacheLayout
    sequences: int = 0
    tokens: int = 0
    blocks: int = 0
    open_state: int = 0
    head_slots: Optional[Tensor] = None

    def add(self, slots: Tensor, seq: int, open_state: bool) -> None:
        """Count one forward: ``slots`` ``[batch, layers, kv_heads]`` after ``seq`` tokens."""
        per_head = slots.sum(0)
        self.head_slots = per_head if self.head_slots is None else self.head_slots + per_head
        self.sequences += slots.shape[0]
        self.tokens += slots.shape[0] * seq
        self.blocks += int(((slots + self.layout.block_size - 1) // self.layout.block_size).sum())
        if open_state:
            self.open_state += slots.shape[0] * self.layout.open_state_bytes_per_sequence

    @property
    def head_cr(self) -> Tensor:
        """``[layers, kv_heads]`` tokens per slot of each head."""
        return self.tokens / self.head_slots.double()

    @property
    def layer_cr(self) -> Tensor:
        """``[layers]`` tokens per slot of each layer."""
        return self.tokens * self.head_slots.shape[1] / self.head_slots.sum(1).double()

    @property
    def cr(self) -> float:
        return self.memory().compression_ratio

    def memory(self) -> MemoryReport:
        """KV bytes of all counted sequences, with their uncompressed equivalent."""
        lay = self.layout
        slots = int(self.head_slots.sum())
        return MemoryReport(tokens=self.tokens, slots=slots, logical=slots * lay.slot_bytes,
                            allocated=self.blocks * lay.block_size * lay.slot_bytes,
                            open_state=self.open_state,
                            vanilla=self.tokens * lay.num_layers * lay.kv_heads * lay.slot_bytes)


@dataclass
class CompressionReport:
    """JSON-ready compression figures (``kv_bytes`` as in :class:`MemoryReport`)."""

    cr: float
    layer_cr: List[float]
    head_cr: List[List[float]]
    kv_bytes: Dict[str, float] = field(default_factory=dict)


def compression_report(tally: CompressionTally) -> CompressionReport:
    mem = tally.memory()
    per_seq = max(1, tally.sequences)
    kv = {"sequences": tally.sequences, "tokens": mem.tokens, "slots": mem.slots,
          "slot_bytes": tally.layout.slot_bytes, "logical": mem.logical,
          "allocated": mem.allocated, "open_state": mem.open_state, "vanilla": mem.vanilla,
          "logical_per_sequence": mem.logical / per_seq,
          "vanilla_per_sequence": mem.vanilla / per_seq,
          "fraction_of_vanilla": mem.logical / mem.vanilla if mem.vanilla else 1.0}
    return CompressionReport(cr=mem.compression_ratio, layer_cr=tally.layer_cr.tolist(),
                             head_cr=tally.head_cr.tolist(), kv_bytes=kv)


def write_heatmap(head_cr: Tensor | List[List[float]], path: Path, title: str) -> Path:
    """Write a ``[layers, kv_heads]`` CR heatmap as a PNG (matplotlib, Agg backend)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("the CR heatmap needs matplotlib: pip install -c constraints.txt "
                          "-e '.[eval]' (or heatmap=false)") from err
    values = torch.as_tensor(head_cr, dtype=torch.float64)
    layers, heads = values.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * heads + 2.5), max(3.0, 0.3 * layers + 1.5)))
    try:
        image = ax.imshow(values.numpy(), aspect="auto", cmap="viridis", origin="upper")
        fig.colorbar(image, ax=ax, label="realised CR (tokens / slot)")
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(heads))
        ax.set_yticks(range(layers))
        if layers * heads <= 256:
            low, high = float(values.min()), float(values.max())
            for i in range(layers):
                for j in range(heads):
                    v = float(values[i, j])
                    light = high > low and (v - low) / (high - low) > 0.6
                    ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7,
                            color="black" if light else "white")
        ax.set_title(title)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path
