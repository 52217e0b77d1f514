# SPDX-License-Identifier: Apache-2.0
"""The decode plan's two reads of its batch (``req_to_token`` rows and new slots), without waiting for the step in
flight.

With SGLang's overlap scheduler (``--mosaic-overlap-schedule on``) the scheduler prepares batch N+1 on its own stream
while the forward stream still runs step N, and the attention backend plans N+1 on the forward stream. A plain
``.cpu()`` there is queued behind step N, so the plan (host work of a few milliseconds) would start only once the GPU
is idle again: in the twelfth GPU run the decode plans took 24 ms each, most of it that wait.

What the plan reads was written by the scheduler's stream only: the batch's ``req_to_token`` rows and its
``out_cache_loc`` (the allocator's new slots). So a hook before ``Scheduler.run_batch`` notes the batch
(:func:`note_scheduled_batch`: its request indices on the host, its ``out_cache_loc`` tensor and the scheduler's
current stream), and :func:`read_rows_and_slots` gathers and copies on a side stream that waits for the scheduler's
stream alone. The hook clears the note when ``run_batch`` returns, so only the plans of that batch's forward see it.
SGLang hands the ScheduleBatch's ``out_cache_loc`` to the forward batch, and its eager runner
(``EagerRunner.load_batch``: every extend, and decode batches too large for a CUDA graph) then copies the forward
batch's inputs into fixed buffers: the note serves a forward batch whose ``out_cache_loc`` is its very tensor or such
a copy (same shape and device). Any other batch, or no note, reads on the current stream as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from mosaickv_sglang.pool.device import host_landing, to_device, with_index

__all__ = ["ScheduledBatch", "clear_scheduled_batch", "note_scheduled_batch", "read_rows_and_slots",
           "scheduled_batch_for", "unmatched_reason"]  # fmt: skip


@dataclass(frozen=True)
class ScheduledBatch:
    """A batch as the scheduler launched it.

    Attributes
    ----------
    req_pool_indices : torch.Tensor
        ``[B]`` int64 on the host: the requests' ``req_to_token`` rows.
    out_cache_loc : torch.Tensor
        The new slots (the scheduler's tensor, on its device).
    stream : torch.cuda.Stream or None
        The stream that wrote ``req_to_token`` and ``out_cache_loc``; ``None`` off CUDA.
    """

    req_pool_indices: torch.Tensor
    out_cache_loc: torch.Tensor
    stream: Optional["torch.cuda.Stream"]


_scheduled: Optional[ScheduledBatch] = None
_side_streams: Dict[int, "torch.cuda.Stream"] = {}


def note_scheduled_batch(req_pool_indices: torch.Tensor, out_cache_loc: torch.Tensor,
                         stream: Optional["torch.cuda.Stream"]) -> None:  # fmt: skip
    """Remember the batch the scheduler is about to run (replaces the previous note)."""
    global _scheduled
    if req_pool_indices.device.type != "cpu":
        raise ValueError(f"req_pool_indices: expected a host tensor, got one on {req_pool_indices.device}")
    _scheduled = ScheduledBatch(req_pool_indices.to(torch.int64), out_cache_loc, stream)


def clear_scheduled_batch() -> None:
    """Forget the noted batch."""
    global _scheduled
    _scheduled = None


def _is_its_copy(loc: torch.Tensor, noted: torch.Tensor) -> bool:
    # the eager runner's buffers may hold another integer dtype
    return loc is noted or (loc.shape == noted.shape and loc.device == noted.device)


def scheduled_batch_for(out_cache_loc: Optional[torch.Tensor]) -> Optional[ScheduledBatch]:
    """The noted batch if ``out_cache_loc`` is its tensor or the eager runner's copy of it (same shape and device),
    else ``None``."""
    s = _scheduled
    if s is None or out_cache_loc is None or not _is_its_copy(out_cache_loc, s.out_cache_loc):
        return None
    return s


def unmatched_reason(out_cache_loc: Optional[torch.Tensor]) -> str:
    """Why :func:`scheduled_batch_for` finds no noted batch for ``out_cache_loc`` (``""`` when it does): ``"no
    note"`` or ``"another batch"`` (an ``out_cache_loc`` of another shape or device than the noted one)."""
    if _scheduled is None:
        return "no note"
    return "" if scheduled_batch_for(out_cache_loc) is not None else "another batch"


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _side_streams.get(index)
    if stream is None:
        stream = _side_streams[index] = torch.cuda.Stream(device=index)
    return stream


def read_rows_and_slots(req_to_token: torch.Tensor, batch: ScheduledBatch, rows: int, width: int,
                        step: int, slots: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(req_to_token[idx, :width:step], out_cache_loc[:slots])`` on the host (int64 slots), ``idx`` the batch's
    first ``rows`` request indices, ``slots`` (default ``rows``: one new token a request, as in decode; an extend
    batch passes all of its new tokens); on CUDA gathered and copied on a side stream that waits for
    ``batch.stream`` only, so the host waits for the scheduler's writes and not for the kernels queued on the
    current stream."""
    idx = batch.req_pool_indices[:rows]
    loc = batch.out_cache_loc[: rows if slots is None else slots]
    if req_to_token.device.type != "cuda" or batch.stream is None:
        return req_to_token[idx.to(req_to_token.device), :width:step].cpu(), loc.to("cpu", torch.int64)
    dev = with_index(req_to_token.device)
    side = _side_stream(dev)
    side.wait_stream(batch.stream)
    landing = host_landing(dev)
    with torch.cuda.stream(side), landing.lock:
        r = req_to_token[to_device(idx, dev), :width:step]
        host_r, host_loc = landing.views([(r.shape, r.dtype), (loc.shape, loc.dtype)])
        host_r.copy_(r, non_blocking=True)
        host_loc.copy_(loc, non_blocking=True)
        done = torch.cuda.Event()
        done.record(side)
        done.synchronize()
        return host_r.clone(), host_loc.to(torch.int64, copy=True)
