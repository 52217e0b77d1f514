# SPDX-License-Identifier: Apache-2.0
"""Free-list allocator of arena granules (host-side bookkeeping of one layer's packed arena).

The arena itself is a device tensor; this allocator only hands out granule ranges. The free space is kept as a
sorted, fully coalesced list of extents ``(start, length)`` in two NumPy int64 arrays: no two extents touch, so the
representation is canonical (it depends only on the *set* of free granules, not on the history). That makes
rolling back an allocation by freeing it restore the exact previous state, which the store relies on for its
all-or-nothing seal across layers.

Allocation is vectorised over a batch of payloads:

1. **Best fit, contiguous.** If some extent holds the whole batch, the smallest such extent is carved with an
   exclusive prefix sum (one extent touched, payloads adjacent in submission order).
2. **First-fit decreasing.** Otherwise payloads are sorted by size (largest first) and the extents are visited
   largest first; each extent takes the longest run of the remaining payloads that fits (one ``searchsorted``
   per extent), and a per-payload first-fit pass places what is left into the leftover pieces.

If the batch cannot be placed in full, nothing changes and :class:`ArenaFullError` is raised (or ``None`` returned
by :meth:`GranuleAllocator.try_alloc`). Freeing merges the freed runs into the extent list with one sort
(``O((F + n) log(F + n))`` for ``F`` free extents and ``n`` runs, vectorised), and coalesces neighbours, so freed
runs are always reusable as one piece. Overlapping or out-of-range frees (double frees) raise ``ValueError`` and
change nothing.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple, Union

import numpy as np
import torch

from mosaickv_sglang.pool.checks import check_int

logger = logging.getLogger(__name__)

__all__ = ["ArenaFullError", "GranuleAllocator"]

ArrayLike = Union[np.ndarray, torch.Tensor]


class ArenaFullError(RuntimeError):
    """The arena cannot hold a whole batch of payloads; the allocator (and the store) are unchanged.

    Attributes
    ----------
    requested : int
        Granules the batch needed in total.
    free : int
        Free granules at the time of the request (possibly fragmented).
    largest_free : int
        Largest free extent, in granules.
    """

    def __init__(self, requested: int, free: int, largest_free: int, what: str = "arena") -> None:
        self.requested = int(requested)
        self.free = int(free)
        self.largest_free = int(largest_free)
        super().__init__(
            f"{what}: expected room for {self.requested} granules, got {self.free} free "
            f"(largest free extent {self.largest_free}); free pages or raise the arena size"
        )


def _as_int64(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.dtype.is_floating_point or x.dtype == torch.bool or x.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D integer tensor, got dtype {x.dtype} shape {list(x.shape)}")
        return x.detach().to("cpu", torch.int64).numpy().copy()
    arr = np.asarray(x)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: expected a 1-D integer array, got dtype {arr.dtype} shape {list(arr.shape)}")
    return arr.astype(np.int64, copy=True)


class GranuleAllocator:
    """Free-list allocator over ``capacity`` granules ``[0, capacity)``.

    Parameters
    ----------
    capacity : int
        Number of granules managed (``>= 0``).

    Notes
    -----
    Invariants (checked by :meth:`check_invariants`): extents sorted by start, lengths ``> 0``, no two extents
    overlapping or touching, all inside ``[0, capacity)``, and ``used + free == capacity``.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = check_int(capacity, "capacity", 0)
        self._starts = np.array([0] if capacity else [], dtype=np.int64)
        self._lens = np.array([capacity] if capacity else [], dtype=np.int64)
        self._free = capacity

    # --- accounting ----------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Granules managed."""
        return self._capacity

    @property
    def free_granules(self) -> int:
        """Granules currently free."""
        return self._free

    @property
    def used_granules(self) -> int:
        """Granules currently allocated (``capacity - free``)."""
        return self._capacity - self._free

    @property
    def num_extents(self) -> int:
        """Number of free extents (1 when the free space is one piece; a fragmentation measure)."""
        return int(self._starts.size)

    @property
    def largest_free(self) -> int:
        """Length of the largest free extent (0 when full)."""
        return int(self._lens.max()) if self._lens.size else 0

    def extents(self) -> Tuple[np.ndarray, np.ndarray]:
        """Copies of the free extents: ``(starts, lengths)``, int64 arrays sorted by start."""
        return self._starts.copy(), self._lens.copy()

    def state(self) -> Tuple[int, bytes, bytes]:
        """A hashable snapshot of the allocator (for tests: equal snapshots mean equal states)."""
        return self._free, self._starts.tobytes(), self._lens.tobytes()

    def check_invariants(self) -> None:
        """Raise ``RuntimeError`` if the free list is not sorted, disjoint, coalesced and in range."""
        s, n = self._starts, self._lens
        if s.shape != n.shape:
            raise RuntimeError("free list: expected equal start/length arrays, got mismatched sizes")
        if n.size:
            if (n <= 0).any():
                raise RuntimeError("free list: expected positive extent lengths, got a zero or negative one")
            if s[0] < 0 or s[-1] + n[-1] > self._capacity:
                raise RuntimeError(f"free list: expected extents inside [0, {self._capacity}), got one outside")
            if (s[1:] <= s[:-1] + n[:-1]).any():
                raise RuntimeError("free list: expected sorted, disjoint, non-touching extents, got a violation")
        if int(n.sum()) != self._free:
            raise RuntimeError(f"free list: expected {self._free} free granules, got {int(n.sum())} in extents")

    # --- allocation ----------------------------------------------------------------------------------------------
    def alloc(self, sizes: ArrayLike) -> np.ndarray:
        """Allocate one run per payload, all or nothing.

        Parameters
        ----------
        sizes : numpy.ndarray or torch.Tensor
            shape ``[n]``, integer; granules of each payload (``>= 1``).

        Returns
        -------
        numpy.ndarray
            shape ``[n]``, dtype ``int64``; the first granule of each payload's run.

        Raises
        ------
        ArenaFullError
            The batch does not fit as a whole; nothing was allocated.
        ValueError
            A size is not positive.
        """
        out = self.try_alloc(sizes)
        if out is None:
            total = int(_as_int64(sizes, "sizes").sum())
            raise ArenaFullError(total, self._free, self.largest_free)
        return out

    def try_alloc(self, sizes: ArrayLike) -> Optional[np.ndarray]:
        """Like :meth:`alloc`, but returns ``None`` instead of raising :class:`ArenaFullError`."""
        sz = _as_int64(sizes, "sizes")
        n = sz.size
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        if (sz < 1).any():
            raise ValueError(f"sizes: expected every payload >= 1 granule, got minimum {int(sz.min())}")
        total = int(sz.sum())
        start = self.try_carve(total)
        if start is not None:  # payloads adjacent
            return start + np.cumsum(sz) - sz
        if total > self._free:
            return None
        placed = self._first_fit_decreasing(sz)
        if placed is None:
            return None
        offsets, new_starts, new_lens = placed
        self._commit(new_starts, new_lens, total)
        return offsets

    def try_carve(self, total: int) -> Optional[int]:
        """Carve one run of ``total`` granules (``>= 1``) from the smallest free extent that holds it, the first choice
        of :meth:`try_alloc`: its first granule, or ``None`` (nothing changed) when no extent holds it. A caller that
        has the prefix sums of a batch's sizes places the batch with one call (``start + offsets``)."""
        if total > self._free or total < 1:
            return None
        lens = self._lens
        fits = np.flatnonzero(lens >= total)
        if not fits.size:
            return None
        i = int(fits[np.argmin(lens[fits])])
        start = int(self._starts[i])
        if lens[i] == total:
            self._starts, self._lens = np.delete(self._starts, i), np.delete(lens, i)
        else:  # in place: the extent arrays are this allocator's own (extents() hands out copies)
            self._starts[i] += total
            lens[i] -= total
        self._free -= total
        return start

    def _first_fit_decreasing(self, sz: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Place payloads largest first into extents largest first; returns offsets and the new extents."""
        n = sz.size
        order = np.argsort(-sz, kind="stable")
        ssz = sz[order]
        cs = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(ssz)])
        offsets_sorted = np.full(n, -1, dtype=np.int64)
        new_starts, new_lens = self._starts.copy(), self._lens.copy()
        j = 0  # next unplaced payload (in sorted order)
        for e in np.argsort(-new_lens, kind="stable"):
            if j >= n:
                break
            length = int(new_lens[e])
            if length < int(ssz[-1]):
                break  # extents are visited largest first: nothing later fits even the smallest payload
            # longest prefix of ssz[j:] whose sum fits in this extent
            k = int(np.searchsorted(cs, cs[j] + length, side="right")) - 1
            if k > j:
                offsets_sorted[j:k] = int(new_starts[e]) + cs[j:k] - cs[j]
                used = int(cs[k] - cs[j])
                new_starts[e] += used
                new_lens[e] -= used
                j = k
        if j < n:  # leftovers: per-payload first fit (address order) into the remaining pieces
            for idx in range(j, n):
                need = int(ssz[idx])
                hit = np.nonzero(new_lens >= need)[0]
                if hit.size == 0:
                    return None
                e = int(hit[0])
                offsets_sorted[idx] = new_starts[e]
                new_starts[e] += need
                new_lens[e] -= need
        offsets = np.empty(n, dtype=np.int64)
        offsets[order] = offsets_sorted
        return offsets, new_starts, new_lens

    def _commit(self, new_starts: np.ndarray, new_lens: np.ndarray, total: int) -> None:
        keep = new_lens > 0
        self._starts = new_starts[keep]
        self._lens = new_lens[keep]
        self._free -= total

    def pack(self) -> None:
        """Record that every allocated run was moved to the front (a compaction): the free granules become the one
        extent ``[used, capacity)``. The caller moves the data and the runs' offsets."""
        used = self.used_granules
        self._starts = np.array([used] if self._free else [], dtype=np.int64)
        self._lens = np.array([self._free] if self._free else [], dtype=np.int64)

    # --- freeing -------------------------------------------------------------------------------------------------
    def free(self, offsets: ArrayLike, sizes: ArrayLike) -> None:
        """Return runs to the free list, coalescing neighbours.

        Parameters
        ----------
        offsets : numpy.ndarray or torch.Tensor
            shape ``[n]``, integer; first granule of each run (as returned by :meth:`alloc`).
        sizes : numpy.ndarray or torch.Tensor
            shape ``[n]``, integer; granules of each run (``>= 1``).

        Raises
        ------
        ValueError
            Shapes differ, a run is empty or outside the arena, runs overlap each other, or a run overlaps free
            space (a double free). Nothing changes in that case.
        """
        off = _as_int64(offsets, "offsets")
        sz = _as_int64(sizes, "sizes")
        if off.shape != sz.shape:
            raise ValueError(f"sizes: expected shape {list(off.shape)} (that of offsets), got {list(sz.shape)}")
        if off.size == 0:
            return
        if (sz < 1).any():
            raise ValueError(f"sizes: expected every run >= 1 granule, got minimum {int(sz.min())}")
        if (off < 0).any() or (off + sz > self._capacity).any():
            raise ValueError(f"offsets: expected runs inside [0, {self._capacity}), got a run outside the arena")
        starts = np.concatenate([self._starts, off])
        lens = np.concatenate([self._lens, sz])
        order = np.argsort(starts, kind="stable")
        starts, lens = starts[order], lens[order]
        ends = starts + lens
        if (ends[:-1] > starts[1:]).any():
            raise ValueError("offsets: expected allocated runs, got a run that overlaps free space or another run "
                             "(double free)")  # fmt: skip
        # coalesce: a new group starts wherever the previous extent does not end exactly here
        new_group = np.ones(starts.size, dtype=bool)
        new_group[1:] = ends[:-1] != starts[1:]
        first = np.nonzero(new_group)[0]
        last = np.concatenate([first[1:] - 1, np.array([starts.size - 1], dtype=np.int64)])
        self._starts = starts[first]
        self._lens = ends[last] - starts[first]
        self._free += int(sz.sum())
