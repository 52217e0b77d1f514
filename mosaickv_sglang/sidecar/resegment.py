# SPDX-License-Identifier: Apache-2.0
"""Radix awareness: re-plan prefix-shared segments with the query statistics of all their readers.

A segment of a prefix shared in the radix cache is read by several requests. Its first plan was made from the
statistics of the request that sealed it; once other requests read it, its plan should not depend on one request's
question alone. This module is the policy, as pure and deterministic functions (no clocks, no randomness, no
dependence on insertion order), so that every TP rank, fed the same events, produces the same jobs in the same
order and, through the single-threaded sidecar, the same plans:

* :class:`ResegmentQueue` collects shared segments (:meth:`~ResegmentQueue.add`) and hands them out in slices
  (:meth:`~ResegmentQueue.next_slice`) of at most ``max_segments`` segments, grouped into :class:`ResegmentJob` of
  one layer and one reader set. A slice is sized in segments, not milliseconds: a time budget measured on each rank
  would differ between ranks. The scheduler's idle hook converts its few-millisecond budget into a fixed segment
  count once, from configuration.
* :func:`merge_reader_stats` merges the readers' :class:`~mosaickv_sglang.importance.QueryStats` in increasing
  request-id order (:meth:`QueryStats.merge` is order-dependent for its ring buffer).
* :func:`job_inputs` turns a job and the merged statistics into the planner's inputs (importance, recent queries,
  group ids); the caller gathers K and V of ``job.keys`` from the pool and submits with ``REASON_RESEGMENT``.
"""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass
from typing import Dict, Iterable, List, Mapping, Sequence, Set, Tuple

import torch

from mosaickv_sglang.importance import QueryStats, SegmentImportance
from mosaickv_sglang.kernels._checks import check_int
from mosaickv_sglang.sidecar.protocol import SegmentKey

logger = logging.getLogger(__name__)

__all__ = ["JobInputs", "ResegmentJob", "ResegmentQueue", "SharedSegment", "job_inputs", "merge_reader_stats"]


@dataclass(frozen=True)
class SharedSegment:
    """A segment read by several requests.

    Attributes
    ----------
    key : SegmentKey
        Pool identity of the segment (layer, KV head, page, page generation).
    start : int
        Token position of its first token in the readers' sequences (a shared prefix starts at position 0, so it is
        the same for every reader).
    readers : tuple of int
        Ids of the requests that read it; stored sorted and without duplicates.
    """

    key: SegmentKey
    start: int
    readers: Tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.key, SegmentKey):
            raise TypeError(f"key: expected SegmentKey, got {type(self.key).__name__}")
        check_int(self.start, "start", lo=0)
        readers = tuple(sorted(set(int(r) for r in self.readers)))
        if not readers:
            raise ValueError(f"readers: expected at least one request id, got {self.readers!r}")
        object.__setattr__(self, "readers", readers)

    @property
    def slot_id(self) -> Tuple[int, int, int]:
        """``(layer, head, page)``: the storage the segment occupies, whatever its generation."""
        return (self.key.layer, self.key.head, self.key.page)


@dataclass(frozen=True)
class ResegmentJob:
    """Segments of one layer with one reader set, re-planned together.

    Attributes
    ----------
    layer : int
    readers : tuple of int
        Sorted request ids whose statistics are merged.
    segments : tuple of SharedSegment
        Sorted by (head, start, page).
    """

    layer: int
    readers: Tuple[int, ...]
    segments: Tuple[SharedSegment, ...]

    @property
    def keys(self) -> Tuple[SegmentKey, ...]:
        return tuple(s.key for s in self.segments)


def _priority(s: SharedSegment) -> Tuple[object, ...]:
    # most-shared first, then a total order on the segment's identity (no ties, so no dependence on insertion order)
    return (-len(s.readers), s.key.layer, s.readers, s.key.head, s.start, s.key.page, s.key.generation)


class ResegmentQueue:
    """Shared segments waiting to be re-planned.

    Parameters
    ----------
    max_job_segments : int
        Segments per job at most (the sidecar's ``max_segments``).
    """

    def __init__(self, max_job_segments: int) -> None:
        self.max_job_segments = check_int(max_job_segments, "max_job_segments", lo=1)
        self._pending: Dict[Tuple[int, int, int], SharedSegment] = {}
        # (priority, slot) of every segment added, including replaced and discarded ones (skipped when popped), so a
        # slice costs its own size, not a sort of the queue (an idle tick's few milliseconds); and the queued slots
        # of each page, so that freeing pages does not scan the queue (the scheduler frees pages at every request end)
        self._heap: List[Tuple[Tuple[object, ...], Tuple[int, int, int]]] = []
        self._by_page: Dict[int, Set[Tuple[int, int, int]]] = {}
        self.handed_out = 0

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, segments: Iterable[SharedSegment]) -> None:
        """Queue segments; a segment already queued for the same storage is replaced (new readers or data)."""
        for s in segments:
            if not isinstance(s, SharedSegment):
                raise TypeError(f"segments: expected SharedSegment items, got {type(s).__name__}")
            slot = s.slot_id
            self._pending[slot] = s
            self._by_page.setdefault(slot[2], set()).add(slot)
            heapq.heappush(self._heap, (_priority(s), slot))
        self._compact()

    def discard_pages(self, pages: Iterable[int]) -> int:
        """Forget queued segments on freed pages; returns how many were dropped."""
        dropped = 0
        for page in set(int(p) for p in pages):
            for slot in self._by_page.pop(page, ()):
                dropped += self._pending.pop(slot, None) is not None
        self._compact()
        return dropped

    def _compact(self) -> None:
        """Rebuild the heap from the queued segments once stale entries outnumber them."""
        if len(self._heap) > 2 * len(self._pending) + 1024:
            self._heap = [(_priority(s), slot) for slot, s in self._pending.items()]
            heapq.heapify(self._heap)

    def next_slice(self, max_segments: int) -> List[ResegmentJob]:
        """Take at most ``max_segments`` segments, in priority order, as jobs of one layer and reader set each.

        The result depends only on the set of queued segments, not on the order they were added.
        """
        check_int(max_segments, "max_segments", lo=0)
        chosen: List[SharedSegment] = []
        while self._heap and len(chosen) < max_segments:
            priority, slot = heapq.heappop(self._heap)
            s = self._pending.get(slot)
            if s is None or _priority(s) != priority:
                continue  # replaced since (its newer entry is in the heap) or discarded
            del self._pending[slot]
            on_page = self._by_page[slot[2]]
            on_page.discard(slot)
            if not on_page:
                del self._by_page[slot[2]]
            chosen.append(s)
        groups: Dict[Tuple[int, Tuple[int, ...]], List[SharedSegment]] = {}
        for s in chosen:
            groups.setdefault((s.key.layer, s.readers), []).append(s)
        jobs: List[ResegmentJob] = []
        for (layer, readers), segs in groups.items():  # dict order = first appearance in priority order
            segs.sort(key=lambda s: (s.key.head, s.start, s.key.page))
            for a in range(0, len(segs), self.max_job_segments):
                jobs.append(ResegmentJob(layer, readers, tuple(segs[a : a + self.max_job_segments])))
        self.handed_out += len(chosen)
        if chosen:
            logger.debug("resegment slice: %d segments in %d jobs, %d left", len(chosen), len(jobs), len(self))
        return jobs


def merge_reader_stats(stats_by_request: Mapping[int, QueryStats], readers: Sequence[int]) -> QueryStats:
    """Statistics of all ``readers`` of one layer, merged in increasing request-id order.

    Parameters
    ----------
    stats_by_request : mapping of int to QueryStats
        Per-request statistics of the layer.
    readers : sequence of int
        Request ids (duplicates ignored).
    """
    ids = sorted(set(int(r) for r in readers))
    if not ids:
        raise ValueError(f"readers: expected at least one request id, got {list(readers)!r}")
    missing = [r for r in ids if r not in stats_by_request]
    if missing:
        raise ValueError(f"readers: expected ids with statistics, got {missing} without")
    merged = stats_by_request[ids[0]]
    for r in ids[1:]:
        merged = merged.merge(stats_by_request[r])
    return merged


@dataclass(frozen=True, eq=False)
class JobInputs:
    """Planner inputs of a :class:`ResegmentJob` besides K and V.

    Attributes
    ----------
    importance : SegmentImportance
        Token mass ``[N, S]`` and channel weights ``[N, d]`` from the merged statistics.
    queries : torch.Tensor
        shape ``[N, W', G, d]``, fp32; the merged recent queries of each segment's KV head.
    group_ids : torch.Tensor
        shape ``[N]``, dtype ``torch.int64``; the KV head (each head is its own attention context).
    """

    importance: SegmentImportance
    queries: torch.Tensor
    group_ids: torch.Tensor


def job_inputs(job: ResegmentJob, stats: QueryStats, seg_size: int) -> JobInputs:
    """Importance, queries and group ids of ``job``'s segments from ``stats`` (e.g. :func:`merge_reader_stats`).

    Raises
    ------
    ValueError
        When ``stats`` holds no query yet (nothing to plan from).
    """
    if not isinstance(job, ResegmentJob):
        raise TypeError(f"job: expected ResegmentJob, got {type(job).__name__}")
    if not isinstance(stats, QueryStats):
        raise TypeError(f"stats: expected QueryStats, got {type(stats).__name__}")
    check_int(seg_size, "seg_size", lo=1)
    if stats.ring_len == 0:
        raise ValueError("stats: expected at least one observed query, got none")
    dev = stats.device
    heads = torch.tensor([s.key.head for s in job.segments], dtype=torch.int64, device=dev)
    starts = torch.tensor([s.start for s in job.segments], dtype=torch.int64, device=dev)
    importance = stats.segment_importance(heads, starts, seg_size)
    return JobInputs(importance, stats.segment_queries(heads).contiguous(), heads)
