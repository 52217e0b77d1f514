# SPDX-License-Identifier: Apache-2.0
"""Host buffers for the sidecar bridge's device-to-host copies, allocated once and handed out again.

Each sealed batch's copies to the host need page-locked memory (an asynchronous copy cannot target pageable memory).
Allocating it per batch cost the scheduler most of a seal's submission in the twenty-second GPU run: 170 of the
183 stack samples of ``submit_sealed`` (2 ms each) on the 8B shape's ITL load, about 26 ms a seal, because torch's
caching host allocator keeps its free blocks in exact power-of-two bins, so a batch of another size page-locks fresh
memory. Here a batch takes the smallest free buffer that holds it, of any size, and gives it back once its copies
have been handed on; only a batch larger than every free buffer allocates.
"""

from __future__ import annotations

from typing import Dict, List

import torch

__all__ = ["PinnedStaging"]

MIN_BUFFER_BYTES = 1 << 20


class PinnedStaging:
    """Reusable host buffers (page-locked with ``pin``), each a power of two of at least :data:`MIN_BUFFER_BYTES`.

    Parameters
    ----------
    pin : bool
        Page-lock the buffers (``True`` needs CUDA; ``False`` serves tests on the CPU).
    max_free_bytes : int
        Most bytes of free buffers kept for reuse; a buffer given back beyond it is dropped.

    Attributes
    ----------
    allocations : int
        Buffers allocated so far (a take that found no free buffer large enough).
    allocated_bytes : int
        Their bytes.
    """

    def __init__(self, pin: bool, max_free_bytes: int = 1 << 30) -> None:
        if max_free_bytes < 0:
            raise ValueError(f"max_free_bytes: expected bytes >= 0, got {max_free_bytes}")
        self.pin = bool(pin)
        self.max_free_bytes = int(max_free_bytes)
        self._free: List[torch.Tensor] = []
        self._lent: Dict[int, torch.Tensor] = {}  # storage address -> buffer, of the buffers taken and not yet given back
        self.allocations = 0
        self.allocated_bytes = 0

    @property
    def free_bytes(self) -> int:
        return sum(b.numel() for b in self._free)

    @property
    def lent(self) -> int:
        """Buffers taken and not given back."""
        return len(self._lent)

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A buffer for ``numel`` elements of ``dtype``: the smallest free one that holds them, else a new one.
        Returns the ``[numel]`` view to copy into; give it back with :meth:`give_back` once nothing reads it (nor
        a copy into it is still running)."""
        if numel < 0:
            raise ValueError(f"numel: expected elements >= 0, got {numel}")
        nbytes = int(numel) * torch.empty((), dtype=dtype).element_size()
        fit = next((i for i, b in enumerate(self._free) if b.numel() >= nbytes), None)  # (kept smallest first)
        if fit is not None:
            buf = self._free.pop(fit)
        else:
            size = max(MIN_BUFFER_BYTES, 1 << max(0, nbytes - 1).bit_length())
            buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
            self.allocations += 1
            self.allocated_bytes += size
        self._lent[buf.untyped_storage().data_ptr()] = buf
        return buf[:nbytes].view(dtype)

    def give_back(self, view: torch.Tensor) -> None:
        """Return the buffer that :meth:`take` handed out as ``view``: kept for reuse while the free buffers stay
        within ``max_free_bytes`` (the largest are dropped first), else dropped."""
        buf = self._lent.pop(view.untyped_storage().data_ptr(), None)  # (an empty view's own data_ptr is 0)
        if buf is None:
            raise ValueError("view: expected a buffer taken from this staging and not given back yet")
        self._free.append(buf)
        self._free.sort(key=lambda b: b.numel())
        while self._free and self.free_bytes > self.max_free_bytes:
            self._free.pop()
