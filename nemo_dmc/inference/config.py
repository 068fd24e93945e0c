"""Settings of the inference CLIs (``engine.*``, ``sampling.*``, ``parallel.*`` of
``conf/generate.yaml``; ``parallel.*`` of ``conf/evaluate.yaml`` too): plain dataclasses,
importable without torch, megatron or Hydra."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional

FORCE_DECISIONS = (None, "append", "merge")


@dataclass
class EngineConfig:
    """Cache and scheduling settings (``engine.*`` in the CLI).

    max_batch_size: sequences decoded together (cache rows).
    max_sequence_length: prompt plus generated tokens per sequence.
    block_size: slots per cache block.
    num_blocks: pool size per rank in blocks (set at most one of num_blocks and
        kv_memory_mb; neither = enough for ``max_batch_size`` uncompressed sequences of
        ``max_sequence_length``).
    kv_memory_mb: pool size per rank in MiB of keys and values (instead of num_blocks).
    prefill_chunk_size: prompt tokens per sequence per forward (``null``: whole prompts).
    force_decision: dmc models only: ``"append"`` = DMC off (a vanilla cache in the same
        engine), ``"merge"``, or ``null`` for the model's own decisions.
    seed: base seed of the per-request sampling generators.
    """

    max_batch_size: int = 8
    max_sequence_length: int = 2048
    block_size: int = 16
    num_blocks: Optional[int] = None
    kv_memory_mb: Optional[float] = None
    prefill_chunk_size: Optional[int] = 512
    force_decision: Optional[str] = None
    seed: int = 1234

    def __post_init__(self) -> None:
        for key in ("max_batch_size", "max_sequence_length", "block_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"engine.{key} must be >= 1, got {getattr(self, key)}")
        if self.num_blocks is not None and self.kv_memory_mb is not None:
            raise ValueError("set at most one of engine.num_blocks and engine.kv_memory_mb")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"engine.num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_memory_mb is not None and self.kv_memory_mb <= 0:
            raise ValueError(f"engine.kv_memory_mb must be > 0, got {self.kv_memory_mb}")
        if self.prefill_chunk_size is not None and self.prefill_chunk_size < 1:
            raise ValueError(f"engine.prefill_chunk_size must be >= 1 or null, "
                             f"got {self.prefill_chunk_size}")
        if self.force_decision not in FORCE_DECISIONS:
            raise ValueError(f"engine.force_decision must be null, 'append' or 'merge', "
                             f"got {self.force_decision!r}")

    def pool_blocks(self, num_layers: int, kv_heads: int, slot_bytes: int) -> int:
        """Blocks of this rank's pool (``kv_heads`` local to the rank)."""
        if self.num_blocks is not None:
            return self.num_blocks
        if self.kv_memory_mb is not None:
            blocks = int(self.kv_memory_mb * 2 ** 20) // (self.block_size * slot_bytes)
            if blocks < 1:
                raise ValueError(f"engine.kv_memory_mb={self.kv_memory_mb} holds no block of "
                                 f"{self.block_size * slot_bytes} bytes")
            return blocks
        per_head = math.ceil(self.max_sequence_length / self.block_size)
        return self.max_batch_size * num_layers * kv_heads * per_head


@dataclass
class SamplingSettings:
    """Sampling of every prompt (``sampling.*``); see
    :class:`~nemo_dmc.inference.sampling.SamplingParams`.

    temperature: softmax temperature; 0 = greedy.
    top_k: sample among the k most likely tokens; 0 = off.
    top_p: nucleus sampling mass; 1.0 = off.
    max_new_tokens: tokens generated per prompt at most.
    stop_token_ids: token ids that end a sequence.
    stop_at_eod: also stop at the tokenizer's end-of-document token.
    seed: sampling seed of every request; null = engine.seed + the request's index.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop_token_ids: List[int] = field(default_factory=list)
    stop_at_eod: bool = True
    seed: Optional[int] = None


@dataclass
class ParallelSettings:
    """``parallel.*``.

    Attributes:
        tensor_model_parallel_size: tensor-parallel ranks (launch that many processes with
            torchrun); must divide the query and KV heads.
    """

    tensor_model_parallel_size: int = 1
