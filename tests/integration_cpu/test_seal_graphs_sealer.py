# SPDX-License-Identifier: Apache-2.0
"""A sealer with seal graphs (MOSAICKV_SEAL_GRAPH_PAGES) plans and seals a pool's pages as one without them: through
its page bucket once every layer's query window is full, without a graph before."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sglang")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helper modules (importlib import mode)

from test_kv_pool import DT, GROUP, H_KV, LAYERS, D, S, _config, build_pool  # noqa: E402

from mosaickv_sglang import pending_seal, seal_graphs  # noqa: E402
from mosaickv_sglang.sealer import Sealer  # noqa: E402

WINDOW = 6
PAGES = np.array([3, 1, 7, 2, 9], dtype=np.int64)  # not in page order, not a bucket's size
SINKS = np.array([True, False, False, False, False])


def _pool(seed: int):
    pool = build_pool(64 * S, 64 * S, _config(ratio=3.0))
    gen = torch.Generator().manual_seed(seed)
    pages = torch.arange(1, 11)
    pool.ensure_physical(pages)
    slots = (pool.physical_pages(pages).long()[:, None] * S + torch.arange(S)).reshape(-1)
    for li in range(LAYERS):
        for buf in (pool.k_buffer[li], pool.v_buffer[li]):
            buf[slots] = torch.randn((slots.numel(),) + tuple(buf.shape[1:]), generator=gen).to(DT)
    pool.note_writes((pages[:, None] * S + torch.arange(S)).reshape(-1))
    return pool


def _sealer(pool, monkeypatch, buckets: str) -> Sealer:
    monkeypatch.setenv(seal_graphs.ENV_VAR, buckets)
    return Sealer(pool, num_q_heads=H_KV * GROUP, query_window=WINDOW)


def _observe(sealers, rows: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for li in range(LAYERS):
        q = torch.randn(rows, H_KV * GROUP, D, generator=gen)
        for sealer in sealers:
            sealer.window.observe(li, q)


def _assert_same(a, b) -> None:
    for layer, (x, y) in enumerate(zip(a, b)):
        for name in ("token_keep", "k_form", "k_param", "v_form", "v_param", "k_chan_weight", "v_chan_weight", "flags"):
            assert torch.equal(getattr(x, name), getattr(y, name)), (layer, name)


def test_plans_through_the_bucket_once_the_window_is_full(monkeypatch):
    pool = _pool(1)
    graphed, plain = _sealer(pool, monkeypatch, "4,8"), _sealer(pool, monkeypatch, "")
    assert graphed.seal_graphs is not None and plain.seal_graphs is None
    _observe((graphed, plain), 4, 2)  # 4 of 6 queries per layer: not yet a full window
    _assert_same(graphed.plan_layers(PAGES, SINKS, 3.0), plain.plan_layers(PAGES, SINKS, 3.0))
    assert graphed.seal_graphs.replays == 0
    _observe((graphed, plain), 3, 3)  # full, the ring wrapped once
    _assert_same(graphed.plan_layers(PAGES, SINKS, 3.0), plain.plan_layers(PAGES, SINKS, 3.0))
    _assert_same(graphed.plan_layers(PAGES[:3], SINKS[:3], 2.0), plain.plan_layers(PAGES[:3], SINKS[:3], 2.0))
    assert graphed.seal_graphs.replays == 2
    big = np.arange(1, 10, dtype=np.int64)  # 9 pages: above the largest bucket, planned without a graph
    _assert_same(graphed.plan_layers(big, np.zeros(9, dtype=bool), 3.0), plain.plan_layers(big, np.zeros(9, dtype=bool),
                                                                                            3.0))  # fmt: skip
    assert graphed.seal_graphs.replays == 2


def test_pages_sealed_through_a_bucket_pack_as_without_it(monkeypatch, caplog):
    pools = [_pool(4), _pool(4)]
    sealers = [_sealer(pools[0], monkeypatch, "8"), _sealer(pools[1], monkeypatch, "")]
    _observe(sealers, WINDOW, 5)
    assert all(sealer.seal(PAGES, SINKS) for sealer in sealers)
    assert sealers[0].seal_graphs.replays == 1
    for pool in pools:
        pool.check_invariants()
        assert pool.sealed_in_layer(PAGES, 0).all()
    assert pools[0].store.compression_ratio() == pools[1].store.compression_ratio() > 1.5
    sealers[0].status_interval = 0.0
    with caplog.at_level("INFO", logger="mosaickv_sglang.sealer"):
        sealers[0].maybe_log_status(now=1e12)
    assert "(seal graphs: 1 replays, 0 captured in 0.0 s, 0 MiB)" in caplog.text


def test_a_layer_slice_plans_its_layers_as_all_layers_at_once(monkeypatch):
    """MOSAICKV_SEAL_LAYER_SLICES' unit: plan_layers of one layer at a time gives each layer the plan of one call for
    all of them, through the bucket's slice graphs (a graph per slice) and without graphs."""
    pool = _pool(6)
    graphed, plain = _sealer(pool, monkeypatch, "8"), _sealer(pool, monkeypatch, "")
    _observe((graphed, plain), WINDOW, 7)
    whole = plain.plan_layers(PAGES, SINKS, 3.0)
    for sealer in (graphed, plain):
        sliced = [plan for li in range(LAYERS) for plan in sealer.plan_layers(PAGES, SINKS, 3.0, range(li, li + 1))]
        _assert_same(sliced, whole)
    assert graphed.seal_graphs.replays == LAYERS and len(graphed.seal_graphs._buckets) == LAYERS


@pytest.mark.parametrize("beside, slices, want", [
    (False, 1, [range(0, LAYERS)]),
    (False, 2, [range(0, LAYERS)]),  # layer slices are planned beside the step only
    (True, 1, [range(0, LAYERS)]),
    (True, 2, [range(0, LAYERS), range(0, (LAYERS + 1) // 2), range((LAYERS + 1) // 2, LAYERS)]),
])  # fmt: skip
def test_graphs_captured_before_serving_cover_whole_seals_and_their_layer_slices(monkeypatch, beside, slices, want):
    pool = _pool(6)
    monkeypatch.setenv("MOSAICKV_SEAL_LAYER_SLICES", str(slices))
    sealer = _sealer(pool, monkeypatch, "4,8")
    sealer.seal_beside_step = beside
    asked = []
    monkeypatch.setattr(sealer.seal_graphs, "capture_ahead", lambda ranges: asked.append(list(ranges)) or 7)
    assert sealer.capture_seal_graphs_ahead() == 7 and asked == [want]
    assert _sealer(pool, monkeypatch, "").capture_seal_graphs_ahead() == 0


def test_seal_slice_pages_plans_larger_seals_in_more_slices_and_captures_each_buckets_own(monkeypatch):
    """MOSAICKV_SEAL_SLICE_PAGES=4 with 2 layer slices on 8 layers: a seal is planned in 2 slices per 4 pages of its
    seal graph's bucket (of its pages without graphs), at most one a layer, and the graphs captured before serving
    are those slices' for each bucket."""
    pool = build_pool(64 * S, 64 * S, _config(ratio=3.0), layers=8)
    monkeypatch.setenv("MOSAICKV_SEAL_LAYER_SLICES", "2")
    monkeypatch.setenv("MOSAICKV_SEAL_SLICE_PAGES", "4")
    graphed, plain = _sealer(pool, monkeypatch, "4,8,16"), _sealer(pool, monkeypatch, "")
    for sealer in (graphed, plain):
        sealer.seal_beside_step, sealer._launch_hooked = True, True
    assert [len(graphed._slices_for_start(n)) for n in (1, 4, 5, 8, 9, 16, 17)] == [2, 2, 4, 4, 8, 8, 8]
    assert [len(plain._slices_for_start(n)) for n in (1, 4, 5, 9, 13)] == [2, 2, 4, 6, 8]
    assert graphed._slices_for_start(8) == pending_seal.layer_slices(8, 4)
    asked = []
    monkeypatch.setattr(graphed.seal_graphs, "capture_ahead",
                        lambda ranges, per_bucket: asked.append((list(ranges), per_bucket)) or 5)  # fmt: skip
    assert graphed.capture_seal_graphs_ahead() == 5
    assert asked == [([range(0, 8)], {b: pending_seal.layer_slices(8, n) for b, n in ((4, 2), (8, 4), (16, 8))})]
    with pytest.raises(ValueError, match=r"bucket_ranges: expected buckets among \[4, 8, 16\], got \[32\]"):
        seal_graphs.SealGraphs.capture_ahead(graphed.seal_graphs, [], {32: [range(0, 8)]})
