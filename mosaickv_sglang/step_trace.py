# SPDX-License-Identifier: Apache-2.0
"""A row per scheduler step, for finding what the slow decode steps share (``MOSAICKV_STEP_TRACE=<prefix>``).

The decode step histogram (:mod:`mosaickv_sglang.step_timer`) says how long the slow steps are, not why. With
``MOSAICKV_STEP_TRACE`` set, each scheduler process writes ``<prefix>.<pid>.csv``: at every ``Scheduler.run_batch`` the
clock, the batch's mode, size and total context, and the running counts of the sealer's GPU work (seal calls, seals,
packs and layer slices beside a step or after a launch, pages sealed, packs that waited for their planner), the
sidecar's plans applied and the collector's garbage collections. ``python -m bench.step_trace`` turns the rows into
decode step periods (the step timer's own rule) and sets the slow ones beside the work launched around them. A stock
server (no ``--kv-compressor``) writes the same rows with the MosaicKV counts left empty, so both can be read the same
way.

Rows are written in blocks, at most every :data:`FLUSH_SECONDS` on the scheduler thread, and when the scheduler goes
idle (``patches/metrics.py``): a load's last steps are on disk before the next load starts.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any, Callable, List, Optional

__all__ = ["FIELDS", "FLUSH_SECONDS", "SEALER_COUNTS", "STEP_TRACE_ENV", "StepTrace", "step_trace_prefix"]

STEP_TRACE_ENV = "MOSAICKV_STEP_TRACE"
FLUSH_SECONDS = 1.0
# running counts read off the Sealer, in the order they are written
SEALER_COUNTS = ("seal_calls", "side_seals", "async_seals", "packs_after_launch", "starts_after_launch",
                 "slices_after_launch", "pages_sealed", "packs_waited")  # fmt: skip
FIELDS = ("t", "decode", "overlapped", "batch_size", "context_tokens") + SEALER_COUNTS + ("plans_applied",
                                                                                          "gc_collections")


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
    """

    def __init__(self, path: str, clock: Callable[[], float] = time.perf_counter) -> None:
        self.path = path
        self._clock = clock
        self._rows: List[str] = []
        self._flushed_at = clock()
        if not os.path.exists(path):
            with open(path, "w") as f:
                f.write(",".join(FIELDS) + "\n")

    def record(self, is_decode: bool, overlapped: bool, batch_size: int, context_tokens: int,
               sealer: Any = None) -> None:  # fmt: skip
        """A row for the step starting now; ``sealer`` (a :class:`~mosaickv_sglang.sealer.Sealer`, or ``None`` on
        a stock server) gives the running counts."""
        now = self._clock()
        counts = ["" for _ in SEALER_COUNTS]
        applied = ""
        if sealer is not None:
            counts = [str(int(getattr(sealer, name))) for name in SEALER_COUNTS]
            sidecar = getattr(sealer, "sidecar", None)
            applied = "" if sidecar is None else str(int(sidecar.plans_applied))
        self._rows.append(",".join([f"{now:.6f}", str(int(is_decode)), str(int(overlapped)), str(int(batch_size)),
                                    str(int(context_tokens))] + counts + [applied, str(_gc_collections())]))
        if now - self._flushed_at >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Append the rows kept so far."""
        self._flushed_at = self._clock()
        if not self._rows:
            return
        rows, self._rows = self._rows, []
        with open(self.path, "a") as f:
            f.write("\n".join(rows) + "\n")
