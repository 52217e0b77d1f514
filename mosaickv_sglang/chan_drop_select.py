# SPDX-License-Identifier: Apache-2.0
"""Pick, on the server's own GPU, the fastest way the seal planner finds each vector's top channels.

:func:`~mosaickv_sglang.planner._chan_drop_masks` has three methods (torch's top-k of int64 keys, a full sort of
them, the Triton rank kernel) that give the same masks bit for bit; which is fastest depends on the GPU and the
libraries. The attention backend calls :func:`select_chan_drop_method` once at startup on CUDA: it times each method
on synthetic vectors of the server's head dim and segment size and makes the fastest the planner's default
(:data:`~mosaickv_sglang.planner.CHAN_DROP_METHOD_ON_CUDA`). Plans do not depend on the choice, so tensor-parallel
ranks that choose differently still take the same decisions. ``MOSAICKV_CHAN_DROP=topk|sort|kernel`` fixes the method
without timing; ``auto`` (the default) times.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Dict, Optional, Sequence

import torch

from mosaickv_sglang import planner
from mosaickv_sglang.device_timer import best_seconds_in_rounds
from mosaickv_sglang.startup_choice import choose_fastest

logger = logging.getLogger(__name__)

__all__ = ["ENV_VAR", "select_chan_drop_method", "time_chan_drop_methods"]

ENV_VAR = "MOSAICKV_CHAN_DROP"
TIMED_SEGMENTS = 1024  # a chunk of a typical seal: 16 pages x 8 KV heads x 8 layers
TIMED_REPEATS = 3


def time_chan_drop_methods(
    device: torch.device,
    head_dim: int,
    seg_size: int,
    methods: Sequence[str] = planner.CHAN_DROP_METHODS,
    segments: int = TIMED_SEGMENTS,
    repeats: int = TIMED_REPEATS,
) -> Dict[str, float]:
    """Seconds of one ``_chan_drop_masks`` call per method on ``[segments, seg_size, head_dim]`` fp16-rounded
    vectors (the best of ``repeats`` rounds that time every method once, after one untimed call each, which also
    compiles the kernel). A method that raises is logged and left out; so is the kernel where the head dim has no
    variant."""

    def failed(method: str) -> None:
        logger.warning("MosaicKV: chan drop method %s failed on %s; not chosen", method, device, exc_info=True)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(segments, seg_size, head_dim, generator=gen).half().float().to(device)
    w = torch.rand(segments, head_dim, generator=gen).to(device)
    ks = sorted({max(1, head_dim // 8), max(1, head_dim // 4), max(1, head_dim // 2)})
    calls: Dict[str, Callable[[], object]] = {}
    for method in methods:
        if method == "kernel" and head_dim not in planner._CHAN_RANK_HEAD_DIMS:
            continue
        call = functools.partial(planner._chan_drop_masks, x, w, ks, method=method)
        try:
            call()
        except Exception:  # noqa: BLE001 - a method that cannot run here is not chosen; the others still can be
            failed(method)
            continue
        calls[method] = call
    return best_seconds_in_rounds(calls, device, repeats, on_error=failed)


def select_chan_drop_method(
    device: torch.device,
    head_dim: int,
    seg_size: int,
    timings: Optional[Dict[str, float]] = None,
) -> str:
    """Set :data:`~mosaickv_sglang.planner.CHAN_DROP_METHOD_ON_CUDA` to ``MOSAICKV_CHAN_DROP``'s method, or else to
    the fastest of ``timings`` (default: :func:`time_chan_drop_methods` on ``device``); returns it. With no timing
    (every method failed) the default stays."""
    planner.CHAN_DROP_METHOD_ON_CUDA = choose_fastest(
        "chan drop", ENV_VAR, planner.CHAN_DROP_METHODS, planner.CHAN_DROP_METHOD_ON_CUDA, device,
        lambda: time_chan_drop_methods(device, head_dim, seg_size), timings,
    )  # fmt: skip
    return planner.CHAN_DROP_METHOD_ON_CUDA
