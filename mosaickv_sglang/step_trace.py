# SPDX-License-Identifier: Apache-2.0
"""A row per scheduler step, for finding what the slow decode steps share (``MOSAICKV_STEP_TRACE=<prefix>``).

The decode step histogram (:mod:`mosaickv_sglang.step_timer`) says how long the slow steps are, not why. With
``MOSAICKV_STEP_TRACE`` set, each scheduler process writes ``<prefix>.<pid>.csv``: at every ``Scheduler.run_batch`` the
clock, the batch's mode, size and total context, and the running counts of the sealer's GPU work (seal calls, seals,
packs and layer slices beside a step or after a launch, pages sealed, packs that waited for their planner, slices a pack
planned itself, packs taken sooner for a low hot pool), the sidecar's plans applied and the collector's garbage
collections. On a GPU each row also gets ``gpu_ms``: the forward stream's time from the event recorded at the previous
step's start to the one recorded at this step's, that is the GPU time of the step launched before, idle gaps included,
which host delays that the GPU does not wait for leave out. The row waits in memory until its event is done on the
device (at most the step in flight). ``python -m bench.step_trace`` turns the rows into decode step periods (the step
timer's own rule) and sets the slow ones beside the work launched around them. A stock server (no ``--kv-compressor``)
writes the same rows with the MosaicKV counts left empty, so both can be read the same way.

Rows are written in blocks, at most every :data:`FLUSH_SECONDS` on the scheduler thread, and when the scheduler goes
idle (``patches/metrics.py``): a load's last steps are on disk before the next load starts.
"""

from __future__ import annotations

import gc
import os
import time
from collections import deque
from typing import Any, Callable, Deque, List, Optional, Tuple

__all__ = ["FIELDS", "FLUSH_SECONDS", "SEALER_COUNTS", "STEP_TRACE_ENV", "StepTrace", "step_trace_prefix"]

STEP_TRACE_ENV = "MOSAICKV_STEP_TRACE"
FLUSH_SECONDS = 1.0
# running counts read off the Sealer, in the order they are written
SEALER_COUNTS = ("seal_calls", "side_seals", "async_seals", "packs_after_launch", "starts_after_launch",
                 "slices_after_launch", "pages_sealed", "packs_waited", "pack_slices_after_launch", "slices_caught_up",
                 "packs_sooner")  # fmt: skip
FIELDS = ("t", "decode", "overlapped", "batch_size", "context_tokens") + SEALER_COUNTS + ("plans_applied",
                                                                                          "gc_collections", "gpu_ms")


def step_trace_prefix() -> Optional[str]:
    """The path prefix ``MOSAICKV_STEP_TRACE`` names, or ``None`` when unset; its folder must exist."""
    prefix = os.environ.get(STEP_TRACE_ENV, "").strip()
    if not prefix:
        return None
    folder = os.path.dirname(os.path.abspath(prefix))
    if not os.path.isdir(folder):
        raise ValueError(f"{STEP_TRACE_ENV}: expected a path prefix in an existing folder, got {prefix!r}")
    return prefix


def _gc_collections() -> int:
    return sum(generation["collections"] for generation in gc.get_stats())


class StepTrace:
    """Rows of :data:`FIELDS`, appended to ``path`` (a CSV file with a header line) in blocks.

    Parameters
    ----------
    path : str
        The file; created with its header, or appended to.
    clock : callable
        Seconds, monotonic (default ``time.perf_counter``, the step timer's clock).
    new_event : callable
        A timing event (default ``torch.cuda.Event(enable_timing=True)``), made for each row recorded with a stream.
    """

    def __init__(self, path: str, clock: Callable[[], float] = time.perf_counter,
                 new_event: Optional[Callable[[], Any]] = None) -> None:  # fmt: skip
        self.path = path
        self._clock = clock
        self._new_event = new_event if new_event is not None else _timing_event
        self._rows: Deque[Tuple[List[str], Any]] = deque()  # each row's fields but gpu_ms, and its event (or None)
        self._last_event: Any = None  # the event of the last row written
        self._flushed_at = clock()
        if not os.path.exists(path):
            with open(path, "w") as f:
                f.write(",".join(FIELDS) + "\n")

    def record(self, is_decode: bool, overlapped: bool, batch_size: int, context_tokens: int,
               sealer: Any = None, stream: Any = None) -> None:  # fmt: skip
        """A row for the step starting now; ``sealer`` (a :class:`~mosaickv_sglang.sealer.Sealer`, or ``None`` on
        a stock server) gives the running counts; ``stream`` (the scheduler's forward stream, or ``None`` off a GPU)
        gets the row's timing event."""
        now = self._clock()
        event = None
        if stream is not None:
            event = self._new_event()
            event.record(stream)
        counts = ["" for _ in SEALER_COUNTS]
        applied = ""
        if sealer is not None:
            counts = [str(int(getattr(sealer, name))) for name in SEALER_COUNTS]
            sidecar = getattr(sealer, "sidecar", None)
            applied = "" if sidecar is None else str(int(sidecar.plans_applied))
        self._rows.append(([f"{now:.6f}", str(int(is_decode)), str(int(overlapped)), str(int(batch_size)),
                            str(int(context_tokens))] + counts + [applied, str(_gc_collections())], event))
        if now - self._flushed_at >= FLUSH_SECONDS:
            self.flush()

    def flush(self, wait: bool = False) -> None:
        """Append the rows kept so far, up to the first whose event the device has not reached yet (kept for the
        next flush); ``wait``: wait for those events too (for an idle scheduler, whose steps are done)."""
        self._flushed_at = self._clock()
        rows = []
        while self._rows:
            fields, event = self._rows[0]
            gpu_ms = ""
            if event is not None:
                if not event.query():
                    if not wait:
                        break
                    event.synchronize()
                if self._last_event is not None:
                    gpu_ms = f"{self._last_event.elapsed_time(event):.3f}"
                self._last_event = event
            rows.append(",".join(fields + [gpu_ms]))
            self._rows.popleft()
        if not rows:
            return
        with open(self.path, "a") as f:
            f.write("\n".join(rows) + "\n")


def _timing_event() -> Any:
    import torch

    return torch.cuda.Event(enable_timing=True)
