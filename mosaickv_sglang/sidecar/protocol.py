# SPDX-License-Identifier: Apache-2.0
"""Messages between the sidecar client (scheduler process) and the sidecar worker (CPU process).

Messages are small frozen dataclasses of ints, floats and strings; they travel over one ``multiprocessing`` pipe per
worker incarnation. Tensors never travel in a message: the client writes a job's inputs into a slot of the shared
buffers (:mod:`mosaickv_sglang.sidecar.shared_buffers`) and the message names the slot and the shapes; the worker
writes the plan into the same slot and the reply names what it wrote.

Conversation (version :data:`PROTOCOL_VERSION`)::

    worker -> client   Ready(version, pid)                 once, after the worker has imported the planner
    client -> worker   PlanRequest(job_id, slot, ...)      the slot is worker-owned from now on
    worker -> client   PlanReply(job_id, slot, status ...) the slot is client-owned again
    client -> worker   Shutdown()                          the worker exits after the current job

A version mismatch in ``Ready`` makes the client stop the worker and keep the fast planner (no sidecar).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

logger = logging.getLogger(__name__)

__all__ = [
    "PROTOCOL_VERSION",
    "REASON_SEALED",
    "REASON_RESEGMENT",
    "STATUS_OK",
    "STATUS_FAILED",
    "SegmentKey",
    "Ready",
    "PlanRequest",
    "PlanReply",
    "Shutdown",
]

PROTOCOL_VERSION = 1
"""Bumped on any change of a message's fields or of the shared-buffer layout."""

REASON_SEALED = 0
"""The job plans segments just sealed by the fast GPU planner (their first exact plan)."""
REASON_RESEGMENT = 1
"""The job re-plans prefix-shared segments with statistics merged over their readers (idle ticks)."""

STATUS_OK = 0
"""The worker wrote a plan into the slot."""
STATUS_FAILED = 1
"""The planner raised (e.g. a budget the menu cannot reach); the slot holds no plan, ``error`` says why."""


class SegmentKey(NamedTuple):
    """Identity of one segment in the KV pool, at the time its data was copied.

    Attributes
    ----------
    layer : int
        Layer id.
    head : int
        KV head.
    page : int
        Page index of the segment (a page holds ``S`` tokens; its index is the same for every layer and head).
    generation : int
        The page's generation counter when the data was copied. The pool bumps it whenever the page is freed or
        reused, so a plan whose key carries an older generation belongs to data that no longer exists and is
        discarded.
    """

    layer: int
    head: int
    page: int
    generation: int


@dataclass(frozen=True)
class Ready:
    """First message of a worker: it has imported the planner and waits for requests."""

    version: int
    pid: int


@dataclass(frozen=True)
class PlanRequest:
    """Plan the ``num_segments`` segments held in slot ``slot`` of the shared buffers.

    Attributes
    ----------
    job_id : int
        Unique per client, increasing in submission order.
    slot : int
        Slot of the shared buffers holding the inputs; owned by the worker until its reply.
    keys : tuple of SegmentKey
        ``num_segments`` keys, row ``i`` of the slot is ``keys[i]`` (informational for the worker).
    num_segments : int
        ``N``, rows used in the slot.
    num_queries : int
        ``W'``, queries used per segment (``<= W`` of the buffers).
    seg_size, head_dim, group_size : int
        ``S``, ``d``, ``G`` (checked by the worker against the buffers).
    ratio : float, optional
        Compression ratio; exactly one of ``ratio`` and ``budget_bytes`` is set.
    budget_bytes : int, optional
        Byte budget of these segments.
    has_importance, has_q_mean, has_group_ids, has_always_dense : bool
        Which optional inputs the slot holds (otherwise the planner's defaults apply).
    reason : int
        :data:`REASON_SEALED` or :data:`REASON_RESEGMENT` (counted separately).
    query_rows : int
        0: the slot holds one row of queries per segment; ``R > 0``: ``R`` rows, one per attention group, segment
        ``i`` reading row ``group_ids[i]`` (pages of one layer share their heads' queries: a job sends them once).
    """

    job_id: int
    slot: int
    keys: Tuple[SegmentKey, ...]
    num_segments: int
    num_queries: int
    seg_size: int
    head_dim: int
    group_size: int
    ratio: Optional[float] = None
    budget_bytes: Optional[int] = None
    has_importance: bool = False
    has_q_mean: bool = False
    has_group_ids: bool = False
    has_always_dense: bool = False
    reason: int = REASON_SEALED
    query_rows: int = 0


@dataclass(frozen=True)
class PlanReply:
    """Result of one :class:`PlanRequest`; the plan itself is in the slot's output fields.

    Attributes
    ----------
    job_id, slot : int
        As in the request.
    status : int
        :data:`STATUS_OK` or :data:`STATUS_FAILED`.
    num_segments : int
        Rows written.
    k_rank_cols, v_rank_cols : int
        Columns of the low-rank factors written for K and V (``Rmax`` of the plan; 0: no low-rank segment on that
        side, the plan has no factors there).
    budget_bytes, dense_bytes : int
        The budget used and the bytes of the all-dense plan.
    lagrange_multiplier : float
        The planner's ``lambda``.
    elapsed_s : float
        Worker time spent on the job.
    error : str
        Why the job failed (empty when it did not).
    """

    job_id: int
    slot: int
    status: int
    num_segments: int = 0
    k_rank_cols: int = 0
    v_rank_cols: int = 0
    budget_bytes: int = 0
    dense_bytes: int = 0
    lagrange_multiplier: float = 0.0
    elapsed_s: float = 0.0
    error: str = ""


@dataclass(frozen=True)
class Shutdown:
    """Ask the worker to exit after its current job."""
