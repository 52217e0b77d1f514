# SPDX-License-Identifier: Apache-2.0
"""A bridge tick applies finished plans (and submits landed batches) only while it is within its time budget, at least
one per tick; the plans left wait in the bridge, in order, for later ticks, are checked again for staleness, and are
all applied by ``drain`` or a tick without a budget (issue #5: a step where several jobs finish at once must not pay
for all of them).

A fake pool and window (``bridge_fakes.py``) and a fake client, with a fake clock that only moves when a plan is
applied (or a job submitted), so the budget is exact; then a real CPU pool, where plans applied a few per tick leave
it as applying them all at once."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import List, Tuple

import numpy as np
import pytest
import torch

from mosaickv_sglang.sidecar import bridge as bridge_mod
from mosaickv_sglang.sidecar.bridge import SidecarBridge
from mosaickv_sglang.sidecar.client import JobOutcome, JobStatus, SidecarConfig, SidecarCounters
from mosaickv_sglang.sidecar.protocol import SegmentKey

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:  # --import-mode=importlib puts no test folder on sys.path
    sys.path.insert(0, TESTS)
from bridge_fakes import D, H, LAYERS, S, FakeEvent, FakePool, FakeWindow  # noqa: E402

PAGES_PER_JOB = 2
SLOTS = 8
APPLY_MS = 1.0  # fake time one plan application takes
SUBMIT_MS = 1.0  # fake time one job submission takes


class FakeClock:
    def __init__(self) -> None:
        self.seconds = 0.0

    def perf_counter(self) -> float:
        return self.seconds

    def advance(self, ms: float) -> None:
        self.seconds += ms / 1000.0


class FakeClient:
    """Jobs finish when the test says (:meth:`finish`) and are read on the next tick; a slot is busy from submission
    until its job is read, as in :class:`SidecarClient`. Submitting charges :data:`SUBMIT_MS`."""

    def __init__(self, clock: FakeClock, is_current) -> None:
        self.clock = clock
        self.is_current = is_current
        self.in_flight: List[JobOutcome] = []
        self.finished: List[JobOutcome] = []
        self.submitted: List[Tuple[SegmentKey, ...]] = []
        self.disabled = False
        self.ticks = 0

    @property
    def free_slots(self) -> int:
        return SLOTS - len(self.in_flight) - len(self.finished)

    @property
    def counters(self) -> SidecarCounters:
        return SidecarCounters(queue_depth=len(self.in_flight) + len(self.finished))

    def try_submit(self, segments, keys, values, queries, *, budget_bytes, group_ids, reason, queries_by_group=False):
        self.clock.advance(SUBMIT_MS)
        job_id = len(self.submitted)
        self.submitted.append(tuple(segments))
        self.in_flight.append(_ok(job_id, tuple(segments)))
        return job_id

    def finish(self, *outcomes: JobOutcome) -> None:
        """``outcomes`` end now (besides every job submitted so far)."""
        self.finished.extend(self.in_flight)
        self.finished.extend(outcomes)
        self.in_flight = []

    def tick(self, budget_ms=None):
        self.ticks += 1
        done, self.finished = self.finished, []
        return sorted(done, key=lambda o: o.job_id)

    def close(self) -> None:
        pass


def _ok(job_id: int, segments: Tuple[SegmentKey, ...]) -> JobOutcome:
    """A finished job whose plan is its id (what :class:`FakePool` records)."""
    keys = torch.zeros(len(segments), S, D)
    return JobOutcome(job_id, JobStatus.OK, segments, result=SimpleNamespace(plan=job_id),
                      valid=(True,) * len(segments), keys=keys, values=keys.clone())  # fmt: skip


def _dense(layer: int, pages: np.ndarray):
    keys = torch.zeros(len(pages) * H, S, D)
    return keys, keys.clone()


@pytest.fixture
def fake(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(bridge_mod, "time", SimpleNamespace(perf_counter=clock.perf_counter,
                                                            monotonic=time.monotonic, sleep=time.sleep))  # fmt: skip
    events: List[FakeEvent] = []
    monkeypatch.setattr(bridge_mod, "_copy_done_event", lambda device: events.append(FakeEvent()) or events[-1])
    pool = FakePool(on_reseal=lambda: clock.advance(APPLY_MS))
    cfg = SidecarConfig(seg_size=S, head_dim=D, group_size=1, window=4, num_slots=SLOTS,
                        max_segments=H * PAGES_PER_JOB)  # fmt: skip
    bridge = SidecarBridge(pool, FakeWindow(), cfg, shadow_bytes=0)
    bridge.client = FakeClient(clock, bridge.is_current)

    def job(job_id: int, layer: int, pages: List[int]) -> JobOutcome:
        """A finished job of sealed ``pages`` of ``layer`` (sealed now if they are not), at their current epochs."""
        new = [p for p in pages if not pool.sealed[layer, p]]
        if new:
            pool.seal(new)
        return _ok(job_id, tuple(SegmentKey(layer, hd, p, int(pool.page_epoch[p])) for p in pages for hd in range(H)))

    return SimpleNamespace(pool=pool, bridge=bridge, client=bridge.client, clock=clock, events=events, job=job)


# per tick, the plans applied: 5 jobs finish before the first tick, 2 more before the second
@pytest.mark.parametrize("budget_ms, per_tick", [
    pytest.param(0.5, [1, 1, 1, 1, 1, 1, 1], id="one-application-exceeds-the-budget"),
    pytest.param(2.5, [3, 3, 1], id="three-applications-fit"),
    pytest.param(None, [5, 2], id="no-budget-applies-all"),
])  # fmt: skip
def test_a_tick_applies_plans_within_its_budget_and_the_rest_wait_in_order(fake, budget_ms, per_tick):
    """A tick applies plans while it has taken less than its budget, at least one; those left are applied first on
    the next ticks, in the order they finished, and count in the queue depth and against the free slots."""
    t = fake
    t.client.finish(*(t.job(i, i % LAYERS, [2 * i, 2 * i + 1]) for i in range(5)))
    got = []
    for n, want in enumerate(per_tick):
        if n == 1:
            t.client.finish(*(t.job(i, i % LAYERS, [2 * i, 2 * i + 1]) for i in range(5, 7)))
        assert t.bridge.tick(budget_ms) == want
        got.append(want)
        waiting = (5 if n == 0 else 7) - sum(got)
        assert len(t.bridge._unapplied) == t.bridge.counters().queue_depth == waiting
        assert t.bridge._free_slots == SLOTS - waiting
    assert [plan for _, _, plan in t.pool.resealed] == list(range(7))
    assert [(layer, pages) for layer, pages, _ in t.pool.resealed] == [(i % LAYERS, [2 * i, 2 * i + 1])
                                                                        for i in range(7)]  # fmt: skip
    assert t.bridge.plans_applied == t.pool.released == 7 and t.bridge.plans_discarded == 0


def test_the_client_s_part_counts_against_the_budget_and_one_plan_is_still_applied(fake, monkeypatch):
    """The budget runs from the tick's start: reading replies that take the whole budget leaves room for the one plan
    every tick applies, no more."""
    t = fake
    t.client.finish(*(t.job(i, 0, [2 * i, 2 * i + 1]) for i in range(3)))
    read = t.client.tick

    def slow_read(budget_ms=None):
        t.clock.advance(5.0)
        return read(budget_ms)

    monkeypatch.setattr(t.client, "tick", slow_read)
    assert t.bridge.tick(3.0) == 1 and len(t.bridge._unapplied) == 2
    assert t.bridge.tick(3.0) == 1 and t.bridge.tick(3.0) == 1 and not t.bridge._unapplied
    assert [plan for _, _, plan in t.pool.resealed] == [0, 1, 2]


def test_landed_jobs_are_submitted_one_at_a_time_within_the_budget(fake):
    """Two sealed batches whose copies have landed (one job per layer each): a tick whose budget one job's submission
    exceeds submits one job, in order; the jobs not submitted keep their slots reserved; a tick with room for three
    submits the other three, across batches."""
    t = fake
    for pages in ([1, 2], [5, 6]):
        t.bridge.submit_sealed(np.array(pages, dtype=np.int64), np.zeros(2, dtype=bool), 2.0, _dense)
        t.pool.seal(np.array(pages))
    for event in t.events:
        event.done = True
    t.bridge.tick(0.5)
    assert [({k.page for k in segs}, segs[0].layer) for segs in t.client.submitted] == [({1, 2}, 0)]
    assert len(t.bridge._pending) == 2 and t.bridge._reserved == 2 * LAYERS - 1
    t.bridge.tick(2.5)
    assert [({k.page for k in segs}, segs[0].layer) for segs in t.client.submitted] == [
        ({1, 2}, 0), ({1, 2}, 1), ({5, 6}, 1), ({5, 6}, 0)]  # the second batch starts where the first stopped
    assert not t.bridge._pending and t.bridge._reserved == 0


def test_a_tick_past_its_budget_after_a_landing_applies_no_plan(fake):
    """A tick does one unit of work past its budget, not one of each kind: a landing that takes the budget leaves the
    finished plans to the next tick (both in one tick held the thirteenth run's slowest decode steps); a tick with
    nothing to land still applies one."""
    t = fake
    t.client.finish(*(t.job(i, 0, [2 * i, 2 * i + 1]) for i in range(2)))
    t.bridge.submit_sealed(np.array([20, 21], dtype=np.int64), np.zeros(2, dtype=bool), 2.0, _dense)
    t.pool.seal(np.array([20, 21]))
    t.events[0].done = True
    assert t.bridge.tick(0.5) == 0  # one job submitted (1 ms), no plan applied
    assert len(t.client.submitted) == 1 and len(t.bridge._unapplied) == 2
    assert t.bridge.tick(0.5) == 0 and len(t.client.submitted) == LAYERS  # the other layer's job
    assert t.bridge.tick(0.5) == 1 and t.bridge.tick(0.5) == 1  # nothing left to land: one plan a tick
    assert [plan for _, _, plan in t.pool.resealed] == [0, 1]


def test_a_waiting_plan_whose_pages_were_freed_or_resealed_is_discarded_and_counted(fake):
    """Plans that wait for a later tick are checked again when their turn comes: pages freed, or freed and sealed
    again, meanwhile discard the plan (counted), and the plans behind them are still applied."""
    t = fake
    t.client.finish(t.job(0, 0, [1, 2]), t.job(1, 0, [3, 4]), t.job(2, 1, [5, 6]), t.job(3, 1, [7, 8]))
    assert t.bridge.tick(0.5) == 1 and len(t.bridge._unapplied) == 3
    t.pool.free([3])  # freed
    t.pool.free([6])  # freed, reused and sealed again
    t.pool.seal([6])
    assert t.bridge.tick(0.5) == 1  # discarding takes no (fake) time: the tick goes on to the plan behind
    assert t.bridge.plans_discarded == 2 and t.bridge.plans_applied == 2
    assert t.pool.resealed == [(0, [1, 2], 0), (1, [7, 8], 3)]
    assert not t.bridge._unapplied and t.bridge.counters().queue_depth == 0


def test_drain_applies_every_waiting_plan_and_close_drops_them(fake):
    """``drain`` applies the plans left by a tick's budget along with the jobs still in flight, and ends with none
    waiting; ``close`` drops waiting plans without applying them."""
    t = fake
    t.client.finish(*(t.job(i, 0, [2 * i, 2 * i + 1]) for i in range(4)))
    assert t.bridge.tick(0.5) == 1
    t.client.in_flight.append(t.job(4, 1, [10, 11]))
    finish = t.client.tick

    def tick_then_finish(budget_ms=None):
        done = finish(budget_ms)
        t.client.finish()
        return done

    t.client.tick = tick_then_finish
    assert t.bridge.drain(5.0) == 4
    assert [plan for _, _, plan in t.pool.resealed] == [0, 1, 2, 3, 4]
    assert not t.bridge._unapplied and t.bridge.counters().queue_depth == 0

    t.client.finish(*(t.job(i, 0, [2 * i, 2 * i + 1]) for i in range(5, 8)))
    assert t.bridge.tick(0.5) == 1 and len(t.bridge._unapplied) == 2
    t.bridge.close()
    assert not t.bridge._unapplied and t.bridge.counters().queue_depth == 0 and t.bridge.tick(None) == 0
    assert len(t.pool.resealed) == 6 and t.bridge.plans_discarded == 0


# --- a real CPU pool --------------------------------------------------------------------------------------------------
def test_plans_applied_a_few_per_tick_leave_the_pool_as_applying_them_all_at_once():
    """Twin real pools with the same sealed pages get the same finished plans (two for one layer's pages: the later
    wins): one applied per tick (a budget of 0 ms) on one, all in one tick on the other. Descriptors, bounds, arenas
    and allocators end equal, every displaced payload is released and the pools stay consistent."""
    pytest.importorskip("sglang")
    sys.path.insert(0, str(Path(__file__).resolve().parent / "integration_cpu"))  # helper modules (importlib mode)
    from mkv_metrics_cases import write_pages
    from test_kv_pool import GROUP, H_KV, _config, build_pool

    from mosaickv_sglang.sealer import Sealer

    def sealed_pool():
        pool = build_pool(64 * S, 64 * S, _config(ratio=3.0))
        sealer = Sealer(pool, num_q_heads=H_KV * GROUP)
        write_pages(pool, np.arange(1, 5, dtype=np.int64), seed=7)
        return pool, sealer

    # (layer, pages, keys, values, plan) per job, made from the first pool's dense pages: every layer's two halves
    # at ratio 6, then layer 0's first half again at ratio 4
    pool, sealer = sealed_pool()
    jobs = [(layer, half, ratio) for ratio in (6.0,) for layer in range(pool.layer_num) for half in ([1, 2], [3, 4])]
    jobs.append((0, [1, 2], 4.0))
    made = []
    for layer, half, ratio in jobs:
        pages = np.array(half, dtype=np.int64)
        keys, values = sealer.gather(layer, pages)
        made.append((layer, pages, keys, values, sealer.plan_layer(layer, pages, np.zeros(2, dtype=bool), ratio)))
    twins = []
    for pool, sealer in (pool, sealer), sealed_pool():
        h = int(pool.head_num)
        assert sealer.seal(np.arange(1, 5, dtype=np.int64), np.zeros(4, dtype=bool))
        bridge = SidecarBridge.create(pool, sealer.window)
        bridge.client = SimpleNamespace(tick=lambda budget_ms=None: [], counters=SidecarCounters(), free_slots=4,
                                        disabled=False, close=lambda: None)  # fmt: skip
        bridge._unapplied.extend(
            JobOutcome(i, JobStatus.OK, tuple(SegmentKey(layer, hd, int(p), int(pool.page_epoch[p]))
                                              for p in pages for hd in range(h)),
                       result=SimpleNamespace(plan=plan), valid=(True,) * (pages.size * h), keys=keys, values=values)
            for i, (layer, pages, keys, values, plan) in enumerate(made)
        )  # fmt: skip
        twins.append((pool, bridge))
    (stepped, stepped_bridge), (at_once, at_once_bridge) = twins
    assert [stepped_bridge.tick(0.0) for _ in range(6)] == [1, 1, 1, 1, 1, 0]
    assert at_once_bridge.tick(None) == 5
    for pool, bridge in twins:
        assert bridge.plans_applied == 5 and bridge.plans_discarded == 0 and not bridge._unapplied
        assert pool.store.pending_releases == 0
        pool.check_invariants()
    a, b = stepped.store, at_once.store
    assert a.snapshot() == b.snapshot()
    for li in range(stepped.layer_num):
        torch.testing.assert_close(a.desc[li], b.desc[li], atol=0, rtol=0)
        torch.testing.assert_close(a.bounds[li], b.bounds[li], atol=0, rtol=0)
        # bits, not values: packed codes read as fp16 can be NaN
        assert torch.equal(a.arenas[li].view(torch.int16), b.arenas[li].view(torch.int16)), f"layer {li}"


def test_the_slowest_unit_of_each_kind_is_kept_until_taken(fake, monkeypatch):
    """The bridge keeps the longest single unit of each kind of tick work (for the sealer's status line): a job
    handed over (1 ms here), the client's part (3 ms when its replies are slow) and a plan applied (1 ms); taking them
    forgets them; idle ticks' units are not kept."""
    t = fake
    t.bridge.submit_sealed(np.array([20, 21], dtype=np.int64), np.zeros(2, dtype=bool), 2.0, _dense)
    t.pool.seal(np.array([20, 21]))
    t.events[0].done = True
    read = t.client.tick

    def slow_read(budget_ms=None):
        t.clock.advance(3.0)
        return read(budget_ms)

    monkeypatch.setattr(t.client, "tick", slow_read)
    t.client.finish(t.job(0, 0, [2, 3]))
    t.bridge.tick(None)
    got = t.bridge.take_slowest()
    assert got == {"job": pytest.approx(SUBMIT_MS / 1e3), "replies": pytest.approx(3e-3),
                   "apply": pytest.approx(APPLY_MS / 1e3)}  # fmt: skip
    assert t.bridge.take_slowest() == {}
    t.client.finish(t.job(1, 0, [4, 5]))
    t.bridge.on_idle()  # applies the plan, in an idle tick: not kept
    assert t.bridge.plans_applied == 2 and t.bridge.take_slowest() == {}
