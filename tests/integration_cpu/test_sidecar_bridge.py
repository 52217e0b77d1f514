# SPDX-License-Identifier: Apache-2.0
"""The sidecar wired to the sealer and the pool: submitted at sealing, applied between steps, faults survived.

Each test starts a real sidecar worker (a spawned process) and packs with the real kernels (Triton interpreter).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sglang")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helper modules (importlib import mode)

from mkv_backend_cases import Scenario, config  # noqa: E402
from mkv_metrics_cases import write_pages  # noqa: E402
from test_kv_pool import DT, GROUP, H_KV, LAYERS, S, _config, build_pool  # noqa: E402

from mosaickv_sglang.kernels.format import K_FORM, V_FORM  # noqa: E402
from mosaickv_sglang.planner import plan_exact  # noqa: E402
from mosaickv_sglang.sealer import Sealer  # noqa: E402
from mosaickv_sglang.sidecar.bridge import SidecarBridge  # noqa: E402
from mosaickv_sglang.sidecar.protocol import SegmentKey  # noqa: E402
from mosaickv_sglang.strategies.base import dense_segment_bytes  # noqa: E402

PROMPTS = [1, 16, 37, 80]
READY_S = 120.0
DRAIN_S = 120.0
EXACT = dict(atol=0, rtol=0)


def _assert_match(results) -> None:
    for out, ref, _ in results:
        torch.testing.assert_close(out, ref, atol=3e-3, rtol=3e-3)


def _sealer_with_sidecar(seed: int, resegment: bool = True, io_thread: bool = False, **overrides):
    """A ratio-3 pool (64 pages, ``--mosaic-resegment`` as ``resegment``) and its sealer with a started bridge (with
    its I/O thread as ``io_thread`` says); queries observed in every layer so the sidecar has statistics."""
    pool = build_pool(64 * S, 64 * S, dataclasses.replace(_config(ratio=3.0), resegment=resegment))
    sealer = Sealer(pool, num_q_heads=H_KV * GROUP)
    bridge = SidecarBridge.create(pool, sealer.window, **overrides).start(io_thread=io_thread)
    sealer.attach_sidecar(bridge)
    gen = torch.Generator().manual_seed(seed)
    for li in range(LAYERS):
        sealer.window.observe(li, torch.randn(8, H_KV * GROUP * pool.head_dim, generator=gen).to(DT))
    assert bridge.client.wait_ready(READY_S), "sidecar did not get ready"
    return pool, sealer, bridge


def test_sealed_pages_get_the_exact_planner_s_plans_within_the_fast_budget():
    """A sealed batch is handed to the sidecar (as many layers as slots allow) and, once drained, its pages carry
    the plan ``plan_exact`` makes in-process from the same inputs; the arena ledger is untouched and the pool stays
    consistent."""
    pool, sealer, bridge = _sealer_with_sidecar(seed=1, num_slots=LAYERS)
    try:
        pages = np.arange(1, 5, dtype=np.int64)
        write_pages(pool, pages, seed=101)
        dense = {li: sealer.gather(li, pages) for li in range(LAYERS)}
        assert sealer.seal(pages, np.zeros(pages.size, dtype=bool))
        reserved = pool.arena_ledger.reserved
        assert bridge.segments_submitted == pages.size * H_KV * LAYERS and bridge.segments_skipped == 0
        assert bridge.submit_seconds > 0 and bridge.tick_seconds == 0
        bridge.drain(DRAIN_S)
        assert bridge.plans_applied == LAYERS and bridge.plans_discarded == 0
        assert bridge.tick_seconds > 0 and bridge.idle_seconds == 0
        assert bridge.land_seconds > 0 and 0 < bridge.apply_seconds < bridge.tick_seconds  # its parts
        assert pool.arena_ledger.reserved == reserved > 0
        seg = dense_segment_bytes(S, pool.head_dim)
        heads = torch.arange(H_KV).repeat(pages.size)
        before = torch.get_num_threads()
        torch.set_num_threads(1)  # the worker's setting: same reduction order
        try:
            for li in range(LAYERS):
                k, v = dense[li]
                q = sealer.window.queries(li)[heads]
                want = plan_exact(k, v, q, budget_bytes=pages.size * H_KV * seg // 3, menu=bridge.client.menu,
                                  group_ids=heads).plan  # fmt: skip
                rows = torch.from_numpy((pages[:, None] * H_KV + np.arange(H_KV)).reshape(-1))
                desc = pool.store.desc[li][rows]
                assert desc[:, K_FORM].tolist() == want.k_form.tolist(), f"layer {li}"
                assert desc[:, V_FORM].tolist() == want.v_form.tolist(), f"layer {li}"
        finally:
            torch.set_num_threads(before)
        assert pool.store.pending_releases == 0
        pool.check_invariants()
    finally:
        bridge.close()


def test_a_seal_in_two_halves_reaches_the_sidecar_when_packed():
    """MOSAICKV_SEAL_ASYNC's halves: nothing reaches the sidecar while the seal is only planned; once packed, the
    pages are submitted and refined as a whole seal's are."""
    pool, sealer, bridge = _sealer_with_sidecar(seed=2, num_slots=LAYERS)
    try:
        pages = np.arange(1, 5, dtype=np.int64)
        write_pages(pool, pages, seed=102)
        assert sealer.start_seal(pages, np.zeros(pages.size, dtype=bool))
        assert bridge.segments_submitted == 0 and not pool.store.is_sealed(torch.from_numpy(pages)).any()
        assert sealer.finish_seal()
        assert bridge.segments_submitted == pages.size * H_KV * LAYERS and bridge.segments_skipped == 0
        bridge.drain(DRAIN_S)
        assert bridge.plans_applied == LAYERS and bridge.plans_discarded == 0
        assert pool.store.pending_releases == 0
        pool.check_invariants()
    finally:
        bridge.close()


def test_with_the_io_thread_ticks_only_apply_and_the_pool_ends_the_same():
    """With the I/O thread (the default on CUDA) a sealed batch's copies are landed and the worker's replies read
    without any tick: the scheduler thread's ticks only apply the plans (no landing, no client call). The pool ends
    with the same descriptors and payloads as a bridge without the thread given the same pages; a drain runs on the
    caller's thread and the I/O thread resumes after it; closing stops it."""
    pages = np.arange(1, 6, dtype=np.int64)
    ends = []
    for io in (False, True):
        pool, sealer, bridge = _sealer_with_sidecar(seed=5, num_slots=LAYERS, io_thread=io)
        try:
            callers = []
            client_tick = bridge.client.tick

            def tick(budget_ms=None, _tick=client_tick):
                callers.append(threading.current_thread().name)
                return _tick(budget_ms)

            bridge.client.tick = tick
            write_pages(pool, pages, seed=105)
            assert sealer.seal(pages, np.zeros(pages.size, dtype=bool))
            if io:
                end = time.monotonic() + DRAIN_S
                while bridge.counters().queue_depth and time.monotonic() < end or bridge._pending:
                    time.sleep(0.02)  # no tick: the thread lands the jobs and reads the plans
                assert len(bridge._unapplied) == LAYERS and bridge.plans_applied == 0
                assert bridge.io_seconds > 0 and bridge.land_seconds == 0
                while bridge.plans_applied < LAYERS:
                    assert bridge.tick() >= 1  # a plan at least per tick (the tick's budget)
                assert set(callers) == {"mosaickv-sidecar-io"}, callers
                assert bridge.land_seconds == 0 and bridge.apply_seconds > 0
                bridge.drain(DRAIN_S)
                assert bridge._io_thread is not None and bridge._io_thread.is_alive()
            else:
                bridge.drain(DRAIN_S)
                assert set(callers) == {threading.current_thread().name} and bridge.io_seconds == 0
            assert bridge.plans_applied == LAYERS and bridge.plans_discarded == 0
            assert pool.store.pending_releases == 0
            pool.check_invariants()
            ends.append(([d.clone() for d in pool.store.desc], [a.clone() for a in pool.store.arenas]))
        finally:
            bridge.close()
        assert bridge._io_thread is None
        assert "mosaickv-sidecar-io" not in {t.name for t in threading.enumerate()}
    (desc0, arena0), (desc1, arena1) = ends
    for li in range(LAYERS):
        assert torch.equal(desc0[li], desc1[li]), f"layer {li}"  # the plans and where their payloads lie
        # the payloads, bit for bit (packed payloads hold bit patterns that read as NaN in the arena's dtype)
        assert torch.equal(arena0[li].view(torch.int16), arena1[li].view(torch.int16)), f"layer {li}"


def test_plans_for_freed_or_reused_pages_are_discarded():
    """Jobs still in flight when their pages are freed (and the pages reused and sealed again) end discarded: the
    new contents keep their own plans, nothing leaks, the invariants hold."""
    pool, sealer, bridge = _sealer_with_sidecar(seed=2, num_slots=LAYERS, job_delay_s=1.0)
    try:
        pages = np.arange(1, 4, dtype=np.int64)
        write_pages(pool, pages, seed=102)
        assert sealer.seal(pages, np.zeros(pages.size, dtype=bool))
        pool.free_pages(torch.from_numpy(pages))
        write_pages(pool, pages, seed=103)  # reused: same logical pages, new contents, dense again
        bridge.drain(DRAIN_S)
        assert bridge.plans_applied == 0 and bridge.plans_discarded == LAYERS
        assert bridge.counters().discarded_stale == LAYERS
        free_before = [a.free_granules for a in pool.store.allocators]
        assert sealer.seal(pages, np.zeros(pages.size, dtype=bool))  # the reused pages: new jobs, applied
        bridge.drain(DRAIN_S)
        assert bridge.plans_applied == LAYERS
        pool.free_pages(torch.from_numpy(pages))
        assert [a.free_granules for a in pool.store.allocators] == [a.capacity for a in pool.store.allocators]
        assert free_before == [a.capacity for a in pool.store.allocators]
        pool.check_invariants()
    finally:
        bridge.close()


def test_decoding_with_the_sidecar_killed_midway_stays_exact_at_ratio_one():
    """The backend starts the sidecar itself (``--mosaic-sidecar on``). At ratio 1 every plan is dense, so a page
    re-packed by the sidecar between steps reads exactly as before: outputs equal TorchNativeAttnBackend's at every
    step while plans land at whatever step the worker finishes them. Killed with SIGKILL halfway, the worker is
    restarted, no step fails, and later plans are applied again."""
    sc = Scenario(config(ratio=1.0, sidecar=True), group=3, seed=21, auto_seal=True)
    bridge = sc.mosaic.sealer.sidecar
    assert isinstance(bridge, SidecarBridge)
    try:
        assert bridge.client.wait_ready(READY_S)
        _assert_match(sc.run_both(sc.extend_batch(PROMPTS)))
        for _ in range(12):
            _assert_match(sc.run_both(sc.decode_batch()))
        bridge.drain(DRAIN_S)
        applied = bridge.plans_applied
        assert applied > 0
        os.kill(bridge.client.pid, signal.SIGKILL)
        for _ in range(20):
            _assert_match(sc.run_both(sc.decode_batch()))
            time.sleep(0.05)
        assert bridge.client.wait_ready(READY_S)
        assert bridge.counters().restarts >= 1
        _assert_match(sc.run_both(sc.extend_batch([16, 16, 16, 16])))
        bridge.drain(DRAIN_S)
        _assert_match(sc.run_both(sc.decode_batch()))
        assert bridge.plans_applied > applied, (applied, bridge.status())
        assert sc.pool.store.pending_releases == 0
        sc.pool.check_invariants()
    finally:
        bridge.close()


def test_a_prefix_read_by_a_second_request_is_resegmented_on_idle_ticks():
    """Request 0 writes four pages; they are sealed and refined. Request 1 then reads them (a radix-cache hit):
    the idle hook (AFTER ``Scheduler.on_idle``) re-plans them from the bridge's host copies, with their readers'
    queries (request 1's; not those of request 7, which ran later and read other pages), at the ratio they were
    sealed with: the plan ``plan_exact`` makes in-process from the same inputs. Freeing the pages drops their copies
    and anything still queued."""
    from mosaickv_sglang.patches.scheduler import sidecar_idle_tick
    from mosaickv_sglang.runtime import register_sealer

    pool, sealer, bridge = _sealer_with_sidecar(seed=3, num_slots=LAYERS)
    register_sealer(sealer)
    try:
        pages = np.arange(1, 5, dtype=np.int64)
        slots = (torch.from_numpy(pages)[:, None] * S + torch.arange(S)).reshape(-1)
        bridge.observe_readers([(0, slots)])
        write_pages(pool, pages, seed=104)
        dense = {li: sealer.gather(li, pages) for li in range(LAYERS)}
        assert sealer.seal(pages, np.zeros(pages.size, dtype=bool))
        bridge.drain(DRAIN_S)
        assert bridge.plans_applied == LAYERS and bridge.pages_shared == 0 and len(bridge.queue) == 0
        gen2 = torch.Generator().manual_seed(30)
        for owner in (1, 7):  # request 1's queries, then request 7's (a request that reads none of these pages)
            sealer.window.set_owners(torch.full((8,), owner))
            for li in range(LAYERS):
                sealer.window.observe(li, torch.randn(8, H_KV * GROUP * pool.head_dim, generator=gen2).to(DT))
        sealer.window.set_owners(None)
        bridge.observe_readers([(1, slots[: 3 * S + 5])])  # reads three whole pages (and part of the fourth)
        assert bridge.pages_shared == 3 and len(bridge.queue) == 3 * LAYERS
        held = bridge.client._slots.try_acquire()  # one slot busy: the first slice spans both layers, one waits
        sidecar_idle_tick(None, object())
        assert bridge.resegment_jobs == 1 and len(bridge.queue) == 3
        bridge.client._slots.release(held)
        for _ in range(2 * LAYERS):
            bridge.drain(DRAIN_S)
            sidecar_idle_tick(None, object())
        bridge.drain(DRAIN_S)
        assert bridge.resegment_jobs == LAYERS and bridge.resegment_skipped == 0 and len(bridge.queue) == 0
        assert bridge.counters().rejected_full == 0
        assert bridge.plans_applied == 2 * LAYERS and bridge.counters().resegmentations == LAYERS
        assert bridge.resegment_pooled == 0
        seg = dense_segment_bytes(S, pool.head_dim)
        shared = pages[:3]
        heads = torch.arange(H_KV).repeat(shared.size)
        rows = torch.from_numpy((shared[:, None] * H_KV + np.arange(H_KV)).reshape(-1))
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for li in range(LAYERS):
                k, v = (x[: shared.size * H_KV] for x in dense[li])
                readers_q = sealer.window.reader_queries(li, (0, 1))
                assert readers_q.shape[1] == 8 and sealer.window.queries(li).shape[1] == 24
                want = plan_exact(k, v, readers_q[heads], budget_bytes=shared.size * (H_KV * seg // 3),
                                  menu=bridge.client.menu, group_ids=heads).plan  # fmt: skip
                desc = pool.store.desc[li][rows]
                assert desc[:, K_FORM].tolist() == want.k_form.tolist(), f"layer {li}"
                assert desc[:, V_FORM].tolist() == want.v_form.tolist(), f"layer {li}"
        finally:
            torch.set_num_threads(before)
        # a page whose readers asked nothing still in the window is planned with every request's recent queries
        sent = []
        real_submit, bridge.client.try_submit = bridge.client.try_submit, lambda *a, **k: sent.append(a[3]) or object()
        try:
            keys = [SegmentKey(0, 0, int(p), int(pool.page_epoch[p])) for p in shared[:1]]
            assert bridge._submit_resegment(0, keys, readers=(9,)) == 1 and bridge.resegment_pooled == 1
        finally:
            bridge.client.try_submit = real_submit
        torch.testing.assert_close(sent[0], sealer.window.queries(0)[torch.arange(H_KV)], **EXACT)
        bridge.observe_readers([(2, slots)])
        assert len(bridge.queue) == 4 * LAYERS
        pool.free_pages(torch.from_numpy(pages))
        assert len(bridge.queue) == 0 and bridge._shadow.used_bytes == 0
        pool.check_invariants()
    finally:
        register_sealer(None)
        bridge.close()


def test_with_resegment_off_shared_pages_are_not_replanned_but_sealed_pages_are_refined():
    """``--mosaic-resegment off``: pages read by two requests before sealing and by a third after are neither queued
    nor copied to the host, idle ticks submit no re-segmentation job, while the sealed batch still gets (and keeps)
    the sidecar's plans."""
    from mosaickv_sglang.patches.scheduler import sidecar_idle_tick
    from mosaickv_sglang.runtime import register_sealer

    pool, sealer, bridge = _sealer_with_sidecar(seed=4, resegment=False, num_slots=LAYERS)
    register_sealer(sealer)
    try:
        assert not bridge.resegment and bridge.shadow_bytes == 0
        pages = np.arange(1, 5, dtype=np.int64)
        slots = (torch.from_numpy(pages)[:, None] * S + torch.arange(S)).reshape(-1)
        bridge.observe_readers([(0, slots), (1, slots)])  # shared before sealing: would be copied and queued
        write_pages(pool, pages, seed=105)
        assert sealer.seal(pages, np.zeros(pages.size, dtype=bool))
        assert bridge.segments_submitted == pages.size * H_KV * LAYERS
        bridge.drain(DRAIN_S)
        assert bridge.plans_applied == LAYERS and bridge.segments_applied == pages.size * H_KV * LAYERS
        assert bridge.plans_discarded == 0
        bridge.observe_readers([(2, slots)])  # a third reader once sealed: would be queued
        for _ in range(3):
            sidecar_idle_tick(None, object())
            bridge.drain(DRAIN_S)
        assert bridge.pages_shared == 0 and len(bridge.queue) == 0
        assert not bridge._shadow and bridge._shadow.used_bytes == 0 and not bridge._readers
        assert bridge.resegment_jobs == 0 and bridge.resegment_skipped == 0
        assert bridge.counters().resegmentations == 0 and bridge.plans_applied == LAYERS
        assert bridge.status().endswith("resegment off")
        assert pool.store.pending_releases == 0
        pool.check_invariants()
    finally:
        register_sealer(None)
        bridge.close()
