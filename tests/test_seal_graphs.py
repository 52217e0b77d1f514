# SPDX-License-Identifier: Apache-2.0
"""Seal graphs (mosaickv_sglang.seal_graphs): a seal padded to its page bucket gets, page for page, the plans the
one-call planner gives it without padding (off CUDA the padded device half runs eagerly; the graphs themselves are
checked by the gpu-marked test below and by tests/integration_cpu/test_pending_seal.py's)."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaickv_sglang import seal_graphs
from mosaickv_sglang.kernels.format import concat_plans
from mosaickv_sglang.plan_layers import plan_fast_layers
from mosaickv_sglang.seal_graphs import SealGraphs, seal_graph_buckets
from mosaickv_sglang.strategies import axes_menu, dense_segment_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PLAN_FIELDS = ("token_keep", "k_form", "k_param", "v_form", "v_param", "k_chan_weight", "v_chan_weight", "flags")


class PoolCase:
    """Per-layer K/V buffers ``[slots, H_kv, d]`` (SGLang's layout) with random contents, a full query window
    ``[L, H_kv, W, G, d]`` and the gather the sealer does (segments page-major, head-minor)."""

    def __init__(self, seed: int, layers: int, h: int, s: int, d: int, g: int, w: int, num_pages: int, dtype,
                 device: str = "cpu"):  # fmt: skip
        gen = torch.Generator().manual_seed(seed)
        self.layers, self.h, self.s, self.d, self.g, self.w = layers, h, s, d, g, w
        self.device = torch.device(device)
        slots = num_pages * s
        self.k = [(torch.randn(slots, h, d, generator=gen) + 0.01).to(self.device, dtype) for _ in range(layers)]
        self.v = [(torch.randn(slots, h, d, generator=gen) + 0.5).to(self.device, dtype) for _ in range(layers)]
        self.window = (1.5 * torch.randn(layers, h, w, g, d, generator=gen)).to(self.device)

    def gather(self, slots: torch.Tensor, num_pages: int, layers: range):
        def segments(bufs):
            return torch.stack([bufs[layer][slots].view(num_pages, self.s, self.h, self.d).permute(0, 2, 1, 3)
                                .reshape(num_pages * self.h, self.s, self.d) for layer in layers])  # fmt: skip

        return segments(self.k), segments(self.v)

    def graphs(self, buckets, menu, **kw) -> SealGraphs:
        return SealGraphs(gather=self.gather, num_layers=self.layers, page_size=self.s, num_kv_heads=self.h,
                          head_dim=self.d, group_size=self.g, window=self.w, menu=menu, buckets=buckets,
                          max_segments=kw.get("max_segments", 8192), max_chunk_bytes=kw.get("max_chunk_bytes", 256 << 20),
                          device=self.device)  # fmt: skip

    def one_call(self, phys: np.ndarray, sinks: np.ndarray, budget: int, menu, **kw):
        """The sealer's one-call planner on the same pages (Sealer.plan_layers without graphs)."""
        p = phys.size
        slots = (torch.from_numpy(phys)[:, None] * self.s + torch.arange(self.s)[None, :]).reshape(-1).to(self.device)
        keys, values = self.gather(slots, p, range(self.layers))
        queries = [self.window[layer].expand(p, *self.window.shape[1:]) for layer in range(self.layers)]
        results = plan_fast_layers(keys, values, budget_bytes=[budget] * self.layers, queries=queries,
                                   group_ids=np.tile(np.arange(self.h), p), always_dense=np.repeat(sinks, self.h),
                                   menu=menu, **kw)  # fmt: skip
        return [r.plan for r in results]


def budget(p: int, h: int, s: int, d: int, sinks: np.ndarray, ratio: float) -> int:
    seg = dense_segment_bytes(s, d)
    fixed = int(np.count_nonzero(sinks)) * h
    return fixed * seg + int((p * h - fixed) * seg / ratio)


def assert_same_plans(got, want):
    assert len(got) == len(want)
    for layer, (a, b) in enumerate(zip(got, want)):
        for name in PLAN_FIELDS:
            x, y = getattr(a, name), getattr(b, name)
            assert x.shape == y.shape and x.dtype == y.dtype, (layer, name, x.shape, y.shape)
            assert torch.equal(x, y), f"layer {layer}, {name}: {(x != y).sum().item()} entries differ"


@settings(max_examples=14, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    d=st.sampled_from([64, 128]),
    g=st.sampled_from([1, 3, 4, 8]),
    s=st.sampled_from([16, 32]),
    h=st.integers(1, 3),
    pages=st.integers(1, 7),
    sinks=st.integers(0, 2),
    ratio=st.floats(1.5, 5.0),
    dtype=st.sampled_from([torch.float32, torch.float16]),
)
def test_a_padded_seal_gets_the_one_call_planners_plans(seed, d, g, s, h, pages, sinks, ratio, dtype):
    case = PoolCase(seed, 2, h, s, d, g, w=5, num_pages=12, dtype=dtype)
    menu = axes_menu("both", s, d, lowrank=False)
    phys = np.random.default_rng(seed).permutation(12)[:pages].astype(np.int64)  # scattered, page-unaligned order
    sink_mask = np.arange(pages) < min(sinks, pages - 1)
    b = budget(pages, h, s, d, sink_mask, ratio)
    graphs = case.graphs((2, 4, 8), menu)
    got = graphs.plan(phys, case.window, np.repeat(sink_mask, h), b)
    assert got is not None and graphs.replays == 1
    assert_same_plans(got, case.one_call(phys, sink_mask, b, menu))


def test_chunks_of_layers_and_a_reused_bucket_give_the_same_plans():
    """Four layers estimated two at a time (the chunk bound), and one bucket serving seals of two sizes in turn."""
    case = PoolCase(7, 4, 2, 16, 64, 4, w=3, num_pages=16, dtype=torch.float16)
    menu = axes_menu("both", 16, 64, lowrank=False)
    bound = dict(max_segments=2 * 8 * 2)  # two layers of an 8-page bucket's 16 segments
    graphs = case.graphs((8,), menu, **bound)
    for pages in (5, 8, 3):
        phys = np.arange(pages, dtype=np.int64)[::-1] * 2
        sinks = np.zeros(pages, dtype=bool)
        sinks[0] = True
        b = budget(pages, 2, 16, 64, sinks, 3.0)
        got = graphs.plan(phys, case.window, np.repeat(sinks, 2), b)
        assert_same_plans(got, case.one_call(phys, sinks, b, menu, max_segments=2 * pages * 2))
    assert graphs.replays == 3


def test_the_plans_vectors_start_aligned_as_the_one_call_planners():
    """Each layer's plan is a slice of one whole plan, as the one-call planner's, and the whole plan's vectors (packed
    in one launch) start 16-byte aligned: the pack kernel's variant the warmup compiles."""
    case = PoolCase(3, 3, 1, 16, 64, 2, w=2, num_pages=8, dtype=torch.float32)
    menu = axes_menu("both", 16, 64, lowrank=False)
    phys = np.array([4, 1, 6], dtype=np.int64)
    sinks = np.zeros(3, dtype=bool)
    b = budget(3, 1, 16, 64, sinks, 3.0)
    got = case.graphs((8,), menu).plan(phys, case.window, sinks, b)
    want = case.one_call(phys, sinks, b, menu)
    for plans in (got, want):
        whole = concat_plans(plans)
        for name in ("k_form", "k_param", "v_form", "v_param", "flags"):
            assert getattr(whole, name).data_ptr() == getattr(plans[0], name).data_ptr(), name  # a view, no copy
            assert getattr(whole, name).data_ptr() % 16 == 0, name


def test_no_graph_applies_beyond_the_largest_bucket_or_with_nothing_to_choose():
    case = PoolCase(5, 2, 2, 16, 64, 1, w=2, num_pages=8, dtype=torch.float32)
    menu = axes_menu("both", 16, 64, lowrank=False)
    graphs = case.graphs((2, 4), menu)
    none = np.zeros(5, dtype=bool)
    assert graphs.plan(np.arange(5, dtype=np.int64), case.window, np.repeat(none, 2), budget(5, 2, 16, 64, none, 3.0)) \
        is None  # fmt: skip
    dense = budget(3, 2, 16, 64, none[:3], 1.0)  # every segment fits dense: nothing to estimate
    assert graphs.plan(np.arange(3, dtype=np.int64), case.window, np.repeat(none[:3], 2), dense) is None
    with pytest.raises(ValueError, match=r"queries: expected shape \[2, 2, 2, 1, 64\]"):
        graphs.plan(np.arange(3, dtype=np.int64), case.window[:, :, :1], np.repeat(none[:3], 2), dense)
    assert graphs.replays == 0 and graphs.bucket_for(3) == 4 and graphs.bucket_for(5) is None


def test_buckets_from_the_environment(monkeypatch):
    monkeypatch.delenv(seal_graphs.ENV_VAR, raising=False)
    assert seal_graph_buckets() == ()
    monkeypatch.setenv(seal_graphs.ENV_VAR, " ")
    assert seal_graph_buckets() == ()
    monkeypatch.setenv(seal_graphs.ENV_VAR, "64, 16,64,256")
    assert seal_graph_buckets() == (16, 64, 256)
    for bad in ("16,x", "0,16", "-4", ","):
        monkeypatch.setenv(seal_graphs.ENV_VAR, bad)
        with pytest.raises(ValueError, match=r"MOSAICKV_SEAL_GRAPH_PAGES: expected comma-separated page counts"):
            seal_graph_buckets()
    with pytest.raises(ValueError, match=r"buckets: expected page counts >= 1"):
        PoolCase(1, 1, 1, 16, 64, 1, 2, 2, torch.float32).graphs((4, 0), axes_menu("both", 16, 64, lowrank=False))


@pytest.mark.gpu
def test_graph_replays_plan_as_the_one_call_planner_on_cuda():
    """On the GPU: one graph captured per bucket at its first seal, replayed for seals of other sizes; the plans
    those replays give match the one-call planner's on the same pages (the same kernels: a segment may differ only
    where atomics' summation order tips a near tie, so at most 1% of them), bf16 and fp16 pools."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for dtype in (torch.bfloat16, torch.float16):
        case = PoolCase(11, 4, 8, 64, 128, 4, w=16, num_pages=64, dtype=dtype, device="cuda")
        menu = axes_menu("both", 64, 128, lowrank=False)
        graphs = case.graphs((16, 32), menu)
        rng = np.random.default_rng(5)
        for pages in (16, 9, 30, 12, 17):
            phys = rng.permutation(64)[:pages].astype(np.int64)
            sinks = np.arange(pages) < 1
            b = budget(pages, 8, 64, 128, sinks, 3.0)
            got = graphs.plan(phys, case.window, np.repeat(sinks, 8), b)
            want = case.one_call(phys, sinks, b, menu)
            assert got is not None
            for a, w in zip(got, want):
                same = torch.ones(a.k_form.shape[0], dtype=torch.bool, device="cuda")
                for name in ("token_keep", "k_form", "k_param", "v_form", "v_param"):
                    ne = getattr(a, name) != getattr(w, name)
                    same &= ~ne.reshape(ne.shape[0], -1).any(1)
                assert same.float().mean().item() >= 0.99, (dtype, pages, same.float().mean().item())
                torch.testing.assert_close(a.k_chan_weight, w.k_chan_weight)
                assert torch.equal(a.flags, w.flags)
        assert graphs.failed is None and graphs.captures == 2 and graphs.replays == 5, graphs.status()
        # the captures' warm-up blocks wait in PyTorch's cache for the scheduler's next idle tick, then go back once
        assert graphs.cache_to_release
        torch.cuda.synchronize()
        held = torch.cuda.memory_reserved()
        assert graphs.release_cache() and not graphs.cache_to_release and graphs.release_cache() is False
        assert torch.cuda.memory_reserved() <= held


def test_off_cuda_nothing_is_captured_so_nothing_waits_to_be_released():
    case = PoolCase(3, 2, 2, 16, 64, 2, w=8, num_pages=12, dtype=torch.float32)
    graphs = case.graphs((4,), axes_menu("both", 16, 64, lowrank=False))
    phys = np.arange(3, dtype=np.int64)
    sinks = np.zeros(3, dtype=bool)
    assert graphs.plan(phys, case.window, np.repeat(sinks, 2), budget(3, 2, 16, 64, sinks, 3.0)) is not None
    assert graphs.captures == 0 and not graphs.cache_to_release and graphs.release_cache() is False


def test_the_idle_hook_releases_the_seal_graphs_cache_of_a_mosaic_scheduler():
    pytest.importorskip("sglang")
    from types import SimpleNamespace

    from mosaickv_sglang.patches.scheduler import release_seal_graph_cache
    from mosaickv_sglang.runtime import register_sealer

    released = []
    release_seal_graph_cache(None, object())  # a stock scheduler (no sealer): nothing to do
    register_sealer(SimpleNamespace(seal_graphs=None))
    try:
        release_seal_graph_cache(None, object())  # no seal graphs
        register_sealer(SimpleNamespace(seal_graphs=SimpleNamespace(release_cache=lambda: released.append(1))))
        release_seal_graph_cache(None, object())
        assert released == [1]
    finally:
        register_sealer(None)


@pytest.mark.parametrize("cuts", [((0, 1), (1, 3), (3, 4)), ((0, 2), (2, 4)), ((0, 4),)])
def test_layer_slices_of_a_bucket_give_the_whole_seals_plans(cuts):
    """Each slice of the layers replays a graph of its own (bucket and layers) and gets those layers' plans of the
    whole seal; a slice is checked for its layers and its queries' shape."""
    case = PoolCase(11, 4, 2, 16, 64, 3, w=4, num_pages=16, dtype=torch.float16)
    menu = axes_menu("both", 16, 64, lowrank=False)
    phys = np.array([9, 2, 5, 14, 0], dtype=np.int64)
    sinks = np.array([True, False, False, False, False])
    b = budget(5, 2, 16, 64, sinks, 2.5)
    graphs = case.graphs((8,), menu)
    sliced = []
    for lo, hi in cuts:
        got = graphs.plan(phys, case.window[lo:hi], np.repeat(sinks, 2), b, range(lo, hi))
        assert got is not None and len(got) == hi - lo
        sliced += got
    assert_same_plans(sliced, case.one_call(phys, sinks, b, menu))
    assert graphs.replays == len(cuts) and len(graphs._buckets) == len(cuts)
    with pytest.raises(ValueError, match="layers: expected a range of consecutive layers within 4"):
        graphs.plan(phys, case.window, np.repeat(sinks, 2), b, range(2, 6))
    with pytest.raises(ValueError, match=r"queries: expected shape \[2, 2, 4, 3, 64\]"):
        graphs.plan(phys, case.window[:3], np.repeat(sinks, 2), b, range(1, 3))


@pytest.mark.parametrize("layers", [range(0, 3), range(1, 3)])
def test_graphs_captured_before_serving_are_captured_on_a_seal_of_page_zero(layers):
    """``capture_meta`` is the metadata a seal of the bucket's size, every page physical page 0 and none always
    dense, at a third of the dense bytes, gives the device half (the planner plans it); off CUDA nothing is captured
    ahead."""
    case = PoolCase(7, 3, 3, 16, 64, 2, w=4, num_pages=8, dtype=torch.float16)
    graphs = case.graphs((2, 5), axes_menu("both", 16, 64, lowrank=False))
    assert graphs.capture_ahead([range(0, 3), range(0, 1), range(1, 3)]) == 0
    assert graphs.captures == 0 and not graphs._buckets
    for pages in graphs.buckets:
        n = pages * 3
        third = n * dense_segment_bytes(16, 64) // 3
        plans = graphs.plan(np.zeros(pages, dtype=np.int64), case.window[layers.start:layers.stop],
                            np.zeros(n, dtype=bool), third, layers)  # fmt: skip
        assert plans is not None and len(plans) == len(layers)
        b = graphs._buckets[(pages, layers.start, layers.stop)]
        np.testing.assert_array_equal(graphs.capture_meta(b), b.meta.numpy())
        assert not np.array_equal(graphs.capture_meta(b)[:-pages], np.zeros(b.meta.numel() - pages))


@pytest.mark.gpu
def test_a_capture_holds_off_the_cyclic_garbage_collector_on_cuda(monkeypatch):
    """On the GPU: Python's cyclic garbage collector is off while a graph is captured (a collection there, freeing the
    CUDA objects that reference cycles hold, invalidated a capture on an H100) and on again after, also when the
    capture fails."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    case = PoolCase(13, 4, 8, 64, 128, 4, w=16, num_pages=64, dtype=torch.bfloat16, device="cuda")
    graphs = case.graphs((16,), axes_menu("both", 64, 128, lowrank=False))
    run, seen = graphs._run, []

    def run_seen(b):
        seen.append((torch.cuda.is_current_stream_capturing(), gc.isenabled()))
        return run(b)

    monkeypatch.setattr(graphs, "_run", run_seen)
    assert gc.isenabled() and graphs.capture_ahead([range(0, 4)]) == 1 and gc.isenabled()
    assert seen == [(False, True), (True, False)], seen  # the warm-up run collects as usual, the captured one not

    def run_fails(b):
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a capture failing")
        return run(b)

    monkeypatch.setattr(graphs, "_run", run_fails)
    assert graphs.capture_ahead([range(0, 2)]) == 0 and graphs.failed and gc.isenabled()


def test_the_collector_held_off_for_a_capture_is_left_as_it_was():
    with pytest.raises(RuntimeError, match="inside"):
        with seal_graphs._no_collection():
            assert not gc.isenabled()
            raise RuntimeError("inside")
    assert gc.isenabled()
    gc.disable()
    try:
        with seal_graphs._no_collection():
            assert not gc.isenabled()
        assert not gc.isenabled()  # off before: not turned on by it
    finally:
        gc.enable()


@pytest.mark.gpu
def test_graphs_captured_before_serving_plan_seals_without_another_capture_on_cuda():
    """On the GPU: every bucket's graph for all layers and for two slices, captured ahead on page 0, then replayed by
    seals of other sizes and pages with no capture more; the plans match the one-call planner's as a graph captured
    at a seal does (at most 1% of segments differing where atomics tip a near tie)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    case = PoolCase(13, 4, 8, 64, 128, 4, w=16, num_pages=64, dtype=torch.bfloat16, device="cuda")
    menu = axes_menu("both", 64, 128, lowrank=False)
    graphs = case.graphs((16, 32), menu)
    assert graphs.capture_ahead([range(0, 4), range(0, 2), range(2, 4)]) == 6
    assert graphs.failed is None and not graphs.cache_to_release
    rng = np.random.default_rng(8)
    for pages in (16, 9, 30, 23):
        phys = rng.permutation(64)[:pages].astype(np.int64)
        sinks = np.arange(pages) < 1
        b = budget(pages, 8, 64, 128, sinks, 3.0)
        whole = graphs.plan(phys, case.window, np.repeat(sinks, 8), b)
        sliced = [p for lo, hi in ((0, 2), (2, 4))
                  for p in graphs.plan(phys, case.window[lo:hi], np.repeat(sinks, 8), b, range(lo, hi))]  # fmt: skip
        want = case.one_call(phys, sinks, b, menu)
        for got in (whole, sliced):
            for a, w in zip(got, want):
                same = torch.ones(a.k_form.shape[0], dtype=torch.bool, device="cuda")
                for name in ("token_keep", "k_form", "k_param", "v_form", "v_param"):
                    ne = getattr(a, name) != getattr(w, name)
                    same &= ~ne.reshape(ne.shape[0], -1).any(1)
                assert same.float().mean().item() >= 0.99, (pages, same.float().mean().item())
                assert torch.equal(a.flags, w.flags)
    assert graphs.captures == 6 and graphs.replays == 12, graphs.status()
