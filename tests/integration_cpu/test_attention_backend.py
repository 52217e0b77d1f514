# SPDX-License-Identifier: Apache-2.0
"""MosaicAttnBackend on the CPU against SGLang 0.5.17's own ``TorchNativeAttnBackend`` and ``ref_sparse_decode``.

Pools are built by SGLang's ``_build_mha_kv_pool``, slots come from SGLang's paged allocator (see
``mkv_backend_cases``); Triton kernels run in the interpreter (fp16).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("sglang")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helper modules (importlib import mode)

from mkv_backend_cases import Scenario, config, layer  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402
from test_kv_pool import D, DT, H_KV, LAYERS, S  # noqa: E402

import mosaickv_sglang.attention_backend as ab  # noqa: E402
from mosaickv_sglang.kernels.reference import ref_segment_scores, ref_sparse_decode  # noqa: E402

TOL = dict(atol=3e-3, rtol=3e-3)
PROMPTS = [1, 16, 37, 80]


def _assert_match(results) -> None:
    for mosaic_out, native_out, q in results:
        assert mosaic_out.shape == native_out.shape == q.shape and mosaic_out.dtype == q.dtype
        torch.testing.assert_close(mosaic_out.float(), native_out.float(), **TOL)


@pytest.mark.parametrize("group", [2, 1], ids=["gqa2", "mha"])
def test_extend_and_decode_match_torch_native_before_and_after_dense_seal(group):
    """Prefill of ragged prompts, decode steps, an all-dense (ratio 1) seal, more decode steps and a chunked-prefill
    extend over the sealed prefix: MosaicAttnBackend's output equals TorchNativeAttnBackend's on a stock pool holding
    the same K/V at every step (read budget 0 = read every segment)."""
    sc = Scenario(config(ratio=1.0), group, seed=group)
    _assert_match(sc.run_both(sc.extend_batch(PROMPTS)))
    md = sc.mosaic.forward_metadata
    assert not md.is_decode and int(md.seg_counts.sum()) == 0 and md.qo_indptr.tolist() == [0, 1, 17, 54, 134]
    for _ in range(2):
        _assert_match(sc.run_both(sc.decode_batch()))
    assert int(sc.mosaic.forward_metadata.seg_counts.sum()) == 0
    sealed = sc.seal("dense")
    assert sealed.numel() > 0
    sc.pool.check_invariants()
    for _ in range(2):
        _assert_match(sc.run_both(sc.decode_batch()))
        md = sc.mosaic.forward_metadata
        assert md.is_decode and int(md.seg_counts.sum()) == sealed.numel() and md.read_budget == md.max_segs
        tails = torch.diff(md.tail_indptr).tolist()
        assert [int(c) * S + t for c, t in zip(md.seg_counts.tolist(), tails)] == sc.lens
    # chunked prefill: the prefix now has sealed pages, the dense prefix tail and the new tokens share pages
    _assert_match(sc.run_both(sc.extend_batch([5, 20, 3, 16])))
    assert int(sc.mosaic.forward_metadata.seg_counts.sum()) == sealed.numel()
    _assert_match(sc.run_both(sc.decode_batch()))
    sc.pool.check_invariants()
    # the decode plans (not the extends) are counted for /metrics, with their host time
    assert sc.mosaic.sealer.decode_plans == 5 and sc.mosaic.sealer.decode_plan_seconds > 0
    # a decode plan's row reading (a device wait on a GPU) and the collections during the plan are named in the stalls
    assert 0 < sc.mosaic.rows_read_seconds
    stalls, req_rows = sc.mosaic.sealer.stalls, sc.mosaic._req_rows
    stalls.summary()

    def slow_req_rows(*args, **kwargs):
        time.sleep(0.02)
        gc.collect()
        return req_rows(*args, **kwargs)

    sc.mosaic._req_rows = slow_req_rows
    installed = stalls.on_gc in gc.callbacks
    stalls.install()
    try:
        sc.run_both(sc.decode_batch())
    finally:
        if not installed:
            stalls.uninstall()
        del sc.mosaic._req_rows
    plans = stalls._plans
    assert len(plans) == 1
    took, _, _, rows, pause, copies = plans[0]
    assert 0.02 <= rows <= took and 0 < pause <= rows and copies == 0.0  # no copy to CUDA on the CPU


def test_read_budget_with_compressed_segments_matches_ref_sparse_decode():
    """Ratio-3-class plans (chan 16/64 on K and V) and a read budget of 2 segments: the backend reads exactly the
    2 best-scored sealed segments per request and KV head (ref_segment_scores) and its output equals
    ref_sparse_decode on those ids plus the dense tail."""
    sc = Scenario(config(ratio=3.0, read_budget=2 * S), group=2, seed=7)
    sc.run_both(sc.extend_batch(PROMPTS))
    sc.seal("chan")
    batch = sc.decode_batch()
    sc.mosaic.init_forward_metadata(batch)
    md = sc.mosaic.forward_metadata
    assert md.read_budget == 2 and md.max_segs >= 3  # the 80-token request has more sealed segments than read
    counts = md.seg_counts.tolist()
    st = sc.pool.store
    for li in range(LAYERS):
        q, k, v = sc.qkv(len(PROMPTS))
        lay = layer(li, 2)
        out = sc.mosaic.forward_decode(q, k, v, lay, batch)
        sel = md.sel_ids.clone()
        assert tuple(sel.shape) == (len(PROMPTS), H_KV, 2)
        q3 = q.view(len(PROMPTS), -1, D)
        scores = ref_segment_scores(q3, st.desc[li], st.bounds[li], md.seg_ids_padded, md.seg_counts,
                                    sm_scale=lay.scaling)  # fmt: skip
        for b, c in enumerate(counts):
            for h in range(H_KV):
                top = torch.topk(scores[b, h, :c], min(2, c)).indices
                want = sorted(md.seg_ids_padded[b, h, top].tolist())
                got = sorted(x for x in sel[b, h].tolist() if x >= 0)
                assert got == want
        k_buf, v_buf = sc.pool.get_kv_buffer(li)
        ref = ref_sparse_decode(q3, st.arenas[li], st.desc[li], sel, k_buf, v_buf, md.tail_indptr, md.tail_indices,
                                sm_scale=lay.scaling)  # fmt: skip
        torch.testing.assert_close(out.view(len(PROMPTS), -1, D).double(), ref, **TOL)


def test_non_mosaic_pool_and_cuda_graphs_are_refused(monkeypatch):
    """A stock MHATokenToKVPool is refused by the constructor and the factory with a ValueError naming
    --kv-compressor; decode CUDA graphs with --mosaic-cuda-graph off ask for --disable-decode-cuda-graph; the factory
    builds the backend otherwise (also with decode graphs off through either flag)."""
    stock = MHATokenToKVPool(256, S, DT, H_KV, D, LAYERS, "cpu", False, v_head_dim=D)
    runner = SimpleNamespace(device="cpu", token_to_kv_pool=stock, req_to_token_pool=None,
                             model_config=SimpleNamespace(get_max_num_attention_heads=lambda: 2 * H_KV))  # fmt: skip
    with pytest.raises(ValueError, match="token_to_kv_pool: expected MosaicMHATokenToKVPool.*--kv-compressor"):
        ab.MosaicAttnBackend(runner, num_q_heads=2 * H_KV)
    with pytest.raises(ValueError, match="--kv-compressor mosaic"):
        ab.create_mosaic_backend(runner)
    sc = Scenario(config(), group=2, seed=0)
    monkeypatch.setattr(ab, "_attn_tp_size", lambda: 1)
    runner.token_to_kv_pool = sc.pool
    backend = ab.create_mosaic_backend(runner)  # positive control
    assert backend.num_q_heads == 2 * H_KV and backend.num_kv_heads == H_KV
    runner.server_args = SimpleNamespace(disable_cuda_graph=False, disable_decode_cuda_graph=False)
    monkeypatch.setattr(sc.pool, "mosaic_config", dataclasses.replace(sc.pool.mosaic_config, cuda_graph=False))
    with pytest.raises(NotImplementedError, match="--mosaic-cuda-graph on.*--disable-decode-cuda-graph"):
        ab.create_mosaic_backend(runner)
    monkeypatch.setattr(sc.pool, "mosaic_config", dataclasses.replace(sc.pool.mosaic_config, cuda_graph=True))
    assert isinstance(ab.create_mosaic_backend(runner), ab.MosaicAttnBackend)
    monkeypatch.undo()
    monkeypatch.setattr(ab, "_attn_tp_size", lambda: 1)
    for flags in (dict(disable_cuda_graph=True), dict(disable_decode_cuda_graph=True)):
        runner.server_args = SimpleNamespace(**flags)
        assert isinstance(ab.create_mosaic_backend(runner), ab.MosaicAttnBackend)
    with pytest.raises(ValueError, match="num_q_heads: expected a multiple of the pool's KV heads"):
        ab.MosaicAttnBackend(runner, num_q_heads=4)


@pytest.mark.parametrize("group", [3, 1], ids=["gqa3", "mha"])
def test_auto_seal_at_ratio_one_matches_torch_native(group):
    """The backend's own sealer (hot window one page, one sink page, ratio 1 = every plan dense): pages leave the
    hot window as the requests decode across page boundaries, get sealed in the plan step, and every output still
    equals TorchNativeAttnBackend's."""
    sc = Scenario(config(ratio=1.0), group, seed=10 + group, auto_seal=True)
    _assert_match(sc.run_both(sc.extend_batch(PROMPTS)))
    for _ in range(20):
        _assert_match(sc.run_both(sc.decode_batch()))
    sealer = sc.mosaic.sealer
    assert sealer.pages_sealed > 0 and sealer.pressure_pages_sealed == 0
    # every request keeps at most its hot-window page plus the partial page dense
    md = sc.mosaic.forward_metadata
    assert max(torch.diff(md.tail_indptr).tolist()) <= 2 * S
    _assert_match(sc.run_both(sc.extend_batch([5, 20, 3, 16])))
    _assert_match(sc.run_both(sc.decode_batch()))
    sc.pool.check_invariants()


def test_hot_pool_pressure_seals_least_recently_written_pages():
    """A hot window larger than any request and a dense capacity of 14 pages: the policy seals only the sink pages,
    so the plan step must seal complete pages for room (least recently written first). Outputs stay exact at
    ratio 1."""
    sc = Scenario(config(ratio=1.0, hot_window=1024), group=2, seed=5, auto_seal=True, hot=14 * S)
    _assert_match(sc.run_both(sc.extend_batch(PROMPTS)))  # 1 + 1 + 3 + 5 = 10 pages dense
    for _ in range(3):
        _assert_match(sc.run_both(sc.extend_batch([16, 16, 16, 16])))  # 4 more pages each time
    sealer = sc.mosaic.sealer
    assert sealer.pressure_pages_sealed > 0 and sealer.pages_sealed > sealer.pressure_pages_sealed
    for _ in range(3):
        _assert_match(sc.run_both(sc.decode_batch()))
    sc.pool.check_invariants()
    assert sc.pool.num_free_physical_pages >= 0


def test_policy_pages_are_sealed_in_batches_and_pressure_seals_at_once():
    """With ``min_seal_pages`` 6, pages that left the hot window wait until six are due, then go in one planner call
    (with 1, the same decode steps make four calls of one page); outputs stay exact at ratio 1 while they wait. A
    forward that lacks hot pages seals at once, batch or not."""
    sc = Scenario(config(ratio=1.0), group=2, seed=7, auto_seal=True, min_seal_pages=6)
    sealer = sc.mosaic.sealer
    calls = []
    seal = sealer.seal
    sealer.seal = lambda pages, sinks: calls.append(int(pages.size)) or seal(pages, sinks)
    _assert_match(sc.run_both(sc.extend_batch(PROMPTS)))
    _assert_match(sc.run_both(sc.decode_batch()))  # the prompts' six pages out of the hot window: one call
    assert calls == [6]
    for _ in range(31):  # four more pages leave the hot window: due, not sealed (with 1, four calls of one page)
        _assert_match(sc.run_both(sc.decode_batch()))
    assert calls == [6]
    for _ in range(48):
        _assert_match(sc.run_both(sc.decode_batch()))
        if len(calls) == 2:
            break
    assert len(calls) == 2 and calls[1] >= 6, calls
    sc.pool.check_invariants()
    pressured = Scenario(config(ratio=1.0, hot_window=1024), group=2, seed=5, auto_seal=True, hot=14 * S,
                         min_seal_pages=100)  # fmt: skip
    _assert_match(pressured.run_both(pressured.extend_batch(PROMPTS)))
    for _ in range(3):
        _assert_match(pressured.run_both(pressured.extend_batch([16, 16, 16, 16])))
    assert pressured.mosaic.sealer.pressure_pages_sealed > 0
    pressured.pool.check_invariants()


def test_auto_seal_compresses_at_ratio_three():
    """At ratio 3 the sealer's fast plans compress the sealed pages within the planner's budget (sinks dense, the
    rest at a third of dense), the pool stays consistent and decode outputs stay finite and close to the dense
    reference (random K/V: loose bound)."""
    sc = Scenario(config(ratio=3.0), group=4, seed=3, auto_seal=True)
    sc.run_both(sc.extend_batch(PROMPTS))
    for _ in range(2):
        sc.run_both(sc.extend_batch([16, 16, 16, 16]))
    res = sc.run_both(sc.decode_batch())
    sealer = sc.mosaic.sealer
    sinks = len(PROMPTS)  # one sink page per request, sealed dense
    assert sealer.pages_sealed >= sinks + 4
    seg_granules = 2 * S * D * 2 / 128  # one dense segment's K+V payload
    budget = (sinks + (sealer.pages_sealed - sinks) / 3) * H_KV * LAYERS * seg_granules
    used = sum(a.used_granules for a in sc.pool.store.allocators)
    assert used <= 1.15 * budget
    for mosaic_out, native_out, _ in res:
        assert torch.isfinite(mosaic_out.float()).all()
        rel = (mosaic_out.float() - native_out.float()).norm() / native_out.float().norm()
        assert rel < 0.5
    sc.pool.check_invariants()


@pytest.mark.parametrize("hot_window,hot_pages", [(32, 16), (1024, 14)], ids=["policy", "pressure"])
def test_sealing_decisions_are_identical_across_ranks(hot_window, hot_pages):
    """Two tensor-parallel ranks see the same batches (same allocator decisions) but different K/V and queries (their
    own heads): every page-level decision (which pages are sealed, when, under pressure or policy; which physical
    page each logical page gets) is the same on both, so their pools stay in lockstep with SGLang's one allocator.
    What each rank packs into its segments is its own."""
    ranks = [Scenario(config(ratio=3.0, hot_window=hot_window), group=2, seed=seed, auto_seal=True,
                      hot=hot_pages * S) for seed in (1, 2)]  # fmt: skip

    def step(make_batch):
        batches = [make_batch(sc) for sc in ranks]
        for sc, batch in zip(ranks, batches):
            sc.mosaic.init_forward_metadata(batch)
        a, b = (sc.pool for sc in ranks)
        assert np.array_equal(a._l2p, b._l2p) and np.array_equal(a._live, b._live)
        assert torch.equal(a.store.page_state(), b.store.page_state())
        assert ranks[0].mosaic.sealer.pages_sealed == ranks[1].mosaic.sealer.pages_sealed
        assert ranks[0].mosaic.sealer.pressure_pages_sealed == ranks[1].mosaic.sealer.pressure_pages_sealed

    step(lambda sc: sc.extend_batch(PROMPTS))
    for _ in range(3):
        step(lambda sc: sc.extend_batch([16, 16, 16, 16]))
    for _ in range(2):
        step(lambda sc: sc.decode_batch())
    sealer = ranks[0].mosaic.sealer
    assert sealer.pages_sealed > len(PROMPTS)  # more than the sink pages
    assert (sealer.pressure_pages_sealed > 0) == (hot_window == 1024)


def test_mosaickv_profile_writes_the_plans_profiles(tmp_path, monkeypatch):
    """With ``MOSAICKV_PROFILE`` set, extend and decode plans (sealing included) are profiled per kind and written
    on ``dump``; the outputs are unchanged (still equal to TorchNativeAttnBackend's)."""
    monkeypatch.setenv("MOSAICKV_PROFILE", str(tmp_path / "prof"))
    sc = Scenario(config(ratio=1.0), 2, seed=31, auto_seal=True)
    assert sc.mosaic.call_profile.enabled
    _assert_match(sc.run_both(sc.extend_batch(PROMPTS)))
    for _ in range(6):
        _assert_match(sc.run_both(sc.decode_batch()))
    sc.mosaic.call_profile.dump()
    assert sc.mosaic.call_profile.calls == {"extend": 1, "decode": 6}
    decode = (tmp_path / "prof.decode").read_text()
    assert "kind decode: 6 profiled" in decode and "_plan_batch" in decode and "before_forward_rows" in decode
    assert "_plan_batch" in (tmp_path / "prof.extend").read_text()


class _TimedBridge:
    """What the sealer reads of a SidecarBridge; each tick and submission takes (and counts) a few milliseconds."""

    resegment = False
    plans_applied = plans_discarded = 0

    def __init__(self) -> None:
        self.tick_seconds = self.submit_seconds = 0.0
        self.ticks = self.submits = 0

    @staticmethod
    def _spend(seconds: float) -> float:
        t0 = time.perf_counter()
        time.sleep(seconds)
        return time.perf_counter() - t0

    @property
    def step_seconds(self) -> float:
        return self.tick_seconds + self.submit_seconds

    def tick(self) -> int:
        self.tick_seconds += self._spend(0.002)
        self.ticks += 1
        return 0

    def sealing(self):
        return contextlib.nullcontext()

    def observe_readers(self, reads) -> None:
        pass

    def submit_sealed(self, pages, dense_mask, ratio, gather) -> int:
        self.submit_seconds += self._spend(0.004)
        self.submits += 1
        return 0

    def counters(self):
        from mosaickv_sglang.sidecar.client import SidecarCounters

        return SidecarCounters()

    def take_slowest(self) -> dict:
        return {"apply": 0.0015}


def test_decode_plan_time_is_split_into_sealing_and_sidecar(caplog):
    """The decode plans' time has its sealing and sidecar parts (for /metrics): only what ran inside decode plans,
    not the extend plans' seals and ticks."""
    # status lines captured from the start: a run slower than the status interval (60 s) logs its line mid-run, and
    # the explicit call below then has no newly sealed page to report
    caplog.set_level(logging.INFO, logger="mosaickv_sglang.sealer")
    sc = Scenario(config(ratio=1.0), 2, seed=12, auto_seal=True)
    sealer = sc.mosaic.sealer
    bridge = _TimedBridge()
    sealer.attach_sidecar(bridge)
    sc.run_mosaic(sc.extend_batch(PROMPTS))
    sc.run_mosaic(sc.extend_batch([40, 40, 40, 40]))  # an extend plan that seals (the first extend's pages)
    seal_in_extends, sidecar_in_extends = sealer.seal_seconds, sealer.sidecar_seconds()
    ticks, submits = bridge.ticks, bridge.submits
    assert ticks == 2 and sidecar_in_extends == bridge.tick_seconds + bridge.submit_seconds > 0
    assert sealer.decode_plan_seal_seconds == sealer.decode_plan_sidecar_seconds == 0.0
    for _ in range(20):
        sc.run_mosaic(sc.decode_batch())
    assert sealer.decode_plans == 20 and bridge.ticks == ticks + 20 and bridge.submits > submits
    assert sealer.decode_plan_seal_seconds == pytest.approx(sealer.seal_seconds - seal_in_extends)
    assert sealer.decode_plan_sidecar_seconds == pytest.approx(sealer.sidecar_seconds() - sidecar_in_extends)
    assert sealer.decode_plan_sidecar_seconds >= 0.002 * 20 + 0.004 * (bridge.submits - submits)
    parts = sealer.decode_plan_seal_seconds + sealer.decode_plan_sidecar_seconds
    assert 0 < sealer.decode_plan_seal_seconds and parts < sealer.decode_plan_seconds
    # the status line reads the bridge too once its interval has passed (a slow run reached it here before)
    sealer.maybe_log_status(now=time.monotonic() + sealer.status_interval + 1)
    assert "sidecar: 0 jobs queued" in caplog.text and "slowest units apply 1.5 ms" in caplog.text
