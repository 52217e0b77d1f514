# SPDX-License-Identifier: Apache-2.0
"""Seconds per call of a function on a device: CUDA events on a GPU (the host does not wait between calls), the
wall clock on the CPU. Used by the startup choices that time alternatives on the server's own GPU."""

from __future__ import annotations

import time
from typing import Callable, Dict, Optional, TypeVar

import torch

__all__ = ["best_seconds_in_rounds", "seconds_per_call"]

K = TypeVar("K")


def seconds_per_call(fn: Callable[[], object], device: torch.device, calls: int = 1) -> float:
    """Mean seconds of ``calls`` back-to-back calls of ``fn`` whose work runs on ``device``."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def best_seconds_in_rounds(calls: Dict[K, Callable[[], object]], device: torch.device, repeats: int, launches: int = 1,
                           on_error: Optional[Callable[[K], None]] = None) -> Dict[K, float]:  # fmt: skip
    """The best seconds per call of each of ``calls`` over ``repeats`` rounds, each round timing every call once in
    turn (``launches`` calls a timing, :func:`seconds_per_call`). Other work on the device, such as a second server
    starting beside this one, then slows a round of every candidate rather than every timing of one (timed one
    candidate after the other, a 38% slower popcount in the thirty-second run made a startup choose the slower
    register cap). A call that raises is dropped from the result; ``on_error(key)``, called inside the ``except``,
    can log it."""
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    best: Dict[K, float] = {}
    failed = set()
    for _ in range(repeats):
        for key, call in calls.items():
            if key in failed:
                continue
            try:
                seconds = seconds_per_call(call, device, launches)
            except Exception:  # noqa: BLE001 - a candidate that cannot run here is not chosen; the others still can be
                failed.add(key)
                best.pop(key, None)
                if on_error is not None:
                    on_error(key)
                continue
            best[key] = min(best.get(key, seconds), seconds)
    return best
