# SPDX-License-Identifier: Apache-2.0
"""Host copies of single pages' K and V (one layer each), kept in fixed-size slots for re-segmentation.

Keeping a copy is one ``copy_`` into a slot that is reused: cloning each page into fresh memory cost about ten
times as much on the CPU (the page faults of each new allocation: 159 against 16 us for a page of the 8B shape), and
the bridge keeps every page it hands to the sidecar. Slots are allocated a slab at a time, up to the byte cap (a
slot's memory is faulted in on its first use only), and reused; when all are taken, the least recently stored copy
gives its slot up.
"""

from __future__ import annotations

import collections
from typing import Iterator, List, Optional, Tuple

import torch

__all__ = ["PageCopies"]

Key = Tuple[int, int]  # (layer, page)


class PageCopies:
    """Up to ``max_bytes`` of page copies, each ``[H, S, d]`` for K and for V, with the epoch they were taken at.

    Parameters
    ----------
    page_shape : tuple of int
        ``(H, S, d)`` of one page's K (and V) in one layer.
    dtype : torch.dtype
    max_bytes : int
        Cap on the slots' memory (K and V); 0 keeps nothing.
    slab_pages : int
        Slots allocated at once.
    """

    def __init__(self, page_shape: Tuple[int, int, int], dtype: torch.dtype, max_bytes: int,
                 slab_pages: int = 64) -> None:  # fmt: skip
        self.page_shape, self.dtype = tuple(int(x) for x in page_shape), dtype
        self.page_bytes = 2 * torch.Size(self.page_shape).numel() * torch.empty((), dtype=dtype).element_size()
        self.max_pages = max(0, int(max_bytes)) // self.page_bytes
        self.slab_pages = max(1, int(slab_pages))
        self._slabs: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self._free: List[Tuple[int, int]] = []
        self._where: "collections.OrderedDict[Key, Tuple[int, int, int]]" = collections.OrderedDict()

    @property
    def used_bytes(self) -> int:
        """Bytes of the copies held (slots in use, K and V)."""
        return len(self._where) * self.page_bytes

    @property
    def allocated_bytes(self) -> int:
        """Bytes of every slot allocated so far (at most the cap, rounded up to a slab)."""
        return sum(k.nbytes + v.nbytes for k, v in self._slabs)

    def __len__(self) -> int:
        return len(self._where)

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self._where))

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def put(self, key: Key, epoch: int, keys: torch.Tensor, values: torch.Tensor) -> bool:
        """Copy one page's K and V (host tensors of ``page_shape``) in, replacing any copy under ``key``; the oldest
        copy gives its slot up when all are taken. Returns whether it was kept (not with a cap of 0 pages)."""
        if tuple(keys.shape) != self.page_shape or tuple(values.shape) != self.page_shape:
            raise ValueError(f"keys/values: expected shape {list(self.page_shape)}, got {list(keys.shape)} and "
                             f"{list(values.shape)}")  # fmt: skip
        if self.max_pages == 0:
            return False
        self.forget(key)
        slot = self._slot()
        k, v = self._slabs[slot[0]]
        k[slot[1]].copy_(keys)
        v[slot[1]].copy_(values)
        self._where[key] = (int(epoch), slot[0], slot[1])
        return True

    def get(self, key: Key) -> Optional[Tuple[int, torch.Tensor, torch.Tensor]]:
        """``(epoch, K, V)`` of ``key`` (views of its slot: valid until the copy is replaced or forgotten), or
        ``None``."""
        where = self._where.get(key)
        if where is None:
            return None
        epoch, slab, i = where
        k, v = self._slabs[slab]
        return epoch, k[i], v[i]

    def forget(self, key: Key) -> None:
        """Drop the copy of ``key``, if any (its slot is reused)."""
        where = self._where.pop(key, None)
        if where is not None:
            self._free.append((where[1], where[2]))

    def _slot(self) -> Tuple[int, int]:
        if not self._free:
            allocated = len(self._slabs) * self.slab_pages
            if allocated < self.max_pages:
                n = min(self.slab_pages, self.max_pages - allocated)
                shape = (n,) + self.page_shape
                self._slabs.append((torch.empty(shape, dtype=self.dtype), torch.empty(shape, dtype=self.dtype)))
                self._free.extend((len(self._slabs) - 1, i) for i in range(n - 1, -1, -1))
            else:
                self.forget(next(iter(self._where)))
        return self._free.pop()
