# SPDX-License-Identifier: Apache-2.0
"""Decode step times as users feel them: the period between the starts of two consecutive decode steps.

A period counts only when both steps are decode steps, so it holds everything the scheduler loop does between them
(receiving requests, scheduling, sealing, the sidecar's plan swaps, the forward and the sampling) but never a prefill
chunk: its p99 is the decode tail that MosaicKV's own work adds, which a client-side inter-token latency mixes with
the prefills of other requests. Under SGLang's overlap scheduler a step is launched before the loop waits for the
result of the step before it, so the period from the first decode after a prefill to the next decode holds that
prefill's GPU time: such periods are kept apart (:meth:`DecodeStepTimer.drain_behind_prefill`). The scheduler hook
that feeds it is ``patches/metrics.py``; the periods reach Prometheus as the histograms
``sglang:mosaic_decode_step_seconds`` and ``sglang:mosaic_decode_step_behind_prefill_seconds``
(:data:`DECODE_STEP_BUCKETS`).
"""

from __future__ import annotations

import time
from typing import Callable, List, Optional, Tuple

__all__ = ["DECODE_STEP_BUCKETS", "DecodeStepTimer", "histogram_quantile"]


def _geometric(lo: float, hi: float, ratio: float) -> Tuple[float, ...]:
    bounds = [lo]
    while bounds[-1] < hi:
        bounds.append(bounds[-1] * ratio)
    return tuple(round(b, 7) for b in bounds)


# 0.5 ms to about 5 s, each bound 5% above the last: a quantile read from the buckets is off by under 5%, finer
# than the 10% that a "p99 within 10% of p50" criterion needs.
DECODE_STEP_BUCKETS: Tuple[float, ...] = _geometric(0.0005, 5.0, 1.05)


class DecodeStepTimer:
    """Periods between consecutive decode-step starts, kept until :meth:`drain` takes them.

    Parameters
    ----------
    clock : callable
        Seconds, monotonic (default ``time.perf_counter``).
    max_pending : int
        Periods kept between two drains, in each of the two lists; older ones are dropped first (a scheduler whose
        metrics are never read must not grow without bound).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter, max_pending: int = 65536) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending: expected >= 1, got {max_pending}")
        self._clock = clock
        self._max_pending = int(max_pending)
        self._last_decode_start: Optional[float] = None
        self._decode_before_last = False
        self._pending: List[float] = []
        self._behind_prefill: List[float] = []
        self.dropped = 0

    def step(self, is_decode: bool, overlapped: bool = False) -> Optional[float]:
        """Mark the start of a step; returns the decode step period it closes (``None`` unless this and the last
        were decode steps and, with ``overlapped``, the step before the last one was a decode step too).

        ``overlapped``: the scheduler launches this step before it waits for the result of the last one (SGLang's
        overlap scheduler). The period closed here then holds the wait for the result of the step launched before
        the last one; when that step was not a decode step, the period is kept for
        :meth:`drain_behind_prefill` instead.
        """
        now = self._clock()
        last, self._last_decode_start = self._last_decode_start, (now if is_decode else None)
        decode_before_last, self._decode_before_last = self._decode_before_last, last is not None
        if not is_decode or last is None:
            return None
        period = now - last
        if overlapped and not decode_before_last:
            self._keep(self._behind_prefill, period)
            return None
        self._keep(self._pending, period)
        return period

    def _keep(self, pending: List[float], period: float) -> None:
        if len(pending) >= self._max_pending:
            n = max(1, len(pending) // 2)
            del pending[:n]
            self.dropped += n
        pending.append(period)

    def drain(self) -> List[float]:
        """The decode step periods since the last drain, oldest first."""
        out, self._pending = self._pending, []
        return out

    def drain_behind_prefill(self) -> List[float]:
        """The periods since the last drain that waited for a prefill's result (overlapped steps only), oldest
        first."""
        out, self._behind_prefill = self._behind_prefill, []
        return out


def histogram_quantile(q: float, bounds: Tuple[float, ...], counts: List[float]) -> Optional[float]:
    """Prometheus's ``histogram_quantile``: ``counts[i]`` observations at or below ``bounds[i]`` (cumulative, the
    last bound may be ``inf``), linear within a bucket; ``None`` without observations."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q: expected a quantile in [0, 1], got {q}")
    if len(bounds) != len(counts):
        raise ValueError(f"counts: expected {len(bounds)} cumulative counts, got {len(counts)}")
    total = counts[-1] if counts else 0
    if total <= 0:
        return None
    rank = q * total
    lo_bound, lo_count = 0.0, 0.0
    for bound, count in zip(bounds, counts):
        if count >= rank:
            if bound == float("inf"):
                return lo_bound
            if count == lo_count:
                return bound
            return lo_bound + (bound - lo_bound) * (rank - lo_count) / (count - lo_count)
        lo_bound, lo_count = bound, count
    return bounds[-1]
