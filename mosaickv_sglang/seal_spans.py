# SPDX-License-Identifier: Apache-2.0
"""How long the seals' device work took on the GPU, against the scheduler time they took.

A seal's scheduler time (:attr:`~mosaickv_sglang.sealer.Sealer.seal_seconds`) is host work: the planner's launches,
its reads of device values (each a wait for the device work queued before it) and the pack's launch. It does not
say which of those the time went to. :class:`SealSpans` records a CUDA event on the seal's stream when a seal starts
and one when it ends, and adds up the elapsed time between the two of every seal whose events have completed,
without waiting for any: a GPU span close to the scheduler time means the seal waits for its device work (make the
work smaller, or stop waiting for it); a span far below it means the host is the bound (launches, Python).

The span of a seal beside the step in flight starts when its side stream has waited for the previous plan, and
includes the time its kernels shared the GPU with that step.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

__all__ = ["SealSpans"]

# Seals whose spans are not yet collected, at most: older ones are dropped uncounted (spans collected at each status
# line; a status line every few seconds and seals of tens of milliseconds stay far below).
MAX_PENDING = 4096


class SealSpans:
    """Event pairs around each seal on a CUDA device; nothing elsewhere.

    Parameters
    ----------
    device : torch.device
        The pool's device; on any other than CUDA every method does nothing and :attr:`gpu_seconds` stays 0.

    Attributes
    ----------
    gpu_seconds : float
        The summed spans of the seals collected so far.
    seals_timed : int
        How many seals those are.
    dropped : int
        Seals whose events were dropped uncollected (more than :data:`MAX_PENDING` pending).
    """

    def __init__(self, device: torch.device) -> None:
        self.enabled = torch.device(device).type == "cuda"
        self.gpu_seconds = 0.0
        self.seals_timed = 0
        self.dropped = 0
        self._pending: List[Tuple[object, object]] = []
        self._open: Optional[object] = None

    def begin(self) -> None:
        """A seal starts: record an event on the current stream."""
        if not self.enabled:
            return
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        self._open = start

    def end(self) -> None:
        """The seal begun last ends (on the same stream): record its end event."""
        if not self.enabled or self._open is None:
            return
        stop = torch.cuda.Event(enable_timing=True)
        stop.record()
        self._pending.append((self._open, stop))
        self._open = None
        if len(self._pending) > MAX_PENDING:
            self.dropped += len(self._pending) - MAX_PENDING
            del self._pending[: len(self._pending) - MAX_PENDING]

    def collect(self) -> float:
        """Add the spans of the seals whose end events have completed (in order, stopping at the first that has
        not: no wait) to :attr:`gpu_seconds`; returns it."""
        done = 0
        for start, stop in self._pending:
            if not stop.query():
                break
            self.gpu_seconds += start.elapsed_time(stop) / 1e3
            self.seals_timed += 1
            done += 1
        del self._pending[:done]
        return self.gpu_seconds
