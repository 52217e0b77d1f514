# SPDX-License-Identifier: Apache-2.0
"""The sidecar bridge submits sealed pages without waiting for the device: their copies to the host land on a later
tick, which hands the jobs to the client (a fake pool, window and client here; the copy's event is a fake that says
when the device is done)."""

from __future__ import annotations

import multiprocessing.connection
import re
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import List

import numpy as np
import pytest
import torch

from bench.host_syncs import HostSyncCounter
from mosaickv_sglang.sidecar import bridge as bridge_mod
from mosaickv_sglang.sidecar.bridge import SidecarBridge
from mosaickv_sglang.sidecar.client import JobOutcome, JobStatus, SidecarConfig, SidecarCounters
from mosaickv_sglang.sidecar.pinned_staging import ALIGN_BYTES, PinnedStaging
from mosaickv_sglang.sidecar.protocol import SegmentKey

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:  # --import-mode=importlib puts no test folder on sys.path
    sys.path.insert(0, TESTS)
from bridge_fakes import D, H, LAYERS, S, FakeEvent, FakePool, FakeWindow  # noqa: E402

PAGES_PER_JOB = 2


class FakeClient:
    """Slots, jobs in flight, and every job finished OK on the next tick (valid as the bridge judges it)."""

    def __init__(self, slots: int, is_current) -> None:
        self.slots = slots
        self.is_current = is_current
        self.in_flight: List[dict] = []
        self.received: List[dict] = []
        self.disabled = False

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.in_flight)

    @property
    def counters(self) -> SidecarCounters:
        return SidecarCounters(queue_depth=len(self.in_flight))

    def try_submit(self, segments, keys, values, queries, *, budget_bytes, group_ids, reason, queries_by_group=False):
        if self.free_slots == 0:
            return None
        # per segment, as the worker reads them (SlotBuffers.read_inputs), and the rows actually sent
        per_segment = queries[group_ids] if queries_by_group else queries
        job = dict(segments=tuple(segments), keys=keys.clone(), values=values.clone(), queries=per_segment.clone(),
                   query_rows=int(queries.shape[0]), budget=budget_bytes, id=len(self.received))  # fmt: skip
        self.in_flight.append(job)
        self.received.append(job)
        return job["id"]

    def tick(self, budget_ms=None):
        done, self.in_flight = self.in_flight, []
        return [JobOutcome(j["id"], JobStatus.OK, j["segments"], result=SimpleNamespace(plan=None),
                           valid=tuple(self.is_current(k) for k in j["segments"]), keys=j["keys"],
                           values=j["values"]) for j in done]  # fmt: skip

    def wait_io(self, timeout, also=()) -> None:
        multiprocessing.connection.wait(list(also), timeout)

    def close(self) -> None:
        pass


def dense(layer: int, pages: np.ndarray):
    """What gather returns: a value per (layer, page, head, token) that names them."""
    p = torch.from_numpy(np.asarray(pages, dtype=np.int64))
    base = (layer * 1000 + p[:, None] * 10 + torch.arange(H)[None, :]).reshape(-1).float()
    keys = base[:, None, None] + torch.arange(S).float()[None, :, None] / 100 + torch.zeros(1, 1, D)
    return keys, -keys


@pytest.fixture
def setup(monkeypatch):
    events: List[FakeEvent] = []

    def new_event(device):
        events.append(FakeEvent())
        return events[-1]

    monkeypatch.setattr(bridge_mod, "_copy_done_event", new_event)
    pool = FakePool()
    cfg = SidecarConfig(seg_size=S, head_dim=D, group_size=1, window=4, num_slots=4, max_segments=H * PAGES_PER_JOB)
    bridge = SidecarBridge(pool, FakeWindow(), cfg, shadow_bytes=1 << 20)
    bridge.client = FakeClient(4, bridge.is_current)
    return SimpleNamespace(pool=pool, bridge=bridge, client=bridge.client, events=events)


def seal(t, pages, dense_mask=None) -> int:
    pages = np.asarray(pages, dtype=np.int64)
    mask = np.zeros(pages.size, dtype=bool) if dense_mask is None else np.asarray(dense_mask)
    with t.bridge.sealing():  # as the sealer does: the I/O thread lands nothing before the pages are sealed
        n = t.bridge.submit_sealed(pages, mask, 2.0, dense)
        t.pool.seal(pages)
    return n


def test_jobs_reach_the_client_only_once_the_copies_landed_with_the_epochs_of_the_seal(setup):
    t = setup
    pages = np.array([3, 4, 5, 6], dtype=np.int64)
    assert seal(t, pages) == pages.size * H * LAYERS
    assert len(t.events) == 1 and not t.events[0].waited
    assert t.client.received == [] and t.bridge._free_slots == 0 and t.client.free_slots == 4
    for _ in range(3):
        t.bridge.tick()
    assert t.client.received == [] and not t.events[0].waited
    t.events[0].done = True
    t.bridge.tick(None)  # no budget: all of it in this tick
    got = {(k.layer, k.page) for j in t.client.received for k in j["segments"]}
    assert got == {(layer, int(p)) for layer in range(LAYERS) for p in pages}
    for job in t.client.received:
        keys = job["segments"]
        layer, sel = keys[0].layer, np.array([k.page for k in keys[::H]])
        assert keys == tuple(SegmentKey(layer, hd, int(p), 1) for p in sel for hd in range(H))
        want_k, want_v = dense(layer, sel)
        torch.testing.assert_close(job["keys"], want_k, atol=0, rtol=0)
        torch.testing.assert_close(job["values"], want_v, atol=0, rtol=0)
        torch.testing.assert_close(job["queries"], t.bridge.window.q[layer][torch.arange(H).repeat(sel.size)])
        assert job["query_rows"] == H  # the layer's queries once, not once per page
    assert sorted(t.bridge._shadow) == sorted((layer, int(p)) for layer in range(LAYERS) for p in pages)
    assert t.bridge.plans_applied == len(t.client.received) == 4 and t.bridge.plans_discarded == 0
    assert t.bridge._reserved == 0 and t.bridge._free_slots == 4


def test_pending_jobs_hold_their_slots_so_a_later_batch_does_not_overbook(setup):
    t = setup
    assert seal(t, [1, 2]) == 2 * H * LAYERS  # one job per layer
    assert t.bridge._reserved == 2 and t.bridge._free_slots == 2 and t.client.free_slots == 4
    assert seal(t, [7, 8, 9, 10]) == 2 * PAGES_PER_JOB * H  # two slots left: two jobs of two pages
    assert t.bridge.segments_skipped == 4 * H * LAYERS - 2 * PAGES_PER_JOB * H
    assert seal(t, [11, 12]) == 0 and len(t.events) == 2  # no slot: nothing gathered, no copy started
    assert t.bridge.segments_skipped == 4 * H * LAYERS - 2 * PAGES_PER_JOB * H + 2 * H * LAYERS
    t.events[1].done = True
    t.bridge.tick()
    assert t.client.received == []  # batches land in order
    t.events[0].done = True
    t.bridge.tick(None)  # no budget: all of it in this tick
    assert len(t.client.received) == 4 and t.bridge._reserved == 0


def test_pages_freed_or_reused_before_the_copies_land_are_discarded_not_applied(setup):
    t = setup
    seal(t, [1, 2, 3, 4])  # jobs [1, 2] and [3, 4] in each layer
    t.pool.free(np.array([2]))  # freed
    t.pool.free(np.array([1]))  # freed, reused and sealed again
    t.pool.seal(np.array([1]))
    t.events[0].done = True
    t.bridge.tick(None)  # no budget: all of it in this tick
    assert len(t.client.received) == 4
    assert sorted(t.bridge._shadow) == [(0, 3), (0, 4), (1, 3), (1, 4)]
    assert t.bridge.plans_applied == 2 and t.bridge.plans_discarded == 2
    assert sorted((layer, pages) for layer, pages, _ in t.pool.resealed) == [(0, [3, 4]), (1, [3, 4])]


def test_batches_copies_land_in_reused_staging_buffers_given_back_once_landed(setup):
    """With a staging (pinned on CUDA), each batch's copies land in a slice given back once all its jobs reached the
    worker, so the next batch reuses it; what the worker gets is unchanged. Closing gives back the slices of batches
    still pending, after their copies are done."""
    t = setup
    t.bridge.staging = staging = PinnedStaging(pin=False, capacity_bytes=1 << 20)
    where = set()
    for round_pages in ([3, 4, 5, 6], [7, 8, 9, 10], [1, 2]):
        start = len(t.client.received)
        seal(t, round_pages)
        assert staging.lent == 1  # K, V and queries are all fp32 here: one slice
        where.add(t.bridge._pending[0].copy.tensors[0].data_ptr())
        t.events[-1].done = True
        t.bridge.tick(None)
        assert staging.lent == 0 and staging.lent_bytes == 0 and not t.bridge._pending
        for job in t.client.received[start:]:
            keys = job["segments"]
            want_k, want_v = dense(keys[0].layer, np.array([k.page for k in keys[::H]]))
            torch.testing.assert_close(job["keys"], want_k, atol=0, rtol=0)
            torch.testing.assert_close(job["values"], want_v, atol=0, rtol=0)
        t.client.tick()  # the jobs finish: their slots are free again
        t.bridge.tick(None)
    assert len(where) == 1 and staging.refusals == 0  # every batch at the arena's start
    seal(t, [11, 12])
    assert staging.lent == 1 and not t.events[-1].done
    t.bridge.close()
    assert staging.lent == 0 and t.events[-1].waited


# bytes of one job of PAGES_PER_JOB pages (keys, values and the layer's [H, 4, 1, D] queries, fp32) and of one page's
# host copies in every layer (keys and values)
JOB_BYTES = 2 * PAGES_PER_JOB * H * S * D * 4 + H * 4 * D * 4
SHADOW_BYTES = 2 * LAYERS * H * S * D * 4


def _units(nbytes: int) -> int:
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


def _sent_pages(client) -> set:
    return {(k.layer, k.page) for job in client.received for k in job["segments"]}


def test_a_staging_too_small_for_the_shared_pages_copies_still_takes_the_jobs(setup):
    """Jobs of four pages (three of them shared) fit the staging, their shared pages' copies of every layer do not:
    the jobs are submitted without those copies, planned and applied as usual; the shared pages are not queued for
    re-segmentation by this batch; the slice comes back once the jobs landed."""
    t = setup
    jobs = 4  # [3, 4] and [5, 6] in each layer
    capacity = _units(jobs * JOB_BYTES + 3 * SHADOW_BYTES) - ALIGN_BYTES
    assert capacity >= _units(jobs * JOB_BYTES)
    t.bridge.staging = staging = PinnedStaging(pin=False, capacity_bytes=capacity)
    t.bridge._readers = {p: {1, 2} for p in (3, 4, 6)}  # read by two requests: shared
    pages = np.array([3, 4, 5, 6], dtype=np.int64)
    assert seal(t, pages) == pages.size * H * LAYERS
    batch = t.bridge._pending[0]
    assert len(batch.jobs) == jobs and batch.shared is None and len(batch.copy.tensors) == 3 * jobs
    assert t.bridge.staging_full_shadows == 1 and t.bridge.staging_full_batches == 0 and staging.refusals == 0
    assert t.bridge.segments_skipped == 0 and t.bridge._reserved == jobs
    t.events[0].done = True
    t.bridge.tick(None)
    assert _sent_pages(t.client) == {(layer, int(p)) for layer in range(LAYERS) for p in pages}
    for job in t.client.received:
        keys = job["segments"]
        want_k, want_v = dense(keys[0].layer, np.array([k.page for k in keys[::H]]))
        torch.testing.assert_close(job["keys"], want_k, atol=0, rtol=0)
        torch.testing.assert_close(job["values"], want_v, atol=0, rtol=0)
        assert all(k.generation == 1 for k in keys)
    assert staging.lent_bytes == 0 and t.bridge._reserved == 0 and len(t.bridge.queue) == 0
    t.bridge.tick(None)
    assert t.bridge.plans_applied == jobs and sorted(p for _, ps, _ in t.pool.resealed for p in ps) == [3, 3, 4, 4,
                                                                                                          5, 5, 6, 6]


def test_a_staging_too_small_for_the_jobs_submits_nothing_and_leaks_no_slot(setup):
    """A batch whose jobs the staging cannot hold (the last batch's copies still hold most of it) submits nothing:
    no gather, no copy, no slot reserved, its segments counted skipped and its pages keeping their fast plans; the
    layer it would have started from is still the next batch's. Once the earlier batch landed, later batches are
    submitted again, and every slice comes back."""
    t = setup
    t.bridge.staging = staging = PinnedStaging(pin=False, capacity_bytes=_units(3 * JOB_BYTES))
    gathered = []

    def gather(layer, pages):
        gathered.append((layer, pages.tolist()))
        return dense(layer, pages)

    def seal_with(pages):
        pages = np.asarray(pages, dtype=np.int64)
        with t.bridge.sealing():
            n = t.bridge.submit_sealed(pages, np.zeros(pages.size, dtype=bool), 2.0, gather)
            t.pool.seal(pages)
        return n

    assert seal_with([1, 2]) == 2 * H * LAYERS  # one job per layer: two of the three jobs' room
    assert t.bridge._reserved == 2 and t.bridge._free_slots == 2 and staging.lent_bytes == _units(2 * JOB_BYTES)
    next_layer, gathers = t.bridge._next_layer, len(gathered)
    assert seal_with([3, 4, 5, 6]) == 0
    assert len(gathered) == gathers and len(t.events) == 1 and len(t.bridge._pending) == 1  # nothing gathered
    assert t.bridge.staging_full_batches == 1 and t.bridge.staging_full_shadows == 0
    assert t.bridge._reserved == 2 and t.bridge._free_slots == 2 and t.bridge._next_layer == next_layer
    assert t.bridge.segments_submitted == 2 * H * LAYERS and t.bridge.segments_skipped == 4 * H * LAYERS
    assert staging.lent_bytes == _units(2 * JOB_BYTES) and staging.refusals == 0  # decided before taking
    t.events[0].done = True
    t.bridge.tick(None)
    assert staging.lent_bytes == 0 and t.bridge._reserved == 0
    t.client.tick()  # the jobs finish: their slots are free again
    t.bridge.tick(None)
    assert seal_with([7, 8]) == 2 * H * LAYERS  # room is back: submitted
    assert t.bridge._reserved == 2 and len(t.events) == 2
    t.events[1].done = True
    t.bridge.tick(None)
    t.client.tick()
    t.bridge.tick(None)
    assert _sent_pages(t.client) == {(layer, p) for layer in range(LAYERS) for p in (1, 2, 7, 8)}
    assert {p for _, ps, _ in t.pool.resealed for p in ps} == {1, 2, 7, 8}  # 3-6 kept their fast plans
    assert t.bridge.plans_applied == 4 and t.bridge.staging_full_batches == 1
    assert staging.lent_bytes == 0 and t.bridge._reserved == 0 and t.bridge._free_slots == 4
    assert "no staging room for 1 batches" in t.bridge.status()


def test_every_slice_comes_back_once_the_batches_landed_in_any_order_of_units(setup, monkeypatch):
    """Batches with and without shared pages' copies, several pending at once, landed a unit at a time: the staging
    holds each batch whole while it is pending, and is empty once all have landed; the copies kept are the pages'
    own."""
    monkeypatch.setattr(bridge_mod, "SHARED_PAGES_PER_UNIT", 1)
    t = setup
    t.client.slots = 16
    t.bridge.staging = staging = PinnedStaging(pin=False, capacity_bytes=1 << 20)
    t.bridge._readers = {p: {1, 2} for p in (2, 5, 9)}
    lent = []
    for pages in ([1, 2], [3, 4, 5, 6], [7, 8, 9, 10]):
        seal(t, pages)
        lent.append(staging.lent_bytes)
    assert staging.lent == 3 and lent[0] < lent[1] < lent[2] and t.bridge.staging_full_shadows == 0
    assert [b.shared[0].tolist() for b in t.bridge._pending] == [[2], [5], [9]]
    for i, event in enumerate(t.events):
        event.done = True
        while len(t.bridge._pending) > 2 - i:
            assert staging.lent == 3 - i
            t.bridge.tick(0.0)  # one unit a tick
    assert staging.lent == 0 and staging.lent_bytes == 0 and staging.refusals == 0
    for layer in range(LAYERS):
        for p in (2, 5, 9):
            _, k, v = t.bridge._shadow.get((layer, p))
            want_k, want_v = dense(layer, np.array([p]))
            assert torch.equal(k, want_k) and torch.equal(v, want_v)


def test_a_batch_gathered_in_another_dtype_than_counted_that_does_not_fit_takes_nothing(setup):
    """The staging's room is counted in the config's K/V dtype before gathering; if the gathers return a wider one that
    the staging cannot hold, the batch is left to its fast plans as a full staging's, and nothing is held."""
    t = setup
    t.bridge.staging = staging = PinnedStaging(pin=False, capacity_bytes=_units(2 * JOB_BYTES) - ALIGN_BYTES)
    t.bridge._kv_dtype = torch.float16  # counted as half of what the (fp32) gathers return
    assert seal(t, [1, 2]) == 0
    assert t.bridge.staging_full_batches == 1 and not t.bridge._pending and t.bridge._reserved == 0
    assert staging.lent == 0 and staging.refusals == 1 and t.bridge.segments_skipped == 2 * H * LAYERS


def test_the_staging_capacity_setting(monkeypatch):
    """MOSAICKV_SIDECAR_STAGING_MB (MiB, default 1024) sizes the arena a bridge on a CUDA pool page-locks when built;
    a bad value is refused with the variable's name."""
    monkeypatch.delenv(bridge_mod.STAGING_ENV, raising=False)
    assert bridge_mod.staging_bytes() == 1 << 30
    monkeypatch.setenv(bridge_mod.STAGING_ENV, " 96 ")
    assert bridge_mod.staging_bytes() == 96 << 20
    built = []
    monkeypatch.setattr(bridge_mod, "PinnedStaging", lambda pin, capacity_bytes: built.append((pin, capacity_bytes)))
    pool = FakePool()
    pool.device = "cuda"
    cfg = SidecarConfig(seg_size=S, head_dim=D, group_size=1, window=4, num_slots=4, max_segments=H * PAGES_PER_JOB)
    SidecarBridge(pool, FakeWindow(), cfg)
    assert built == [(True, 96 << 20)]
    SidecarBridge(FakePool(), FakeWindow(), cfg)  # a host pool: no staging
    assert len(built) == 1
    for bad in ("0", "-5", "1.5", "lots"):
        monkeypatch.setenv(bridge_mod.STAGING_ENV, bad)
        with pytest.raises(ValueError, match=rf"MOSAICKV_SIDECAR_STAGING_MB: expected an integer number of MiB >= 1, "
                                             rf"got '{re.escape(bad)}'"):  # fmt: skip
            SidecarBridge(pool, FakeWindow(), cfg)


def test_a_tick_never_waits_for_the_io_threads_hold_on_the_lock(setup):
    """With the I/O thread running, a budgeted tick that finds the bridge's lock held (by that thread) applies nothing
    and returns at once, the finished plans left queued for a later tick; an unbudgeted tick (drain) waits."""
    t = setup
    seal(t, [3, 4, 5, 6])
    t.events[0].done = True
    t.bridge._flush(wait=True)  # the jobs reach the worker, which finishes them
    t.bridge._unapplied.extend(t.client.tick())
    queued = len(t.bridge._unapplied)
    assert queued == 4
    t.bridge._io_thread = threading.Thread(target=lambda: None)  # as if running: the tick lands and reads nothing
    held, release = threading.Event(), threading.Event()

    def hold():
        with t.bridge._lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        start = time.perf_counter()
        assert t.bridge.tick() == 0
        assert time.perf_counter() - start < 1.0 and len(t.bridge._unapplied) == queued
        assert t.bridge.tick_lock_skips == 1 and t.bridge.plans_applied == 0
    finally:
        release.set()
        holder.join()
    assert t.bridge.tick() >= 1  # the lock is free: plans are applied again
    t.bridge.tick(None)
    assert t.bridge.plans_applied == queued and t.bridge.tick_lock_skips == 1
    t.bridge._io_thread = None


def test_drain_waits_for_pending_copies_and_close_drops_them(setup):
    t = setup
    seal(t, [1, 2])
    assert t.bridge.drain(5.0) == 2
    assert t.events[0].waited and t.bridge.plans_applied == 2 and not t.bridge._pending
    seal(t, [5, 6])
    t.bridge.close()
    assert not t.bridge._pending and t.bridge._reserved == 0 and t.bridge.tick() == 0
    assert len(t.client.received) == 2


def test_counters_and_timings(setup):
    t = setup
    assert seal(t, [1, 2, 3, 4], dense_mask=[True, False, False, False]) == 3 * H * LAYERS
    assert t.bridge.segments_submitted == 3 * H * LAYERS and t.bridge.segments_skipped == 0
    assert t.bridge.submit_seconds > 0 and t.bridge.tick_seconds == 0
    t.client.disabled = True  # refused when the copies land: those segments kept their fast plans
    t.events[0].done = True
    t.bridge.tick(None)  # no budget: all of it in this tick
    assert t.client.received == [] and t.bridge.tick_seconds > 0
    assert t.bridge.segments_submitted == 0 and t.bridge.segments_skipped == 3 * H * LAYERS


def test_submission_reads_nothing_back_from_the_device(setup):
    """No host read or value-sized op between the gather and the start of the copies (a GPU would wait for each)."""
    t = setup
    pages = np.array([1, 2, 3, 4], dtype=np.int64)
    with HostSyncCounter() as count:
        t.bridge.submit_sealed(pages, np.zeros(pages.size, dtype=bool), 2.0, dense)
    assert count.syncs == 0, dict(count.by_name)


@pytest.mark.parametrize("per_unit", [1, 2, 4])
def test_shared_pages_copies_land_a_few_pages_a_unit_before_the_jobs(setup, monkeypatch, per_unit):
    """A tick past its budget still lands one unit; the host copies of pages several requests read are one unit a
    few pages of one layer (one layer's in one unit held a served decode step 9.7 ms, the whole model's 4.7 ms past
    the budget), each copy the page's own K and V, and each layer's re-segmentation is queued with its last copies
    (the whole model's at once, a candidate for a 12.4 ms unit on the 8B shape)."""
    monkeypatch.setattr(bridge_mod, "SHARED_PAGES_PER_UNIT", per_unit)
    t = setup
    shared = [3, 4, 6]
    t.bridge._readers = {p: {1, 2} for p in shared}  # read by two requests: shared
    seal(t, [3, 4, 5, 6])
    jobs = len(t.bridge._pending[0].jobs)
    assert jobs == 4  # [3, 4] and [5, 6] in each layer
    t.events[0].done = True
    clock = iter(np.arange(0.0, 1000.0, 1.0))  # every reading of the clock 1 s later: each tick past its budget
    monkeypatch.setattr(bridge_mod.time, "perf_counter", lambda: float(next(clock)))
    order = [(layer, p) for layer in range(LAYERS) for p in shared]
    kept, units = 0, 0
    while kept < len(order):
        t.bridge.tick()
        units += 1
        kept += min(per_unit, len(shared) - kept % len(shared))
        assert sorted(t.bridge._shadow) == sorted(order[:kept])
        assert t.client.received == []
        assert len(t.bridge.queue) == kept // len(shared) * len(shared)  # each layer's, with its last copies
    assert units == LAYERS * -(-len(shared) // per_unit)
    for layer, p in order:
        _, k, v = t.bridge._shadow.get((layer, p))
        want_k, want_v = dense(layer, np.array([p]))
        assert torch.equal(k, want_k) and torch.equal(v, want_v), (layer, p)
    for n in range(1, jobs + 1):  # then the jobs, one a tick
        t.bridge.tick()
        assert len(t.client.received) == n and len(t.bridge._pending) == (n < jobs)


def test_the_io_thread_sleeps_while_idle_and_wakes_for_a_new_batch(setup, monkeypatch):
    """The I/O thread (as on CUDA): idle, it looks at the client once per IO_WAIT_S (10 s here), not in a busy loop;
    a sealed batch wakes it at once (a pipe), and it lands the jobs and reads their plans with no tick; the tick
    applies them."""
    t = setup
    monkeypatch.setattr(bridge_mod, "IO_WAIT_S", 10.0)
    rounds = []
    client_tick = t.client.tick

    def tick(budget_ms=None):
        rounds.append(time.monotonic())
        return client_tick(budget_ms)

    t.client.tick = tick
    t.bridge._start_io()
    try:
        time.sleep(0.45)
        assert 1 <= len(rounds) <= 2, len(rounds)  # one look, then asleep (the first version polled every 5 ms)
        start = time.monotonic()
        t.bridge.io_seconds = 0.0
        assert seal(t, [3, 4]) == 2 * H * LAYERS
        while len(t.bridge._unapplied) < LAYERS and time.monotonic() - start < 5:
            time.sleep(0.002)
        assert time.monotonic() - start < 5  # woken, not found at the end of its 10 s wait
        assert len(t.client.received) == LAYERS and t.events[0].waited  # the thread waited for the copies itself
        assert t.bridge.plans_applied == 0 and t.bridge.land_seconds == 0
        assert t.bridge.tick() >= 1 and t.bridge.tick(None) >= 0 and t.bridge.plans_applied == LAYERS
        assert len(t.pool.resealed) == LAYERS and t.bridge.io_seconds > 0
        assert t.pool.staged == LAYERS and not t.bridge._staged  # staged on the thread, each committed by a tick
    finally:
        t.bridge.close()
    assert t.bridge._io_thread is None and t.bridge._wake_fds is None


@pytest.mark.parametrize("env, interval", [(None, 0.0005), ("2", 0.002), ("0", None), ("50", None)])
def test_starting_the_io_thread_lowers_the_switch_interval_until_close(setup, monkeypatch, env, interval):
    """While the I/O thread runs, the scheduler waits at most MOSAICKV_SIDECAR_SWITCH_INTERVAL_MS (default 0.5 ms)
    for the interpreter's lock, not CPython's 5 ms; 0, or a value above the interpreter's, leaves it; close restores
    it."""
    t = setup
    if env is None:
        monkeypatch.delenv(bridge_mod.SWITCH_INTERVAL_ENV, raising=False)
    else:
        monkeypatch.setenv(bridge_mod.SWITCH_INTERVAL_ENV, env)
    t.client.start = lambda: None
    before = sys.getswitchinterval()
    assert before == pytest.approx(0.005)
    try:
        t.bridge.start(io_thread=True)
        assert sys.getswitchinterval() == pytest.approx(before if interval is None else interval)
    finally:
        t.bridge.close()
    assert sys.getswitchinterval() == before


@pytest.mark.parametrize("env", ["-1", "fast", "2000"])
def test_a_bad_switch_interval_is_refused_at_start(setup, monkeypatch, env):
    monkeypatch.setenv(bridge_mod.SWITCH_INTERVAL_ENV, env)
    started = []
    setup.client.start = lambda: started.append(1)
    with pytest.raises(ValueError, match=rf"MOSAICKV_SIDECAR_SWITCH_INTERVAL_MS: expected milliseconds in \[0, 1000\] "
                                         rf"\(0: CPython's own\), got '{env}'"):
        setup.bridge.start(io_thread=True)
    assert setup.bridge._io_thread is None and not started  # refused before the worker starts
    setup.bridge.close()
