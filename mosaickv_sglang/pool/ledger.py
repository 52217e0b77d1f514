# SPDX-License-Identifier: Apache-2.0
"""Arena room by byte budget, so that every tensor-parallel rank takes the same sealing decisions.

Each TP rank compresses its own KV heads, so the granules its plans actually use differ from rank to rank. If a
rank decided whether a batch of pages fits by trying its own arenas, one rank could seal a batch that another
leaves dense; their hot pools would then differ, and so would every later sealing decision, while SGLang's one
allocator drives them all. The ledger decides instead from what every rank knows alike: the pages, which of them are
sinks, and the ratio. A batch reserves the payload granules its byte budget allows (the planner never exceeds the
budget), each page keeps its share until it is freed, and a batch is sealed only if the ledger has room for it.
"""

from __future__ import annotations

import numpy as np

from mosaickv_sglang.kernels.format import GRANULE_BYTES
from mosaickv_sglang.strategies.base import dense_segment_bytes, overhead_bytes

__all__ = ["ArenaLedger", "seal_budget_bytes"]


def seal_budget_bytes(num_segments: int, num_sink_segments: int, segment_bytes: int, ratio: float) -> int:
    """Byte budget of one layer's plan: sink segments dense, the others at ``1 / ratio`` of dense."""
    return num_sink_segments * segment_bytes + int((num_segments - num_sink_segments) * segment_bytes / ratio)


class ArenaLedger:
    """Granules of one layer's arena reserved by sealed logical pages (the same in every layer and on every rank).

    Parameters
    ----------
    num_pages : int
        Logical pages of the pool (padding page included).
    capacity : int
        Granules that reservations may take in total.
    num_kv_heads, seg_size, head_dim : int
        Segments per page (one per KV head) and their shape.
    """

    def __init__(self, num_pages: int, capacity: int, num_kv_heads: int, seg_size: int, head_dim: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity: expected granules >= 0, got {capacity}")
        self.capacity = int(capacity)
        self.num_kv_heads, self.seg_size, self.head_dim = int(num_kv_heads), int(seg_size), int(head_dim)
        self._held = np.zeros(int(num_pages), dtype=np.int64)
        self.reserved = 0

    @property
    def room(self) -> int:
        """Granules not reserved."""
        return self.capacity - self.reserved

    def reservation(self, sink_mask: np.ndarray, ratio: float) -> np.ndarray:
        """Granules each page of a batch reserves: its share of the batch's payload budget.

        The payload budget is :func:`seal_budget_bytes` less the per-segment metadata, which lives outside the
        arena. Sinks reserve exactly their dense payload; the rest is split evenly, the remainder to the first pages.

        Parameters
        ----------
        sink_mask : numpy.ndarray
            shape ``[P]``, bool; which pages of the batch are sealed dense as sinks.
        ratio : float
            Compression ratio the batch is planned at.

        Returns
        -------
        numpy.ndarray
            shape ``[P]``, int64.
        """
        h, seg = self.num_kv_heads, dense_segment_bytes(self.seg_size, self.head_dim)
        over = overhead_bytes(self.head_dim)
        n, n_sink = sink_mask.size * h, int(np.count_nonzero(sink_mask)) * h
        total = (seal_budget_bytes(n, n_sink, seg, ratio) - n * over) // GRANULE_BYTES
        dense_page = h * (seg - over) // GRANULE_BYTES
        out = np.where(sink_mask, dense_page, 0).astype(np.int64)
        ordinary = np.flatnonzero(~sink_mask)
        if ordinary.size:
            rest = max(0, total - dense_page * int(np.count_nonzero(sink_mask)))
            out[ordinary] = rest // ordinary.size
            out[ordinary[: rest % ordinary.size]] += 1
        return out

    def reserve(self, pages: np.ndarray, granules: np.ndarray) -> None:
        """Record that ``pages`` (distinct, not holding a reservation) were sealed with ``granules`` each."""
        if (self._held[pages] != 0).any():
            raise ValueError("pages: expected pages without a reservation, got one already sealed")
        self._held[pages] = granules
        self.reserved += int(granules.sum())

    def release(self, pages: np.ndarray) -> None:
        """Give back the reservations of ``pages`` (distinct; pages without one are ignored)."""
        self.reserved -= int(self._held[pages].sum())
        self._held[pages] = 0

    def reset(self) -> None:
        self._held[:] = 0
        self.reserved = 0

    def check(self) -> None:
        """Raise ``RuntimeError`` if the total differs from the per-page reservations or exceeds the capacity."""
        if self.reserved != int(self._held.sum()) or self.reserved > self.capacity or (self._held < 0).any():
            raise RuntimeError(
                f"arena ledger: expected per-page reservations summing to the total <= {self.capacity}, got total "
                f"{self.reserved} and sum {int(self._held.sum())}"
            )
