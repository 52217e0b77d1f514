# SPDX-License-Identifier: Apache-2.0
"""Arena compaction: a seal that only fragmentation blocks succeeds; payloads, descriptors and pending reseal runs
follow their data; the chunked device copy equals a plain one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mkv_pool_cases import make_scenario

from mosaickv_sglang.kernels.format import GRANULE_ELEMS
from mosaickv_sglang.kernels.reference import ref_unpack_segment
from mosaickv_sglang.pool import PAGE_SEALED, ArenaFullError, CompressedKVStore
from mosaickv_sglang.pool.compaction import move_runs, packed_offsets


def _decoded(store, layer):
    """``{descriptor row: (K, V)}`` of every sealed segment of ``layer``, decoded from the arena."""
    h = store.num_kv_heads
    pages = np.flatnonzero(store.page_state(layer).numpy() == PAGE_SEALED)
    desc = store.desc[layer].cpu()
    arena = store.arenas[layer].cpu()
    return {int(r): ref_unpack_segment(arena, desc[r], store.head_dim) for p in pages for r in range(p * h, p * h + h)}


def _assert_runs_consistent(store, layer, extra_runs=()):
    """Allocated granules are exactly the live runs (sealed segments' K and V, plus ``extra_runs``), disjoint."""
    h = store.num_kv_heads
    pages = np.flatnonzero(store.page_state(layer).numpy() == PAGE_SEALED)
    rows = (pages[:, None] * h + np.arange(h)).reshape(-1)
    off = np.concatenate([store._k_off[layer, rows], store._v_off[layer, rows], *[o for o, _ in extra_runs]])
    sz = np.concatenate([store._k_gran[layer, rows], store._v_gran[layer, rows], *[s for _, s in extra_runs]])
    alloc = store.allocators[layer]
    alloc.check_invariants()
    assert int(sz.sum()) == alloc.used_granules
    taken = np.zeros(alloc.capacity, dtype=np.int32)
    for o, s in zip(off, sz):
        taken[o : o + s] += 1
    free = np.zeros(alloc.capacity, dtype=np.int32)
    for o, s in zip(*alloc.extents()):
        free[o : o + s] += 1
    assert (taken + free == 1).all(), "every granule is either in exactly one live run or free"
    desc = store.desc[layer].cpu().numpy()
    assert (desc[rows, 5] == store._k_off[layer, rows]).all() and (desc[rows, 6] == store._v_off[layer, rows]).all()


def _seal_chan_then_free_every_other(sc):
    """Seal every full page with chan plans (small payloads), then free every other page in arena order: many holes
    of one chan page each. Returns the pages kept and the pages freed."""
    st = sc.store
    pages = torch.cat([rp[: n // sc.s] for rp, n in zip(sc.req_pages, sc.seq_lens)])
    st.seal(pages, sc.k_bufs, sc.v_bufs, sc.slot_of_page[pages], sc.plans(pages, "chan"))
    by_addr = pages[np.argsort(st._k_off[0, pages.numpy() * st.num_kv_heads], kind="stable")]
    st.free(by_addr[::2])
    return by_addr[1::2], by_addr[::2]


@pytest.mark.parametrize("h,d", [(1, 64), (2, 128)])
@pytest.mark.parametrize("seed", [0, 1])
def test_seal_blocked_only_by_fragmentation_compacts_and_succeeds(device, h, d, seed):
    """Holes smaller than one dense payload but enough free granules in all: the seal compacts each layer once and
    succeeds; the pages that moved decode to exactly what they did before, the new ones to their dense tokens."""
    s, layers = 16, 2
    sc = make_scenario(20 + seed, seq_lens=[16 * 9, 16 * 7 + 5, 16 * 4], num_layers=layers, h_kv=h, head_dim=d,
                       device=device)  # fmt: skip
    chan_k, chan_v = (int(g[0]) for g in sc.plans(sc.req_pages[0][:1], "chan")[0].granules())
    dense_k, dense_v = (int(g[0]) for g in sc.plans(sc.req_pages[0][:1], "dense")[0].granules())
    n_full = sum(n // s for n in sc.seq_lens)
    # an arena that holds every full page chan-packed, and a few granules more
    st = CompressedKVStore(layers, sc.store.num_pages, s, h, d, torch.float16, device,
                           n_full * h * (chan_k + chan_v) + dense_k // 2)  # fmt: skip
    for rp in sc.req_pages:
        st.mark_dense(rp)
    sc.store = st
    kept, freed = _seal_chan_then_free_every_other(sc)
    before = [_decoded(st, li) for li in range(layers)]
    alloc = st.allocators[0]
    assert alloc.largest_free < dense_k, "no hole holds one dense payload: sealing without compaction must fail"
    new = freed[: alloc.free_granules // (h * (dense_k + dense_v))]
    assert new.numel() >= 2
    st.mark_dense(new)
    st.seal(new, sc.k_bufs, sc.v_bufs, sc.slot_of_page[new], sc.plans(new, "dense"))
    assert st.compactions == layers and st.granules_compacted > 0
    for li in range(layers):
        _assert_runs_consistent(st, li)
        after = _decoded(st, li)
        for r, (k, v) in before[li].items():
            assert torch.equal(after[r][0], k) and torch.equal(after[r][1], v)
        for p in new.tolist():
            slots = sc.slot_of_page[p]
            for hh in range(h):
                k, v = after[p * h + hh]
                assert torch.equal(k, sc.k_bufs[li][slots, hh].float().cpu())
                assert torch.equal(v, sc.v_bufs[li][slots, hh].float().cpu())
    assert (st.page_state().numpy()[kept.numpy()] == PAGE_SEALED).all()


def test_seal_that_does_not_fit_changes_nothing_and_does_not_compact(device):
    """Fewer free granules than the batch needs: the seal fails as before, with no compaction and nothing changed;
    a batch that fits the holes as they are is placed without compaction."""
    s, h, d = 16, 1, 64
    sc = make_scenario(30, seq_lens=[16 * 6], num_layers=1, h_kv=h, head_dim=d, device=device)
    pages = sc.req_pages[0]
    dense_k, dense_v = (int(g[0]) for g in sc.plans(pages[:1], "dense")[0].granules())
    st = CompressedKVStore(1, sc.store.num_pages, s, h, d, torch.float16, device, 5 * h * (dense_k + dense_v))
    st.mark_dense(pages)
    sc.store = st
    st.seal(pages[:5], sc.k_bufs, sc.v_bufs, sc.slot_of_page[pages[:5]], sc.plans(pages[:5], "dense"))
    st.free(pages[1:4:2])  # two holes of one page each, not adjacent
    st.mark_dense(pages[1:4:2])
    three = torch.cat([pages[1:4:2], pages[5:]])
    before = st.snapshot()
    with pytest.raises(ArenaFullError, match="expected room for"):
        st.seal(three, sc.k_bufs, sc.v_bufs, sc.slot_of_page[three], sc.plans(three, "dense"))
    assert st.snapshot() == before and st.compactions == 0
    two = pages[1:4:2]
    st.seal(two, sc.k_bufs, sc.v_bufs, sc.slot_of_page[two], sc.plans(two, "dense"))
    assert st.compactions == 0 and st.allocators[0].free_granules == 0
    _assert_runs_consistent(st, 0)


def test_compaction_moves_pending_reseal_runs(device):
    """Old payloads of a pending reseal handle move with the compaction; releasing the handle afterwards frees
    exactly the moved runs."""
    s, h, d = 16, 2, 64
    sc = make_scenario(40, seq_lens=[16 * 6, 16 * 5], num_layers=1, h_kv=h, head_dim=d, device=device)
    st = sc.store
    pages = torch.cat([rp[: n // s] for rp, n in zip(sc.req_pages, sc.seq_lens)])
    st.seal(pages, sc.k_bufs, sc.v_bufs, sc.slot_of_page[pages], sc.plans(pages, "dense"))
    st.free(pages[::3])
    kept = torch.tensor([p for i, p in enumerate(pages.tolist()) if i % 3])
    handle = st.reseal(kept[:4], sc.k_bufs, sc.v_bufs, sc.slot_of_page[kept[:4]], sc.plans(kept[:4], "chan"))
    before = _decoded(st, 0)
    old_runs = (handle.runs[0][0].copy(), handle.runs[0][1].copy())
    moved = st.compact(0)
    assert moved > 0 and st.allocators[0].num_extents == 1
    assert not np.array_equal(handle.runs[0][0], old_runs[0]) and np.array_equal(handle.runs[0][1], old_runs[1])
    _assert_runs_consistent(st, 0, extra_runs=[handle.runs[0]])
    after = _decoded(st, 0)
    assert after.keys() == before.keys()
    for r in before:
        assert torch.equal(after[r][0], before[r][0]) and torch.equal(after[r][1], before[r][1])
    st.release(handle)
    _assert_runs_consistent(st, 0)
    assert st.compact(0) == 0 or st.allocators[0].num_extents == 1
    st.free(kept)
    assert st.allocators[0].used_granules == 0 and st.allocators[0].num_extents == 1


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 1 << 18])
@pytest.mark.parametrize("seed", [0, 1])
def test_move_runs_equals_a_plain_copy(device, chunk, seed):
    """Random disjoint runs packed to the front, copied in chunks of any size, equal a copy through a clone."""
    rng = np.random.default_rng(seed)
    n = 40
    sizes = rng.integers(1, 9, n)
    gaps = rng.integers(0, 6, n)
    offsets = np.cumsum(gaps + sizes) - sizes  # disjoint, ascending, with gaps
    perm = rng.permutation(n)
    offsets, sizes = offsets[perm], sizes[perm]
    cap = int((offsets + sizes).max()) + 3
    arena = torch.randn(cap * GRANULE_ELEMS, generator=torch.Generator().manual_seed(seed)).half().to(device)
    order, new = packed_offsets(offsets, sizes)
    assert (new <= offsets).all() and np.array_equal(np.sort(new), np.cumsum(sizes[order]) - sizes[order])
    expect = arena.clone().view(-1, GRANULE_ELEMS)
    src_view = arena.clone().view(-1, GRANULE_ELEMS)
    for o, nw, sz in zip(offsets, new, sizes):
        expect[nw : nw + sz] = src_view[o : o + sz]
    moving = order[new[order] != offsets[order]]
    move_runs(arena, offsets[moving], new[moving], sizes[moving], chunk_granules=chunk)
    used = int(sizes.sum())
    assert torch.equal(arena.view(-1, GRANULE_ELEMS)[:used], expect[:used])


def test_compaction_rejects_bad_layouts():
    with pytest.raises(ValueError, match="disjoint runs"):
        packed_offsets(np.array([0, 3], dtype=np.int64), np.array([4, 2], dtype=np.int64))
    arena = torch.zeros(16 * GRANULE_ELEMS, dtype=torch.float16)
    with pytest.raises(ValueError, match="packed runs at or below"):
        move_runs(arena, np.array([0], dtype=np.int64), np.array([2], dtype=np.int64), np.array([2], dtype=np.int64))
