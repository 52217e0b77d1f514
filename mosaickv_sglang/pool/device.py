# SPDX-License-Identifier: Apache-2.0
"""Copies between host and device that do not make the host wait, through page-locked memory allocated once.

A copy from pageable memory waits until every queued kernel is done, so a host tensor bound for CUDA is first staged
in page-locked memory. Staging it with ``x.pin_memory()`` asks torch's caching host allocator for a block each time,
and that allocator hands a freed block out again only once the events behind it are done, taking them in the order
they were recorded: one copy queued behind a seal's kernels on a side stream (tens of milliseconds) holds back every
block freed after it, and each later copy page-locks fresh memory (``cudaHostAlloc``, which the sidecar's copies
paid up to 26 ms a seal for in the twenty-second GPU run). A decode plan makes four such copies.

:class:`PinnedRing` stages them instead in one arena page-locked once per device: each copy takes the next slice of
it, and a slice is written again only once the event recorded after its last copy is done (so a slow stream holds
back only its own slices). A copy the ring cannot place now (larger than an eighth of it, the free part held by copies
still in flight, a stream capturing a CUDA graph) takes the caching allocator's path as before.

Reads the other way, which the host waits for anyway (a decode plan's batch rows), land in :class:`HostLanding`'s
buffer, page-locked once and grown by doubling, instead of two freshly page-locked buffers a plan.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["ALIGN_BYTES", "HostLanding", "PinnedRing", "RING_BYTES", "copy_seconds", "host_landing", "pinned_ring",
           "ring_status", "to_device", "with_index"]

ALIGN_BYTES = 256  # each slice starts here, aligned for a view of any dtype
RING_BYTES = 8 << 20  # a decode plan of 16 requests stages about 40 KiB: the ring holds some 200 plans
MAX_IN_FLIGHT = 256  # copies listed before the done ones behind a slow one are dropped


class PinnedRing:
    """One page-locked arena lent in order, slice after slice, for host-to-device copies.

    Parameters
    ----------
    capacity_bytes : int
        Bytes of the arena, allocated at once: a multiple of :data:`ALIGN_BYTES`, at least 8 units.
    pin : bool
        Page-lock the arena (``True`` needs CUDA; ``False`` serves tests on the CPU).
    new_event : callable
        Makes the event recorded after each copy, with ``record(stream)`` and ``query()`` (default
        ``torch.cuda.Event``; tests pass their own).

    Attributes
    ----------
    copies : int
        Copies staged in the ring.
    passed : int
        Copies it could not place (too large, or the slice's previous copy still in flight), left to the caller.
    """

    def __init__(self, capacity_bytes: int = RING_BYTES, pin: bool = True,
                 new_event: Optional[Callable[[], Any]] = None) -> None:  # fmt: skip
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or (
            capacity_bytes < 8 * ALIGN_BYTES or capacity_bytes % ALIGN_BYTES
        ):
            raise ValueError(f"capacity_bytes: expected a multiple of {ALIGN_BYTES} bytes >= {8 * ALIGN_BYTES}, "
                             f"got {capacity_bytes!r}")  # fmt: skip
        self.capacity_bytes = capacity_bytes
        self._arena = torch.empty(capacity_bytes, dtype=torch.uint8, pin_memory=pin)
        self._new_event = new_event if new_event is not None else torch.cuda.Event
        self._head = 0
        self._in_flight: Deque[Tuple[int, int, Any]] = collections.deque()  # (start, end, event), oldest first
        self._lock = threading.Lock()
        self.copies = 0
        self.passed = 0

    def copy_to(self, x: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
        """``x`` (on the host) copied to ``device`` through the ring on the device's current stream, without
        waiting; ``None`` when the ring cannot place it now (nothing done, counted in :attr:`passed`)."""
        if x.numel() == 0:
            return torch.empty(x.shape, dtype=x.dtype, device=device)
        nbytes = x.numel() * x.element_size()
        span = -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES
        with self._lock:
            start = self._place(span)
            if start is None:
                self.passed += 1
                return None
            staged = self._arena[start : start + nbytes].view(x.dtype).view(x.shape)
            staged.copy_(x)
            out = torch.empty(x.shape, dtype=x.dtype, device=device)
            out.copy_(staged, non_blocking=device.type == "cuda")
            event = self._new_event()
            event.record(torch.cuda.current_stream(device) if device.type == "cuda" else None)
            self._in_flight.append((start, start + span, event))
            self._head = start + span
            self.copies += 1
            return out

    def _place(self, span: int) -> Optional[int]:
        """Start of the next free ``span`` bytes (after the last slice, or from 0 when the end is too near), or
        ``None`` when it is too large or still read by a copy in flight."""
        if span > self.capacity_bytes // 8:
            return None
        while self._in_flight and self._in_flight[0][2].query():
            self._in_flight.popleft()
        if len(self._in_flight) > MAX_IN_FLIGHT:  # behind a slow copy: drop the done ones further on
            self._in_flight = collections.deque(c for c in self._in_flight if not c[2].query())
        start = self._head if self._head + span <= self.capacity_bytes else 0
        end = start + span
        for s, e, event in self._in_flight:
            if s < end and start < e and not event.query():
                return None
        return start


class HostLanding:
    """One page-locked buffer that device-to-host reads land in, for callers that wait for their copies and copy the
    results out before the next read: grown by doubling when a read needs more (rarely, after the first reads), never
    freed.

    Parameters
    ----------
    pin : bool
        Page-lock the buffer (``True`` needs CUDA; ``False`` serves tests on the CPU).
    capacity_bytes : int
        Bytes of the first buffer (allocated at the first read).
    """

    def __init__(self, pin: bool = True, capacity_bytes: int = 1 << 20) -> None:
        self.pin = bool(pin)
        self.capacity_bytes = max(ALIGN_BYTES, int(capacity_bytes))
        self._buffer: Optional[torch.Tensor] = None
        self.lock = threading.Lock()
        self.grown = 0

    def views(self, specs: Sequence[Tuple[Sequence[int], torch.dtype]]) -> List[torch.Tensor]:
        """Views of the buffer, one per ``(shape, dtype)`` of ``specs``, none overlapping; valid until the next call.
        Hold :attr:`lock` from this call until the results are copied out."""
        sizes = [math.prod(shape) * dtype.itemsize for shape, dtype in specs]
        offsets, end = [], 0
        for nbytes in sizes:
            offsets.append(end)
            end += -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES
        if self._buffer is None or end > self._buffer.numel():
            while self.capacity_bytes < end:
                self.capacity_bytes *= 2
            self._buffer = torch.empty(self.capacity_bytes, dtype=torch.uint8, pin_memory=self.pin)
            self.grown += 1
        return [self._buffer[off : off + nbytes].view(dtype).view(tuple(shape))
                for off, nbytes, (shape, dtype) in zip(offsets, sizes, specs)]  # fmt: skip


_landings: Dict[torch.device, HostLanding] = {}
_rings: Dict[torch.device, PinnedRing] = {}
_registry_lock = threading.Lock()
_copy_seconds = [0.0]  # host time of every copy to CUDA so far, all threads


def copy_seconds() -> float:
    """Host seconds spent staging and queueing copies to CUDA in this process so far (a plan's share is a
    difference)."""
    return _copy_seconds[0]


def _of_device(registry: Dict[torch.device, Any], device: torch.device, make: Callable[[], Any]) -> Any:
    with _registry_lock:
        if device not in registry:
            registry[device] = make()
        return registry[device]


def pinned_ring(device: torch.device) -> PinnedRing:
    """The ring of CUDA ``device`` (page-locked at its first copy, kept for the process)."""
    return _of_device(_rings, device, PinnedRing)


def host_landing(device: torch.device) -> HostLanding:
    """The landing buffer of CUDA ``device``'s reads (page-locked at its first read, kept for the process)."""
    return _of_device(_landings, device, HostLanding)


def with_index(device: Union[torch.device, str]) -> torch.device:
    """``device``, a CUDA one with its index (the current device's when it has none): the key of its ring and
    landing."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def ring_status(device: Union[torch.device, str]) -> str:
    """``"pinned ring: C copies, P past it"`` for ``device``'s ring, ``""`` before its first copy (or off CUDA)."""
    ring = _rings.get(with_index(device))
    return "" if ring is None else f"pinned ring: {ring.copies} copies, {ring.passed} past it"


def to_device(x: torch.Tensor, device: Union[torch.device, str]) -> torch.Tensor:
    """``x`` on ``device`` without the host waiting for it: a host tensor bound for CUDA is staged in page-locked
    memory (:class:`PinnedRing`, else ``pin_memory``) and copied with ``non_blocking=True``. The copy is ordered on the
    current stream like any kernel, so later kernels read it whole."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        t0 = time.perf_counter()
        device = with_index(device)
        out = None
        if not torch.cuda.is_current_stream_capturing():
            out = pinned_ring(device).copy_to(x, device)
        if out is None:
            out = x.pin_memory().to(device, non_blocking=True)
        _copy_seconds[0] += time.perf_counter() - t0
        return out
    return x.to(device)
