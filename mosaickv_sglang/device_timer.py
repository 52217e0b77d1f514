# SPDX-License-Identifier: Apache-2.0
"""Seconds per call of a function on a device: CUDA events on a GPU (the host does not wait between calls), the
wall clock on the CPU. Used by the startup choices that time alternatives on the server's own GPU."""

from __future__ import annotations

import time
from typing import Callable

import torch

__all__ = ["seconds_per_call"]


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
