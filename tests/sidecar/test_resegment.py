# SPDX-License-Identifier: Apache-2.0
"""Radix awareness policy: deterministic merging and slicing, and identical re-plans on two ranks."""

from __future__ import annotations

import random
from typing import Dict, List, Tuple

import pytest
import torch
from mkv_sidecar_data import D, G, S, W, plan_tensors

from mosaickv_sglang.importance import QueryStats
from mosaickv_sglang.sidecar import resegment
from mosaickv_sglang.sidecar import (
    REASON_RESEGMENT,
    JobStatus,
    ResegmentJob,
    ResegmentQueue,
    SegmentKey,
    SharedSegment,
    SidecarClient,
    job_inputs,
    merge_reader_stats,
)

H = 2  # KV heads


def _stats(seed: int, steps: int = 3, tokens: int = 4 * S) -> QueryStats:
    gen = torch.Generator().manual_seed(seed)
    st = QueryStats(H, G, D, window=W)
    keys = torch.randn(tokens, H, D, generator=gen)
    for _ in range(steps):
        st.observe_with_keys(torch.randn(H * G, D, generator=gen), keys)
    return st


def _shared_segments() -> List[SharedSegment]:
    segs = []
    for layer in (0, 1):
        for head in range(H):
            for page in range(3):
                readers = (7, 3) if page < 2 else (3, 7, 9)
                segs.append(SharedSegment(SegmentKey(layer, head, 10 + page, 0), start=page * S, readers=readers))
    return segs


def test_merge_is_independent_of_reader_order():
    """Merged statistics depend on the set of readers only (fixed order by request id)."""
    stats = {r: _stats(r) for r in (3, 7, 9)}
    a = merge_reader_stats(stats, [9, 3, 7])
    b = merge_reader_stats(stats, [7, 9, 3, 3])
    for name in ("q2_sum", "q_sum", "q_weight", "ring", "mass_sum", "mass_weight"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.q_weight, stats[3].q_weight + stats[7].q_weight + stats[9].q_weight)
    with pytest.raises(ValueError, match=r"readers: expected ids with statistics, got \[4\] without"):
        merge_reader_stats(stats, [3, 4])


def test_slices_are_bounded_grouped_and_order_independent():
    """next_slice takes at most max_segments, most-shared first, as jobs of one layer and reader set of at most
    max_job_segments; two ranks adding the same segments in different orders get identical slices."""
    segs = _shared_segments()
    shuffled = list(segs)
    random.Random(0).shuffle(shuffled)
    q1, q2 = ResegmentQueue(max_job_segments=3), ResegmentQueue(max_job_segments=3)
    q1.add(segs)
    q2.add(shuffled)
    slices1, slices2 = [], []
    while len(q1) or len(q2):
        slices1.append(q1.next_slice(5))
        slices2.append(q2.next_slice(5))
    assert slices1 == slices2
    assert [sum(len(j.segments) for j in sl) for sl in slices1] == [5, 5, 2]
    first = slices1[0][0]
    assert isinstance(first, ResegmentJob) and first.readers == (3, 7, 9) and first.layer == 0
    for sl in slices1:
        for job in sl:
            assert len(job.segments) <= 3
            assert {(s.key.layer, s.readers) for s in job.segments} == {(job.layer, job.readers)}
    assert q1.handed_out == len(segs)


def test_queue_replaces_and_discards():
    """A segment re-added for the same storage replaces the queued one; freed pages are forgotten."""
    q = ResegmentQueue(max_job_segments=8)
    q.add(_shared_segments())
    q.add([SharedSegment(SegmentKey(0, 0, 10, 0), start=0, readers=(3, 7, 11))])
    assert len(q) == 12
    assert q.discard_pages([11, 12]) == 8 and len(q) == 4
    jobs = q.next_slice(100)
    assert [j.readers for j in jobs] == [(3, 7, 11), (3, 7), (3, 7)]
    with pytest.raises(ValueError, match=r"readers: expected at least one request id, got \(\)"):
        SharedSegment(SegmentKey(0, 0, 1, 0), start=0, readers=())


class _SortedQueue:
    """The queue as first written, kept as the reference: a dict of slots, a full sort per slice, a scan per free."""

    def __init__(self) -> None:
        self.pending: Dict[Tuple[int, int, int], SharedSegment] = {}

    def add(self, segs: List[SharedSegment]) -> None:
        for seg in segs:
            self.pending[seg.slot_id] = seg

    def discard_pages(self, pages: List[int]) -> int:
        drop = [k for k in self.pending if k[2] in set(pages)]
        for k in drop:
            del self.pending[k]
        return len(drop)

    def next_slice(self, n: int) -> List[SharedSegment]:
        chosen = sorted(self.pending.values(), key=resegment._priority)[:n]
        for seg in chosen:
            del self.pending[seg.slot_id]
        return chosen


@pytest.mark.parametrize("seed", range(6))
def test_queue_slices_equal_a_full_sort_under_random_adds_replacements_and_frees(seed):
    """The queue's heap (slices that cost their own size) hands out exactly what sorting the whole queue would, under
    random adds, re-adds of the same storage with other readers or generations, frees and slices of any size."""
    rng = random.Random(seed)
    q, ref = ResegmentQueue(max_job_segments=4), _SortedQueue()

    def seg() -> SharedSegment:
        readers = tuple(rng.sample(range(1, 9), rng.randint(1, 4)))
        key = SegmentKey(rng.randrange(3), rng.randrange(2), rng.randrange(12), rng.randrange(3))
        return SharedSegment(key, start=rng.randrange(4) * S, readers=readers)

    for _ in range(300):
        op = rng.random()
        if op < 0.5:
            batch = [seg() for _ in range(rng.randint(1, 20))]
            q.add(batch)
            ref.add(batch)
        elif op < 0.65:
            pages = rng.sample(range(12), rng.randint(1, 3))
            assert q.discard_pages(pages) == ref.discard_pages(pages)
        else:
            n = rng.randint(0, 15)
            got = [sg for job in q.next_slice(n) for sg in job.segments]
            assert sorted(got, key=lambda x: x.slot_id) == sorted(ref.next_slice(n), key=lambda x: x.slot_id)
        assert len(q) == len(ref.pending)
    while len(ref.pending):
        got = [sg for job in q.next_slice(7) for sg in job.segments]
        assert sorted(got, key=lambda x: x.slot_id) == sorted(ref.next_slice(7), key=lambda x: x.slot_id)
    assert len(q) == 0 and q.next_slice(5) == []


def test_job_inputs_shapes():
    """job_inputs gives the planner [N, S] token mass, [N, W', G, d] queries and per-head contexts."""
    job = ResegmentQueue(8)
    job.add(_shared_segments()[:2])
    (j,) = job.next_slice(3)
    inp = job_inputs(j, _stats(1), S)
    assert inp.importance.token_mass.shape == (2, S) and inp.queries.shape == (2, 3, G, D)
    assert inp.group_ids.tolist() == [s.key.head for s in j.segments]
    with pytest.raises(ValueError, match="stats: expected at least one observed query, got none"):
        job_inputs(j, QueryStats(H, G, D, window=W), S)


def _replan_slice(client: SidecarClient, stats: Dict[int, QueryStats], order: int) -> List[Tuple]:
    """One rank's idle tick: queue the shared segments (in a rank-specific order), take a slice, submit each job
    with merged statistics and K/V of the segments, collect the plans."""
    gen = torch.Generator().manual_seed(5)
    kv = {  # the pool: same content on every rank
        (s.key.layer, s.key.head, s.key.page): (torch.randn(S, D, generator=gen), torch.randn(S, D, generator=gen))
        for s in _shared_segments()
    }
    segs = _shared_segments()
    random.Random(order).shuffle(segs)
    q = ResegmentQueue(max_job_segments=client.config.max_segments)
    q.add(segs)
    jobs = q.next_slice(2 * client.config.num_slots)  # one job per layer: fits the free slots
    ids = []
    for job in jobs:
        inp = job_inputs(job, merge_reader_stats(stats, job.readers), S)
        k = torch.stack([kv[(s.key.layer, s.key.head, s.key.page)][0] for s in job.segments])
        v = torch.stack([kv[(s.key.layer, s.key.head, s.key.page)][1] for s in job.segments])
        ids.append(client.try_submit(
            job.keys, k, v, inp.queries, ratio=2.0, importance=inp.importance, group_ids=inp.group_ids,
            reason=REASON_RESEGMENT,
        ))
    outs = client.drain(30.0)
    assert [o.job_id for o in outs] == ids and all(o.status == JobStatus.OK for o in outs)
    return [(job, plan_tensors(o.result)) for job, o in zip(jobs, outs)]


def test_two_ranks_replan_shared_segments_identically(ranks: Tuple[SidecarClient, SidecarClient]):
    """Same shared segments and statistics on two ranks (events seen in different orders): identical jobs and
    byte-identical plans; the re-segmentations are counted."""
    stats = {r: _stats(r) for r in (3, 7, 9)}
    before = ranks[0].counters.resegmentations
    a = _replan_slice(ranks[0], stats, order=1)
    b = _replan_slice(ranks[1], stats, order=2)
    assert [job for job, _ in a] == [job for job, _ in b]
    for (_, ta), (_, tb) in zip(a, b):
        assert ta.keys() == tb.keys()
        for name in ta:
            assert ta[name].numpy().tobytes() == tb[name].numpy().tobytes(), name
    assert ranks[0].counters.resegmentations == before + len(a)
