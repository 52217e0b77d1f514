# SPDX-License-Identifier: Apache-2.0
"""Host memory for the sidecar bridge's device-to-host copies: one arena page-locked once, before serving, handed out
in slices.

Each sealed batch's copies to the host need page-locked memory (an asynchronous copy cannot target pageable memory).
Page-locking it while serving stalls the scheduler: allocating per batch cost most of a seal's submission in the
twenty-second GPU run (170 of the 183 stack samples of ``submit_sealed`` on the 8B shape's ITL load, about 26 ms a
seal: torch's caching host allocator keeps its free blocks in exact power-of-two bins), and reused buffers still
page-locked fresh memory whenever batches grew (cold pages, shared pages' host copies of every layer) or several were
lent at once while the sidecar was busy: 363 of 609 stack samples of the scheduler's ``finish_seal`` on the 8B load
were that allocation, about 15 ms of a seal's host time inside one decode step.

Here the whole capacity is allocated (and page-locked) when the staging is built, at server start, and never again. A
take is a slice of it (its offset aligned to :data:`ALIGN_BYTES`, so that a view of any dtype is aligned), the lowest
free run that holds it (first fit; runs given back merge with their free neighbours, in any order); a take that finds
no run large enough is refused (``None``), and the bridge then leaves the batch to its fast plans: the queue is
bounded, and when it is full the fast plan stays.
"""

from __future__ import annotations

import bisect
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["ALIGN_BYTES", "PinnedStaging"]

ALIGN_BYTES = 256


def _span(nbytes: int) -> int:
    """Bytes of the arena a slice of ``nbytes`` occupies: whole aligned units, at least one (an empty slice too, so
    that every slice lent starts at its own offset)."""
    return max(1, -(-nbytes // ALIGN_BYTES)) * ALIGN_BYTES


class PinnedStaging:
    """A fixed arena of host memory (page-locked with ``pin``) lent in aligned slices.

    Parameters
    ----------
    pin : bool
        Page-lock the arena (``True`` needs CUDA; ``False`` serves tests on the CPU).
    capacity_bytes : int
        Bytes of the arena, allocated at once: a multiple of :data:`ALIGN_BYTES`, at least one unit.

    Attributes
    ----------
    capacity_bytes : int
    lent_bytes : int
        Bytes of the arena in slices taken and not given back (each rounded up to whole :data:`ALIGN_BYTES` units).
    peak_lent_bytes : int
        The most :attr:`lent_bytes` so far.
    refusals : int
        Takes refused for want of a free run large enough (a :meth:`take_all` counts once).
    """

    def __init__(self, pin: bool, capacity_bytes: int) -> None:
        if capacity_bytes < ALIGN_BYTES or capacity_bytes % ALIGN_BYTES:
            raise ValueError(f"capacity_bytes: expected a multiple of {ALIGN_BYTES} bytes >= {ALIGN_BYTES}, "
                             f"got {capacity_bytes}")  # fmt: skip
        self.pin = bool(pin)
        self.capacity_bytes = int(capacity_bytes)
        self._arena = torch.empty(self.capacity_bytes, dtype=torch.uint8, pin_memory=self.pin)
        self._storage = self._arena.untyped_storage().data_ptr()
        self._free: List[Tuple[int, int]] = [(0, self.capacity_bytes)]  # [start, end) runs, sorted, never adjacent
        self._lent: Dict[int, Tuple[int, int]] = {}  # offset -> (span, bytes asked) of each slice lent
        self.lent_bytes = 0
        self.peak_lent_bytes = 0
        self.refusals = 0

    @property
    def lent(self) -> int:
        """Slices taken and not given back."""
        return len(self._lent)

    @property
    def free_bytes(self) -> int:
        """Bytes not lent (possibly in several runs: a take needs one run that holds it)."""
        return self.capacity_bytes - self.lent_bytes

    @property
    def largest_free_bytes(self) -> int:
        """The longest free run: the largest slice a take gets now."""
        return max((end - start for start, end in self._free), default=0)

    def take(self, numel: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """A ``[numel]`` view of ``dtype`` on a free slice of the arena, or ``None`` when no free run holds it (never
        allocates). Give it back with :meth:`give_back` once nothing reads it (nor a copy into it is still
        running)."""
        got = self.take_all([(numel, dtype)])
        return None if got is None else got[0]

    def take_all(self, requests: Sequence[Tuple[int, torch.dtype]]) -> Optional[List[torch.Tensor]]:
        """:meth:`take` of every ``(numel, dtype)`` of ``requests``, in order, or of none (``None``, one refusal)."""
        sizes = [self._nbytes(numel, dtype) for numel, dtype in requests]
        spans = [_span(n) for n in sizes]
        offsets = self._place(spans)
        if offsets is None:
            self.refusals += 1
            return None
        views = []
        for off, span, n, (_, dtype) in zip(offsets, spans, sizes, requests):
            self._lent[off] = (span, n)
            views.append(self._arena[off : off + n].view(dtype))
        self.lent_bytes += sum(spans)
        self.peak_lent_bytes = max(self.peak_lent_bytes, self.lent_bytes)
        return views

    def fits(self, requests: Sequence[Tuple[int, torch.dtype]]) -> bool:
        """Whether :meth:`take_all` of ``requests`` would succeed now (takes nothing, counts no refusal)."""
        spans = [_span(self._nbytes(numel, dtype)) for numel, dtype in requests]
        offsets = self._place(spans)
        if offsets is None:
            return False
        for off, span in zip(offsets, spans):
            self._release(off, span)
        return True

    def give_back(self, view: torch.Tensor) -> None:
        """Return the slice that :meth:`take` or :meth:`take_all` handed out as ``view``; it is free for the next
        take at once."""
        off = view.storage_offset() * view.element_size()  # (an empty view's data_ptr is 0: its offset still counts)
        lent = self._lent.get(off) if view.untyped_storage().data_ptr() == self._storage else None
        if lent is None or lent[1] != view.numel() * view.element_size():
            raise ValueError("view: expected a view taken from this staging and not given back yet, got "
                             f"{view.numel()} elements of {view.dtype}")  # fmt: skip
        del self._lent[off]
        self._release(off, lent[0])
        self.lent_bytes -= lent[0]

    @staticmethod
    def _nbytes(numel: int, dtype: torch.dtype) -> int:
        if numel < 0:
            raise ValueError(f"numel: expected elements >= 0, got {numel}")
        return int(numel) * dtype.itemsize

    def _place(self, spans: Sequence[int]) -> Optional[List[int]]:
        """Carve ``spans`` out of the free runs, each from the lowest run that holds it; all or none (``None``)."""
        offsets: List[int] = []
        for span in spans:
            i = next((i for i, (start, end) in enumerate(self._free) if end - start >= span), None)
            if i is None:
                for off, taken in zip(reversed(offsets), reversed(spans[: len(offsets)])):
                    self._release(off, taken)
                return None
            start, end = self._free[i]
            if end - start == span:
                del self._free[i]
            else:
                self._free[i] = (start + span, end)
            offsets.append(start)
        return offsets

    def _release(self, start: int, span: int) -> None:
        """Free ``[start, start + span)``, merged with the free runs it touches."""
        end = start + span
        i = bisect.bisect_left(self._free, (start, end))
        if i < len(self._free) and self._free[i][0] == end:
            end = self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][1] == start:
            i -= 1
            start = self._free.pop(i)[0]
        self._free.insert(i, (start, end))
