# SPDX-License-Identifier: Apache-2.0
"""Sealing decisions under a full arena are the same on every tensor-parallel rank (the arena ledger decides)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sglang")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helper modules (importlib import mode)

from test_kv_pool import DT, GROUP, H_KV, LAYERS, D, S, _config, build_pool  # noqa: E402

from mosaickv_sglang.sealer import Sealer  # noqa: E402

PAGES_PER_BATCH = 4


def _rank(arena_granules: int, data: str, seed: int):
    pool = build_pool(64 * S, 64 * S, _config(ratio=3.0), arena_granules_per_layer=arena_granules)
    return pool, Sealer(pool, num_q_heads=H_KV * GROUP), torch.Generator().manual_seed(seed), data


def _write(rank, pages: np.ndarray) -> None:
    pool, _, gen, data = rank
    pool.ensure_physical(torch.from_numpy(pages))
    slots = (pool.physical_pages(torch.from_numpy(pages)).long()[:, None] * S + torch.arange(S)).reshape(-1)
    for li in range(LAYERS):
        for buf in (pool.k_buffer[li], pool.v_buffer[li]):
            shape = (slots.numel(),) + tuple(buf.shape[1:])
            buf[slots] = torch.randn(shape, generator=gen).to(DT) if data == "random" else torch.zeros(shape, dtype=DT)
    pool.note_writes((torch.from_numpy(pages)[:, None] * S + torch.arange(S)).reshape(-1))


def test_ranks_whose_heads_compress_differently_seal_the_same_pages_when_the_arena_fills():
    """Rank 0 holds random K/V (its plans use their whole budget), rank 1 zeros (the cheapest plans reach zero
    error, so its arenas barely fill). With an arena for about 2.5 batches at ratio 3, a decision taken from each
    rank's own arena would seal every batch on rank 1 but not on rank 0. The ledger makes both take the same
    decisions: two batches at ratio 3, the third at a higher ratio, the fourth left dense, and after a free the fifth
    sealed again."""
    probe = build_pool(64 * S, 64 * S, _config(ratio=3.0))
    per_batch = int(probe.arena_ledger.reservation(np.zeros(PAGES_PER_BATCH, dtype=bool), 3.0).sum())
    arena = int(2.5 * per_batch * 1.05) + 1
    ranks = [_rank(arena, "random", 1), _rank(arena, "zeros", 2)]
    outcomes = []
    for b in range(5):
        pages = np.arange(1 + b * PAGES_PER_BATCH, 1 + (b + 1) * PAGES_PER_BATCH, dtype=np.int64)
        if b == 4:  # free the first batch on both ranks, as SGLang's one allocator would
            for pool, *_ in ranks:
                pool.free_pages(torch.arange(1, 1 + PAGES_PER_BATCH))
        for rank in ranks:
            _write(rank, pages)
        sealed = [sealer.seal(pages, np.zeros(pages.size, dtype=bool)) for _, sealer, *_ in ranks]
        assert sealed[0] == sealed[1], f"batch {b}: rank 0 sealed={sealed[0]}, rank 1 sealed={sealed[1]}"
        a, z = (r[0] for r in ranks)
        assert torch.equal(a.store.page_state(), z.store.page_state())
        assert np.array_equal(a._l2p, z._l2p)
        assert a.arena_ledger.reserved == z.arena_ledger.reserved
        outcomes.append(sealed[0])
        for pool, *_ in ranks:
            pool.check_invariants()
    assert outcomes == [True, True, True, False, True]
    used = [sum(al.used_granules for al in r[0].store.allocators) for r in ranks]
    assert used[1] < used[0] <= ranks[0][0].store.arena_granules_per_layer * LAYERS


def test_status_line_every_interval_in_which_pages_were_sealed(caplog):
    from mosaickv_sglang import sealer as sealer_mod

    pool, sealer, *_ = rank = _rank(10**6, "random", 3)
    pages = np.arange(1, 1 + PAGES_PER_BATCH, dtype=np.int64)
    _write(rank, pages)
    t0 = sealer._logged_at
    with caplog.at_level(logging.INFO, logger=sealer_mod.__name__):
        sealer.maybe_log_status(t0 + sealer_mod.STATUS_LOG_INTERVAL + 1)  # nothing sealed yet: quiet
        assert sealer.seal(pages, np.zeros(pages.size, dtype=bool))
        sealer.stalls.note_plan(0.0412, 0.0389, 0.0002)
        sealer.maybe_log_status(t0 + 1)  # too soon
        sealer.maybe_log_status(t0 + sealer_mod.STATUS_LOG_INTERVAL + 2)
        sealer.maybe_log_status(t0 + 3 * sealer_mod.STATUS_LOG_INTERVAL)  # nothing new since: quiet
    lines = [r.getMessage() for r in caplog.records if "pages sealed" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith(f"MosaicKV: {PAGES_PER_BATCH} pages sealed (0 under hot-pool pressure, 0 left dense")
    assert f"room for {pool.admissible_tokens()} more tokens" in lines[0]
    assert "; slowest decode plans 41.2 ms (seal 38.9, sidecar 0.2, rows 0.0, gc 0.0, copies 0.0)" in lines[0]


def test_a_fragmented_arena_is_compacted_instead_of_leaving_admitted_pages_dense(caplog):
    """The ninth run's soak: payloads freed in any order had cut an arena's free room into pieces smaller than one
    dense segment, so a batch the ledger admitted stayed dense ('although its ledger has room') until the hot pool ran
    out. Here one-row payloads fill the arena, every other page is freed (holes of 6 granules, a tail of 8), and a
    sink page (dense payloads of 16 granules) is sealed through the sealer: each layer's arena is compacted and the
    page sealed, nothing logged as an error."""
    from mosaickv_sglang.kernels.format import SegmentPlan

    n_tiny, seg_side = 40, S * D * 2 // 128  # granules of one dense K (or V) payload
    pool = build_pool(64 * S, 64 * S, _config(ratio=3.0), arena_granules_per_layer=n_tiny * H_KV * 2 + 8)
    sealer = Sealer(pool, num_q_heads=H_KV * GROUP)
    rank = (pool, sealer, torch.Generator().manual_seed(3), "random")
    tiny = np.arange(1, 1 + n_tiny, dtype=np.int64)
    _write(rank, tiny)
    plan = SegmentPlan.uniform(n_tiny * H_KV, S, D)
    plan.token_keep[:, 1:] = False  # one row kept: one granule a side
    pool.seal_pages(torch.from_numpy(tiny), [plan] * LAYERS)
    pool.free_pages(torch.from_numpy(tiny[::2]))
    alloc = pool.store.allocators[0]
    assert alloc.largest_free < seg_side <= alloc.free_granules // (2 * H_KV), "holes too small, room enough in all"
    sink = np.array([n_tiny + 1], dtype=np.int64)
    _write(rank, sink)
    with caplog.at_level(logging.ERROR, logger="mosaickv_sglang.sealer"):
        assert sealer.seal(sink, np.ones(1, dtype=bool))
    assert not [r for r in caplog.records if "although its ledger has room" in r.getMessage()]
    assert pool.store.compactions == LAYERS and sealer.pages_left_dense == 0
    assert pool.store.is_sealed(torch.from_numpy(np.concatenate([tiny[1::2], sink]))).all()
    pool.check_invariants()


def test_seal_chunking_from_the_environment(monkeypatch):
    """MOSAICKV_SEAL_MAX_SEGMENTS / MOSAICKV_SEAL_MAX_CHUNK_BYTES reach the one-call planner of every seal; bad
    values are named."""
    from mosaickv_sglang import sealer as sealer_mod
    from mosaickv_sglang.plan_layers import DEFAULT_MAX_CHUNK_BYTES, DEFAULT_MAX_SEGMENTS

    monkeypatch.delenv("MOSAICKV_SEAL_MAX_SEGMENTS", raising=False)
    monkeypatch.delenv("MOSAICKV_SEAL_MAX_CHUNK_BYTES", raising=False)
    assert sealer_mod.seal_chunking() == (DEFAULT_MAX_SEGMENTS, DEFAULT_MAX_CHUNK_BYTES)
    monkeypatch.setenv("MOSAICKV_SEAL_MAX_SEGMENTS", " 32768 ")
    monkeypatch.setenv("MOSAICKV_SEAL_MAX_CHUNK_BYTES", "1073741824")
    pool, sealer, *_ = rank = _rank(10**6, "random", 4)
    assert (sealer.plan_max_segments, sealer.plan_max_chunk_bytes) == (32768, 1 << 30)
    seen = []
    real = sealer_mod.plan_fast_layers

    def spy(*args, **kwargs):
        seen.append((kwargs["max_segments"], kwargs["max_chunk_bytes"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(sealer_mod, "plan_fast_layers", spy)
    pages = np.arange(1, 1 + PAGES_PER_BATCH, dtype=np.int64)
    _write(rank, pages)
    assert sealer.seal(pages, np.zeros(pages.size, dtype=bool))
    assert seen and set(seen) == {(32768, 1 << 30)}
    for env, bad in (("MOSAICKV_SEAL_MAX_SEGMENTS", "0"), ("MOSAICKV_SEAL_MAX_CHUNK_BYTES", "1GB")):
        monkeypatch.setenv(env, bad)
        with pytest.raises(ValueError, match=f"{env}: expected an integer >= 1, got '{bad}'"):
            sealer_mod.seal_chunking()
        monkeypatch.setenv(env, "8")
