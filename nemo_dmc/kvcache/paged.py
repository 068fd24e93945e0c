"""The per-head paged KV cache: one block pool per model, a block table per
(sequence, layer, KV head), each DMC head's open-slot state, and what eviction scores slots by.

Sequences occupy *rows* (``0 .. max_sequences-1``); a row's heads grow independently. Closed
slots hold their final key (already rotated at the position of their newest token) and
value; the open (last) slot is rewritten as tokens merge into it, while its running sums
(and the window ring) stay in >= fp32 beside the pool so a merge can continue at any step.

Eviction heads keep, beside each slot, its token position and accumulated attention mass
(:attr:`PagedKVCache.slot_positions` / :attr:`PagedKVCache.slot_mass`, shaped like the pool's
slot index). Keys are rotated at their own position, so the slot order inside a head does not
matter to attention: the newest token takes the evicted slot's place
(:meth:`PagedKVCache.overwrite_slots`) and appends only while the head is under its budget,
so an eviction head never holds more than ``ceil(budget / block_size)`` blocks.

Blocks are taken from the pool when a head's last block fills and returned when a row is
released. An allocation the pool cannot satisfy never writes anything: it sets
:attr:`PagedKVCache.overflow` (the caller rolls the affected rows back, see
:class:`~nemo_dmc.inference.engine.InferenceEngine`), or raises :class:`CacheFullError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from nemo_dmc.kernels.references import FreeBlocks, acc_dtype
from nemo_dmc.kvcache.ops import run_entries


class CacheFullError(RuntimeError):
    """The KV block pool (or the set of sequence rows) cannot hold what was asked of it."""


# CacheLayout fields set from conf/generate.yaml, and their keys there (for error messages).
_CONFIG_KEYS = {"block_size": "engine.block_size", "num_blocks": "engine.num_blocks",
                "max_sequences": "engine.max_batch_size",
                "max_sequence_length": "engine.max_sequence_length"}


@dataclass(frozen=True)
class CacheLayout:
    """Shape of a :class:`PagedKVCache` (KV heads are those of this tensor-parallel rank).

    open_runs: keep DMC's open-run state (some layer runs DMC); slot_scores: keep each slot's
    position and attention mass (some layer evicts).
    """

    num_layers: int
    kv_heads: int
    head_dim: int
    window: Optional[int]
    block_size: int
    num_blocks: int
    max_sequences: int
    max_sequence_length: int
    dtype: torch.dtype = torch.float32
    open_runs: bool = True
    slot_scores: bool = False

    def __post_init__(self) -> None:
        for field_, key in _CONFIG_KEYS.items():
            if getattr(self, field_) < 1:
                raise ValueError(f"cache {field_} ({key} in the engine config) must be >= 1, "
                                 f"got {getattr(self, field_)}")

    @property
    def blocks_per_head(self) -> int:
        """Block-table width: enough for a head that never merges."""
        return -(-self.max_sequence_length // self.block_size)

    @property
    def slot_bytes(self) -> int:
        """Bytes of one cache slot (key and value)."""
        return 2 * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    @property
    def slot_score_bytes(self) -> int:
        """Bytes kept beside each pool slot for eviction (position and mass; 0 without)."""
        return 8 + 4 if self.slot_scores else 0

    @property
    def open_state_bytes_per_sequence(self) -> int:
        """Open-run state (>= fp32 sums or rings, ring pointer) of one sequence (0 without
        DMC layers)."""
        if not self.open_runs:
            return 0
        entries = run_entries(self.window) * (2 * self.head_dim + 1)
        element = torch.empty((), dtype=acc_dtype(self.dtype)).element_size()
        return self.num_layers * self.kv_heads * (entries * element + 8)


@dataclass
class MemoryReport:
    """KV memory of some rows of one rank's cache (bytes).

    logical: slots held x slot bytes; allocated: blocks in use x block bytes; waste: the
    unused tail of partially filled blocks; open_state: the open-run sums and rings (>= fp32);
    vanilla: what an uncompressed cache would hold for the same tokens.
    """

    tokens: int
    slots: int
    logical: int
    allocated: int
    open_state: int
    vanilla: int

    @property
    def waste(self) -> int:
        return self.allocated - self.logical

    @property
    def compression_ratio(self) -> float:
        """Tokens per slot over all layers and heads (1.0 for an empty cache)."""
        return self.vanilla / self.logical if self.logical else 1.0

    def __add__(self, other: "MemoryReport") -> "MemoryReport":
        return MemoryReport(*(getattr(self, f) + getattr(other, f)
                              for f in ("tokens", "slots", "logical", "allocated",
                                        "open_state", "vanilla")))


class PagedKVCache:
    """Block pool, block tables, lengths and open-run state of up to ``max_sequences`` rows.

    Tensors (``L`` layers, ``hk`` KV heads, ``m`` blocks per head, ``r`` run entries):
    ``key_pool``/``value_pool`` ``[num_blocks, block_size, head_dim]``;
    ``block_tables`` ``[rows, L, hk, m]`` (-1 = none); ``lengths`` ``[rows, L, hk]`` slots;
    ``open_runs`` ``[rows, L, hk, r, 2*head_dim + 1]``; ``ring_next`` ``[rows, L, hk]``;
    ``positions`` ``[rows]`` tokens cached per row; with ``layout.slot_scores``,
    ``slot_positions`` (int64) and ``slot_mass`` (fp32) ``[num_blocks, block_size]``.
    """

    def __init__(self, layout: CacheLayout, device: torch.device | str = "cpu") -> None:
        self.layout = layout
        rows, L, hk, d = layout.max_sequences, layout.num_layers, layout.kv_heads, layout.head_dim
        self.key_pool = torch.zeros(layout.num_blocks, layout.block_size, d, dtype=layout.dtype,
                                    device=device)
        self.value_pool = torch.zeros_like(self.key_pool)
        self.block_tables = torch.full((rows, L, hk, layout.blocks_per_head), -1,
                                       dtype=torch.int64, device=device)
        self.lengths = torch.zeros(rows, L, hk, dtype=torch.int64, device=device)
        entries = run_entries(layout.window) if layout.open_runs else 0
        self.open_runs = torch.zeros(rows, L, hk, entries, 2 * d + 1,
                                     dtype=acc_dtype(layout.dtype), device=device)
        scored = (layout.num_blocks, layout.block_size) if layout.slot_scores else (0, 0)
        self.slot_positions = torch.zeros(scored, dtype=torch.int64, device=device)
        self.slot_mass = torch.zeros(scored, dtype=torch.float32, device=device)
        self.ring_next = torch.zeros(rows, L, hk, dtype=torch.int64, device=device)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=device)
        self._free_blocks = torch.arange(layout.num_blocks - 1, -1, -1, dtype=torch.int64,
                                         device=device)
        self._num_free = layout.num_blocks
        self._free_rows: List[int] = list(range(rows - 1, -1, -1))
        self.overflow = False
        self._workspace: Tuple[Tensor, Tensor] = (self.key_pool.new_empty(0),
                                                  self.key_pool.new_empty(0))

    def workspace(self, numel: int) -> Tuple[Tensor, Tensor]:
        """Two reusable flat buffers of >= ``numel`` elements for gathering slots."""
        if self._workspace[0].numel() < numel:
            self._workspace = (self.key_pool.new_empty(numel), self.key_pool.new_empty(numel))
        return self._workspace

    # -- rows ----------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    @property
    def num_used_blocks(self) -> int:
        return self.layout.num_blocks - self._num_free

    @property
    def num_free_rows(self) -> int:
        return len(self._free_rows)

    def acquire_row(self) -> int:
        """A free, empty row for a new sequence."""
        if not self._free_rows:
            raise CacheFullError(f"all engine.max_batch_size={self.layout.max_sequences} "
                                 "sequence rows are in use")
        return self._free_rows.pop()

    def release_row(self, row: int) -> None:
        """Return the row's blocks to the pool and reset its state."""
        table = self.block_tables[row]
        used = table[table >= 0]
        n = used.numel()
        self._free_blocks[self._num_free:self._num_free + n] = used
        self._num_free += n
        table.fill_(-1)
        self.lengths[row] = 0
        self.open_runs[row] = 0
        self.ring_next[row] = 0
        self.positions[row] = 0
        if row not in self._free_rows:
            self._free_rows.append(row)

    def release_heads(self, rows: Tensor, layer: int) -> None:
        """Return the blocks of ``layer`` of ``rows`` to the pool and empty those heads (a
        policy that drops slots from the middle of a head rewrites it: DMS's chunk prefill)."""
        table = self.block_tables[rows, layer]
        used = table[table >= 0]
        n = used.numel()
        self._free_blocks[self._num_free:self._num_free + n] = used
        self._num_free += n
        self.block_tables[rows, layer] = -1
        self.lengths[rows, layer] = 0

    # -- writing -------------------------------------------------------------------------------

    def blocks_needed_for_next_token(self, rows: Tensor) -> int:
        """Blocks one more token per row may need (heads whose last block is full)."""
        return int((self.lengths[rows] % self.layout.block_size == 0).sum())

    def free_blocks_for_decode(self, rows: Tensor, layer: int) -> Optional[FreeBlocks]:
        """The free stack for one decode token per row in ``layer`` (see
        :func:`~nemo_dmc.kernels.references.decode_cache_update`), or ``None`` (and
        :attr:`overflow` set) when it cannot cover every head whose last block is full."""
        if self.overflow:
            return None
        needed = int((self.lengths[rows, layer] % self.layout.block_size == 0).sum())
        if needed > self._num_free:
            self.overflow = True
            return None
        taken = torch.zeros(1, dtype=torch.int32, device=self.lengths.device)
        return FreeBlocks(ids=self._free_blocks, top=self._num_free, taken=taken)

    def pop_taken_blocks(self, free: FreeBlocks) -> None:
        """Remove the blocks a decode update took from the top of the free stack."""
        self._num_free -= int(free.taken)

    def _allocate(self, rows: Tensor, layer: int, old: Tensor, new: Tensor) -> bool:
        """Give each ``(row, head)`` blocks for ``new`` slots; False (nothing taken) if short."""
        bs = self.layout.block_size
        have, want = (old + bs - 1) // bs, (new + bs - 1) // bs
        count = (want - have).reshape(-1)
        total = int(count.sum())
        if total == 0:
            return True
        if total > self._num_free:
            return False
        ids = self._free_blocks[self._num_free - total:self._num_free]
        self._num_free -= total
        owner = torch.repeat_interleave(torch.arange(count.numel(), device=count.device), count)
        first = torch.cumsum(count, 0) - count
        index = have.reshape(-1)[owner] + torch.arange(total, device=count.device) - first[owner]
        hk = self.layout.kv_heads
        self.block_tables[rows[owner // hk], layer, owner % hk, index] = ids
        return True

    def commit(self, rows: Tensor, layer: int, keys: Tensor, values: Tensor, merge: Tensor,
               counts: Tensor) -> bool:
        """Write the surviving states of a chunk of tokens into the layer's cache.

        State ``i`` survives when token ``i + 1`` appends or ``i`` is the row's last token
        (the open slot). Its slot is ``length - 1 + (appends up to i)``, so a chunk whose
        first token merges overwrites the cached open slot.

        Args:
            rows: ``[b]`` row ids; keys: ``[b, hk, c, d]`` rotated states; values alike;
            merge: ``[b, hk, c]`` decisions; counts: ``[b]`` real tokens per row (>= 1).

        Returns:
            False (and sets :attr:`overflow`, writing nothing) if the pool ran out of blocks.
        """
        if self.overflow:
            return False
        c = merge.shape[-1]
        if c == 1:
            return self._commit_one(rows, layer, keys[..., 0, :], values[..., 0, :], merge[..., 0])
        idx = torch.arange(c, device=merge.device)
        real = idx < counts.view(-1, 1, 1)
        appends = (1 - merge.long()) * real
        old = self.lengths[rows, layer]
        slot = old.unsqueeze(-1) - 1 + torch.cumsum(appends, dim=-1)
        survive = real & ((idx == counts.view(-1, 1, 1) - 1)
                          | (torch.nn.functional.pad(appends[..., 1:], (0, 1)) == 1))
        new = old + appends.sum(-1)
        if not self._allocate(rows, layer, old, new):
            self.overflow = True
            return False
        b_idx, h_idx, i_idx = survive.nonzero(as_tuple=True)
        s = slot[b_idx, h_idx, i_idx]
        block = self.block_tables[rows[b_idx], layer, h_idx, s // self.layout.block_size]
        offset = s % self.layout.block_size
        self.key_pool[block, offset] = keys[b_idx, h_idx, i_idx].to(self.layout.dtype)
        self.value_pool[block, offset] = values[b_idx, h_idx, i_idx].to(self.layout.dtype)
        self.lengths[rows, layer] = new
        return True

    def append_slots(self, rows: Tensor, layer: int, keys: Tensor, values: Tensor,
                     keep: Tensor, positions: Optional[Tensor] = None,
                     mass: Optional[Tensor] = None) -> bool:
        """Append the kept entries of a chunk after each head's slots, in chunk order.

        Args:
            rows: ``[b]``; keys, values: ``[b, hk, c, d]`` (keys rotated); keep: ``[b, hk, c]``
                bool; positions: ``[b, c]`` or ``[b, hk, c]`` token positions and mass:
                ``[b, hk, c]`` attention mass (both kept only with ``layout.slot_scores``;
                mass defaults to 0).

        Returns:
            False (and sets :attr:`overflow`, writing nothing) if the pool ran out of blocks.
        """
        if self.overflow:
            return False
        old = self.lengths[rows, layer]
        new = old + keep.sum(dim=-1)
        if not self._allocate(rows, layer, old, new):
            self.overflow = True
            return False
        slot = old.unsqueeze(-1) + torch.cumsum(keep.long(), dim=-1) - 1
        b_idx, h_idx, i_idx = keep.nonzero(as_tuple=True)
        s = slot[b_idx, h_idx, i_idx]
        bs = self.layout.block_size
        block = self.block_tables[rows[b_idx], layer, h_idx, s // bs]
        offset = s % bs
        self.key_pool[block, offset] = keys[b_idx, h_idx, i_idx].to(self.layout.dtype)
        self.value_pool[block, offset] = values[b_idx, h_idx, i_idx].to(self.layout.dtype)
        if self.layout.slot_scores:
            if positions is not None:
                positions = positions if positions.dim() == 3 else positions.unsqueeze(1)
                self.slot_positions[block, offset] = positions.expand_as(keep)[b_idx, h_idx, i_idx]
            self.slot_mass[block, offset] = (0.0 if mass is None
                                             else mass[b_idx, h_idx, i_idx].float())
        self.lengths[rows, layer] = new
        return True

    def overwrite_slots(self, rows: Tensor, layer: int, slots: Tensor, where: Tensor,
                        keys: Tensor, values: Tensor, positions: Optional[Tensor] = None,
                        mass: Optional[Tensor] = None) -> None:
        """Overwrite slot ``slots[b, h]`` of each head where ``where[b, h]`` (both ``[b, hk]``)
        with ``keys``/``values`` ``[b, hk, d]``, ``positions [b]`` and ``mass [b, hk]``
        (an evicted slot taken by the newest token; lengths and blocks unchanged)."""
        b_idx, h_idx = where.nonzero(as_tuple=True)
        if b_idx.numel() == 0:
            return
        s = slots[b_idx, h_idx]
        bs = self.layout.block_size
        block = self.block_tables[rows[b_idx], layer, h_idx, s // bs]
        offset = s % bs
        self.key_pool[block, offset] = keys[b_idx, h_idx].to(self.layout.dtype)
        self.value_pool[block, offset] = values[b_idx, h_idx].to(self.layout.dtype)
        if self.layout.slot_scores:
            if positions is not None:
                self.slot_positions[block, offset] = positions[b_idx]
            self.slot_mass[block, offset] = 0.0 if mass is None else mass[b_idx, h_idx].float()

    def _commit_one(self, rows: Tensor, layer: int, keys: Tensor, values: Tensor,
                    merge: Tensor) -> bool:
        """:meth:`commit` of one token per row (decode): ``keys``/``values`` ``[b, hk, d]``."""
        old = self.lengths[rows, layer]
        new = old + (1 - merge.long())
        if not self._allocate(rows, layer, old, new):
            self.overflow = True
            return False
        slot = new - 1
        heads = torch.arange(self.layout.kv_heads, device=rows.device)
        block = self.block_tables[rows.unsqueeze(1), layer, heads, slot // self.layout.block_size]
        offset = slot % self.layout.block_size
        self.key_pool[block, offset] = keys.to(self.layout.dtype)
        self.value_pool[block, offset] = values.to(self.layout.dtype)
        self.lengths[rows, layer] = new
        return True

    # -- inspection ----------------------------------------------------------------------------

    def head_lengths(self, row: int) -> Tensor:
        """``[layers, kv_heads]`` slots held by each head of a row."""
        return self.lengths[row].clone()

    def memory(self, rows: Optional[Sequence[int]] = None) -> MemoryReport:
        """Memory of the given rows (default: every row holding a sequence)."""
        if rows is None:
            rows = [r for r in range(self.layout.max_sequences) if r not in self._free_rows]
        rows_t = torch.as_tensor(list(rows), dtype=torch.int64, device=self.lengths.device)
        lay = self.layout
        lengths = self.lengths[rows_t]
        slots = int(lengths.sum())
        blocks = int(((lengths + lay.block_size - 1) // lay.block_size).sum())
        tokens = int(self.positions[rows_t].sum())
        return MemoryReport(
            tokens=tokens, slots=slots, logical=slots * lay.slot_bytes,
            allocated=blocks * lay.block_size * lay.slot_bytes,
            open_state=len(rows_t) * lay.open_state_bytes_per_sequence,
            vanilla=tokens * lay.num_layers * lay.kv_heads * lay.slot_bytes)
