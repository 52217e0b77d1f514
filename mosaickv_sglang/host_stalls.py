# SPDX-License-Identifier: Apache-2.0
"""What made the scheduler's host slow between two status lines: the slowest decode plans with their sealing,
sidecar, row-reading (the plan's wait for the device), garbage-collection and copy-staging parts, and Python's
garbage-collection pauses.

A decode step's p99 far above its p50 (issue #5's target is p99 within 10% of p50) comes from a few slow steps; the
decode-step histogram shows how slow, not why. :class:`HostStalls` keeps the few slowest decode plans since the last
status line (the plan holds the step's sealing and sidecar work) and every collection's pause, which the sidecar
bridge's many small Python objects make more frequent; the sealer's status line reports both.
"""

from __future__ import annotations

import gc
import heapq
import time
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["HostStalls", "SLOWEST_PLANS"]

# Decode plans listed in a status line, the slowest first.
SLOWEST_PLANS = 3


class HostStalls:
    """The slowest decode plans and the garbage-collection pauses since the last :meth:`summary`.

    Parameters
    ----------
    keep : int
        Slowest plans kept.
    """

    def __init__(self, keep: int = SLOWEST_PLANS) -> None:
        if keep < 1:
            raise ValueError(f"keep: expected an integer >= 1, got {keep}")
        self.keep = int(keep)
        self._plans: List[Tuple[float, ...]] = []  # min-heap of (seconds, seal, sidecar, rows, gc, copies)
        self._gc_started: Optional[float] = None
        self._gc_count = 0
        self._gc_seconds = 0.0
        self._gc_longest: Tuple[float, int] = (0.0, -1)  # seconds, generation
        self.gc_seconds_total = 0.0  # every pause timed since install, never reset: a plan's share is a difference

    def note_plan(self, seconds: float, seal_seconds: float, sidecar_seconds: float, rows_seconds: float = 0.0,
                  gc_seconds: float = 0.0, copies_seconds: float = 0.0) -> None:  # fmt: skip
        """A decode plan took ``seconds``, of which sealing, the sidecar, reading the batch's rows to the host (a wait
        for the device), garbage collection and staging its copies to the device took the others (the parts may
        overlap: a seal's copies count in both)."""
        item = (float(seconds), float(seal_seconds), float(sidecar_seconds), float(rows_seconds), float(gc_seconds),
                float(copies_seconds))  # fmt: skip
        if len(self._plans) < self.keep:
            heapq.heappush(self._plans, item)
        elif item[0] > self._plans[0][0]:
            heapq.heapreplace(self._plans, item)

    def on_gc(self, phase: str, info: Dict[str, Any]) -> None:
        """A ``gc.callbacks`` entry: times each collection."""
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif phase == "stop" and self._gc_started is not None:
            pause = time.perf_counter() - self._gc_started
            self._gc_started = None
            self._gc_count += 1
            self._gc_seconds += pause
            self.gc_seconds_total += pause
            if pause > self._gc_longest[0]:
                self._gc_longest = (pause, int(info.get("generation", -1)))

    def install(self) -> None:
        """Start timing this process's garbage collections (once)."""
        if self.on_gc not in gc.callbacks:
            gc.callbacks.append(self.on_gc)

    def uninstall(self) -> None:
        """Stop timing them."""
        while self.on_gc in gc.callbacks:
            gc.callbacks.remove(self.on_gc)

    def summary(self) -> str:
        """``"; slowest decode plans ...; gc ..."`` for a status line (empty when nothing was noted), then start
        over."""
        parts = []
        if self._plans:
            plans = ", ".join(f"{1e3 * s:.1f} ms (seal {1e3 * seal:.1f}, sidecar {1e3 * side:.1f}, rows "
                              f"{1e3 * rows:.1f}, gc {1e3 * pause:.1f}, copies {1e3 * copies:.1f})"
                              for s, seal, side, rows, pause, copies in sorted(self._plans, reverse=True))  # fmt: skip
            parts.append(f"slowest decode plans {plans}")
        if self._gc_count:
            longest, gen = self._gc_longest
            parts.append(f"gc {self._gc_count} collections, {1e3 * self._gc_seconds:.1f} ms, longest "
                         f"{1e3 * longest:.1f} ms (generation {gen})")  # fmt: skip
        self._plans = []
        self._gc_count, self._gc_seconds, self._gc_longest = 0, 0.0, (0.0, -1)
        return "".join(f"; {p}" for p in parts)
