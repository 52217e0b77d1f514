# SPDX-License-Identifier: Apache-2.0
"""Sealing beside the step in flight (the overlap scheduler, ``Sealer.seal_beside_step``): which pages wait for a
later plan, when the seal falls back to the forward stream, and which query window it plans with. The streams
themselves are exercised on the GPU (tests/integration_cpu/test_cuda_graph_decode.py); here the host decisions."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sglang")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helper modules (importlib import mode)

from test_kv_pool import DT, GROUP, H_KV, LAYERS, D, S, _config, build_pool  # noqa: E402

from mosaickv_sglang.sealer import Sealer  # noqa: E402

CHUNK_PAGES = 4


class _Server:
    """One pool and sealer driven as the attention backend does: a plan (begin_plan, before_forward, the new
    pages' physical pages, end_plan), then the step (its K/V and queries written)."""

    def __init__(self, seed: int, beside: bool = True, reserve_pages: int = 0) -> None:
        self.pool = build_pool(64 * S, 64 * S, _config(ratio=3.0, hot_window=S, sink_tokens=S))
        self.sealer = Sealer(self.pool, num_q_heads=H_KV * GROUP, reserve_pages=reserve_pages, min_seal_pages=2)
        self.sealer.seal_beside_step = beside
        self.gen = torch.Generator().manual_seed(seed)
        self.written: dict = {}  # request -> logical pages written so far

    def plan(self, request: int, new_pages: np.ndarray) -> None:
        sealer, pool = self.sealer, self.pool
        sealer.begin_plan()
        done = self.written.get(request, np.zeros(0, dtype=np.int64))
        slots = (torch.from_numpy(done)[:, None] * S + torch.arange(S)).reshape(-1)
        sealer.before_forward([slots], new_pages)
        pool.ensure_physical(torch.from_numpy(new_pages))
        pool.note_writes((torch.from_numpy(new_pages)[:, None] * S + torch.arange(S)).reshape(-1))
        sealer.end_plan()

    def step(self, request: int, new_pages: np.ndarray) -> torch.Tensor:
        """The forward of the last plan: K/V of its pages, one query row per token; returns the queries."""
        pool = self.pool
        slots = (pool.physical_pages(torch.from_numpy(new_pages)).long()[:, None] * S + torch.arange(S)).reshape(-1)
        for li in range(LAYERS):
            for buf in (pool.k_buffer[li], pool.v_buffer[li]):
                buf[slots] = torch.randn((slots.numel(),) + tuple(buf.shape[1:]), generator=self.gen).to(DT)
        q = torch.randn(slots.numel(), H_KV * GROUP * D, generator=self.gen)
        for li in range(LAYERS):
            self.sealer.window.observe(li, q)
        self.written[request] = np.concatenate([self.written.get(request, np.zeros(0, dtype=np.int64)), new_pages])
        return q

    def sealed(self, pages) -> np.ndarray:
        return np.asarray(self.pool.sealed_in_layer(np.asarray(pages, dtype=np.int64), 0), dtype=bool)


def _chunk(k: int) -> np.ndarray:
    return np.arange(1 + k * CHUNK_PAGES, 1 + (k + 1) * CHUNK_PAGES, dtype=np.int64)


def test_pages_the_step_in_flight_writes_are_sealed_one_plan_later():
    """A prompt prefilled a chunk a step: the pages of chunk k leave the hot window in plan k + 1, while step k
    (which writes them) is in flight, so they are sealed in plan k + 2; the pages of earlier chunks are sealed
    beside the step. The pool's invariants hold throughout."""
    srv = _Server(1)
    srv.plan(0, _chunk(0))
    srv.step(0, _chunk(0))
    srv.plan(0, _chunk(1))  # chunk 0's pages 1-3 are due (page 4 is in the hot window), but step 0 writes them
    assert not srv.sealed(_chunk(0)).any()
    assert srv.sealer.pages_deferred == 3 and srv.sealer.side_seals == 0
    srv.step(0, _chunk(1))
    srv.plan(0, _chunk(2))  # chunk 0 sealed beside step 1; pages 5-7 of chunk 1 due, but written by step 1
    assert srv.sealed(_chunk(0)).all() and not srv.sealed(_chunk(1)).any()
    assert srv.sealer.side_seals == 1 and srv.sealer.pages_deferred == 3 + 3
    srv.step(0, _chunk(2))
    srv.plan(0, _chunk(3))
    assert srv.sealed(_chunk(1)).all() and not srv.sealed(_chunk(2)).any()
    assert srv.sealer.side_seals == 2
    srv.pool.check_invariants()


def test_the_seal_beside_the_step_plans_with_the_window_that_step_found():
    """The queries of the step in flight are not in the window the seal plans with: the snapshot of the last plan's
    end holds the queries observed before it."""
    srv = _Server(2)
    seen = []
    plan_layers = srv.sealer.plan_layers

    def recording(pages, sink_mask, ratio, *rest):
        seen.append([srv.sealer.window.queries(li).clone() for li in range(LAYERS)])
        return plan_layers(pages, sink_mask, ratio, *rest)

    srv.sealer.plan_layers = recording
    srv.plan(0, _chunk(0))
    q0 = srv.step(0, _chunk(0))
    srv.plan(0, _chunk(1))
    srv.step(0, _chunk(1))  # its queries go into the live ring, after the snapshot of plan 1
    srv.plan(0, _chunk(2))
    assert len(seen) == 1
    window = srv.sealer.window.window
    want = q0[-window:].reshape(-1, H_KV, GROUP, D).permute(1, 0, 2, 3)
    key = lambda t: sorted(map(tuple, t.permute(1, 0, 2, 3).reshape(t.shape[1], -1).tolist()))  # noqa: E731
    for li in range(LAYERS):
        assert key(seen[0][li]) == key(want)


def test_a_freed_granule_or_hot_pool_pressure_seals_after_the_step_as_before():
    """When an arena granule was freed since the last plan's end (the step in flight may still read it) or the hot
    pool needs room at once, the seal runs after the step in flight, in-flight pages included: the same pages as
    with seal_beside_step off."""
    beside, plain = _Server(3), _Server(3, beside=False)
    for srv in (beside, plain):
        srv.plan(9, np.array([40, 41, 42], dtype=np.int64))  # another request, sealed and then freed
        srv.step(9, np.array([40, 41, 42], dtype=np.int64))
        srv.sealer.seal(np.array([40, 41], dtype=np.int64), np.zeros(2, dtype=bool))
        srv.plan(0, _chunk(0))
        srv.step(0, _chunk(0))
        srv.pool.free_pages(torch.tensor([40, 41, 42]))  # while step 0 runs (e.g. a request that finished)
        srv.plan(0, _chunk(1))
    assert beside.sealed([1, 2, 3]).all() and plain.sealed([1, 2, 3]).all()
    assert beside.sealer.side_seals == 0 and beside.sealer.pages_deferred == 0

    pressed = _Server(4, reserve_pages=10**6)
    pressed.plan(0, _chunk(0))
    pressed.step(0, _chunk(0))
    pressed.plan(0, _chunk(1))
    assert pressed.sealed([1, 2, 3]).all() and pressed.sealer.side_seals == 0


def test_a_deferred_page_freed_before_its_plan_is_not_sealed():
    """Deferred pages are checked again in the plan that takes them: a page freed (or reused) since is dropped."""
    srv = _Server(5)
    srv.plan(0, _chunk(0))
    srv.step(0, _chunk(0))
    srv.plan(0, _chunk(1))  # pages 1-3 deferred
    srv.step(0, _chunk(1))
    srv.pool.free_pages(torch.from_numpy(np.concatenate([_chunk(0), _chunk(1)])))  # request 0 aborted
    srv.sealer._frees_at_plan_end = srv.pool.store.granule_frees  # (dense pages free no granules anyway)
    srv.plan(1, np.array([20, 21], dtype=np.int64))
    assert srv.sealer._still_deferrable()[0].size == 0
    assert srv.pool.num_free_physical_pages > 0 and srv.sealer.side_seals == 0
    srv.pool.check_invariants()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_an_extend_plan_seals_beside_the_step_in_flight(monkeypatch):
    """The overlap scheduler's case on a GPU: chunked prefills of two prompts, each plan made on the forward stream
    while a kernel of about a second (the step in flight) runs there. Every plan, seals included, returns before that
    kernel ends; and the outputs of every step and the pool's final state equal those of the same steps planned with
    the GPU idle (the decisions are the host's, the same either way)."""
    import faulthandler

    import test_cuda_graph_decode as graph_cases
    from mkv_backend_cases import config, layer

    from mosaickv_sglang import batch_inputs
    from mosaickv_sglang.attention_backend import WAR_READ_DONE_ATTR
    from mosaickv_sglang.batch_inputs import clear_scheduled_batch, note_scheduled_batch

    monkeypatch.setenv("MOSAICKV_WARMUP", "0")
    cfg = config(ratio=3.0)
    group = 4
    sides = [graph_cases._CudaSide(cfg, group, monkeypatch) for _ in range(2)]
    for sc in sides:
        sc.mosaic.auto_seal = True
        sc.mosaic.sealer.seal_beside_step = True
        sc.mosaic.sealer.min_seal_pages = 1
    busy, idle = sides
    h_q, h_kv, d = H_KV * group, H_KV, D
    gen = torch.Generator(device="cuda").manual_seed(11)
    scheduler, forward = torch.cuda.Stream(), torch.cuda.Stream()
    # a server's caches are warm: pinned blocks of each size class, and device blocks cached for the forward stream
    # (a new stream has none, and a cudaMalloc while the stream sleeps can wait for it)
    warm = [torch.empty(1 << p, dtype=torch.uint8, pin_memory=True) for p in range(9, 23) for _ in range(16)]
    for stream in (forward, batch_inputs._side_stream(torch.device("cuda"))):  # the plan's reads use a side stream
        with torch.cuda.stream(stream):
            warm += [torch.empty(1 << 26, dtype=torch.uint8, device="cuda")]
            warm += [torch.empty(1 << p, dtype=torch.uint8, device="cuda") for p in range(9, 20) for _ in range(64)]
    del warm
    try:
        for step, ext in enumerate([[37, 40], [40, 21], [40, 40], [33, 40]]):
            bb, bi = graph_cases._to_cuda(busy.extend_batch(ext)), graph_cases._to_cuda(idle.extend_batch(ext))
            # the twin first, with the GPU idle: a kernel's first launch loads its module, which (lazy loading) can
            # wait for the kernels in flight; a server has launched them all before (the sixteenth and seventeenth
            # runs' dumps showed the first plan in the gather's first launch)
            idle.mosaic.init_forward_metadata(bi)
            torch.cuda.synchronize()
            note_scheduled_batch(torch.arange(len(ext)), bb.out_cache_loc, scheduler)
            forward.wait_stream(scheduler)
            with torch.cuda.stream(forward):
                torch.cuda._sleep(2_000_000_000)  # about a second: the step in flight
                faulthandler.dump_traceback_later(0.5)  # a plan that waits shows where
                try:
                    busy.mosaic.init_forward_metadata(bb)
                finally:
                    faulthandler.cancel_dump_traceback_later()
                in_flight = not forward.query()
            clear_scheduled_batch()
            assert in_flight, f"step {step}: the extend plan waited for the forward stream"
            # the read-done event for SGLang's scheduler, recorded at each eager plan's end (the twin's too)
            for side in sides:
                assert isinstance(getattr(side.mosaic.model_runner, WAR_READ_DONE_ATTR), torch.cuda.Event)
                delattr(side.mosaic.model_runner, WAR_READ_DONE_ATTR)
            n = bb.out_cache_loc.numel()
            for li in range(LAYERS):
                q, k, v = (torch.randn(*shape, generator=gen, device="cuda").to(DT)
                           for shape in ((n, h_q * d), (n, h_kv, d), (n, h_kv, d)))  # fmt: skip
                with torch.cuda.stream(forward):
                    got = busy.mosaic.forward_extend(q, k, v, layer(li, group), bb)
                want = idle.mosaic.forward_extend(q, k, v, layer(li, group), bi)
                torch.cuda.synchronize()
                assert torch.equal(got, want), (step, li)
    finally:
        clear_scheduled_batch()
    assert busy.mosaic.sealer.side_seals >= 2 and busy.mosaic.sealer.pages_deferred > 0
    assert busy.mosaic.sealer.side_seals == idle.mosaic.sealer.side_seals
    assert torch.equal(busy.pool.store.page_state(), idle.pool.store.page_state())
    busy.pool.check_invariants()


def test_extend_plans_with_the_overlap_scheduler_read_the_noted_batch_and_say_so(caplog):
    """With the overlap scheduler, an extend plan reads its rows and slots from the noted batch (the host path
    here) and gives the same outputs as SGLang's torch-native backend; plans without the note, or with another
    batch's, are counted by reason, and the status line shows the counts."""
    import dataclasses
    import logging

    from mkv_backend_cases import Scenario, config
    from test_kv_pool import FP16_TOL

    from mosaickv_sglang import sealer as sealer_mod
    from mosaickv_sglang.batch_inputs import clear_scheduled_batch, note_scheduled_batch

    # ratio 1: every sealed segment dense, so sealed prefixes give the stock outputs too
    sc = Scenario(dataclasses.replace(config(ratio=1.0), overlap_schedule=True), group=2, seed=6, auto_seal=True)
    try:
        batch = sc.extend_batch([37, 16, 50])
        note_scheduled_batch(batch.req_pool_indices.clone(), batch.out_cache_loc, None)
        for got, want, _ in sc.run_both(batch):
            torch.testing.assert_close(got, want, **FP16_TOL)
        note_scheduled_batch(torch.arange(3), batch.out_cache_loc, None)  # the previous batch's: 103 slots, not 58
        for got, want, _ in sc.run_both(sc.extend_batch([20, 33, 5])):
            torch.testing.assert_close(got, want, **FP16_TOL)
        clear_scheduled_batch()
        sc.run_both(sc.extend_batch([40, 40, 40]))
    finally:
        clear_scheduled_batch()
    sealer = sc.mosaic.sealer
    assert sealer.rows_read == {("extend", "beside"): 1, ("extend", "another batch"): 1, ("extend", "no note"): 1}
    assert sealer.pages_sealed > 0
    with caplog.at_level(logging.INFO, logger=sealer_mod.__name__):
        sealer.maybe_log_status(sealer._logged_at + sealer.status_interval + 1)
    assert "plans' rows read: extend another batch 1, extend beside 1, extend no note 1" in caplog.text


def test_sglang_s_scheduler_reads_the_read_done_event_the_backend_publishes():
    """SGLang 0.5.17's ModelRunner holds the forward's read-done event under the name the backend sets, and the
    scheduler's WAR barrier takes it from the worker's runner: renamed, the backend's event would go unread and
    the scheduler would wait for whole extend forwards again."""
    import inspect

    from sglang.srt.managers.scheduler import Scheduler
    from sglang.srt.managers.tp_worker import TpModelWorker
    from sglang.srt.model_executor.model_runner import ModelRunner

    from mosaickv_sglang.attention_backend import WAR_READ_DONE_ATTR

    assert f"self.{WAR_READ_DONE_ATTR}" in inspect.getsource(ModelRunner.__init__)
    barrier = inspect.getsource(Scheduler._apply_war_barrier)
    assert "war_fastpath_runner" in barrier and f"runner.{WAR_READ_DONE_ATTR}" in barrier
    assert "return self.model_runner" in inspect.getsource(TpModelWorker.war_fastpath_runner.fget)


def test_a_cpu_plan_publishes_no_read_done_event():
    """Off CUDA (here, sealing beside the step forced on) an extend plan records no event for the scheduler."""
    from mkv_backend_cases import Scenario, config

    from mosaickv_sglang.attention_backend import WAR_READ_DONE_ATTR

    sc = Scenario(config(ratio=3.0), group=2, seed=3, auto_seal=True)
    sc.mosaic.sealer.seal_beside_step = True
    sc.run_mosaic(sc.extend_batch([37, 16]))
    assert not hasattr(sc.mosaic.model_runner, WAR_READ_DONE_ATTR)
