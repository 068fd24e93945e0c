"""One layer's slice of a :class:`~nemo_dmc.kvcache.paged.PagedKVCache` for some rows: what a
cache policy (:mod:`nemo_dmc.kvcache.policies`) reads and writes, in one object."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from nemo_dmc.kvcache.paged import CacheLayout, PagedKVCache


@dataclass
class LayerCacheView:
    """Layer ``layer`` of ``cache`` for the sequences in cache rows ``rows`` (``[b]``)."""

    cache: PagedKVCache
    layer: int
    rows: Tensor

    @property
    def layout(self) -> CacheLayout:
        return self.cache.layout

    @property
    def lengths(self) -> Tensor:
        """``[b, hk]`` slots held by each head (a copy)."""
        return self.cache.lengths[self.rows, self.layer]

    @property
    def block_tables(self) -> Tensor:
        """``[b, hk, m]`` block ids (-1 = none; a copy)."""
        return self.cache.block_tables[self.rows, self.layer]

    @property
    def fresh(self) -> bool:
        """Whether no row holds anything in this layer yet."""
        return not bool(self.lengths.any())

    def select(self, which: Tensor) -> "LayerCacheView":
        """The view of the rows ``rows[which]``."""
        return LayerCacheView(self.cache, self.layer, self.rows[which])

    def slot_index(self) -> Tuple[Tensor, Tensor, Tensor]:
        """``(block, offset, valid)``, each ``[b, hk, t]`` with ``t`` the longest head's
        length: where slot ``i`` of each head lies in the pool (block 0 where not valid)."""
        lengths = self.lengths
        t = int(lengths.max()) if lengths.numel() else 0
        slot = torch.arange(t, device=lengths.device)
        bs = self.layout.block_size
        tables = self.block_tables
        block = tables.gather(-1, (slot // bs).expand(*tables.shape[:2], t)).clamp_min(0)
        return block, (slot % bs).expand_as(block), slot < lengths.unsqueeze(-1)

    def append(self, keys: Tensor, values: Tensor, keep: Tensor,
               positions: Optional[Tensor] = None, mass: Optional[Tensor] = None) -> bool:
        """:meth:`PagedKVCache.append_slots` for these rows (False: pool exhausted)."""
        return self.cache.append_slots(self.rows, self.layer, keys, values, keep, positions, mass)

    def overwrite(self, slots: Tensor, where: Tensor, keys: Tensor, values: Tensor,
                  positions: Optional[Tensor] = None, mass: Optional[Tensor] = None) -> None:
        """:meth:`PagedKVCache.overwrite_slots` for these rows."""
        self.cache.overwrite_slots(self.rows, self.layer, slots, where, keys, values, positions,
                                   mass)

    def blocks_for_next_token(self, grows: Optional[Tensor] = None) -> int:
        """Blocks one more token per row may take: heads whose last block is full (and,
        given ``grows [b, hk]``, that take a new slot)."""
        full = self.lengths % self.layout.block_size == 0
        return int((full if grows is None else full & grows).sum())
