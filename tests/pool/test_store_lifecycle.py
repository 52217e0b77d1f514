# SPDX-License-Identifier: Apache-2.0
"""CompressedKVStore lifecycle: free returns every granule, a full arena changes nothing, reseal double-buffers."""

from __future__ import annotations

import pytest
import torch
from mkv_pool_cases import FP16_TOL, make_scenario

from mosaickv_sglang.kernels.format import SegmentPlan
from mosaickv_sglang.kernels.reference import ref_sparse_decode
from mosaickv_sglang.pool import PAGE_DENSE, PAGE_FREE, PAGE_SEALED, ArenaFullError, CompressedKVStore


def _tables(store):
    return [t.clone() for t in (*store.arenas, *store.desc, *store.bounds)]


def _full_pages(sc):
    return torch.cat([rp[: n // sc.s] for rp, n in zip(sc.req_pages, sc.seq_lens)])


def test_free_returns_every_granule(device):
    """Freeing all sealed pages returns every granule (one coalesced extent per layer); freeing a dense page only
    changes its state; a double free raises and changes nothing."""
    sc = make_scenario(11, seq_lens=[64, 33, 48], num_layers=2, h_kv=2, device=device)
    st = sc.store
    pages = _full_pages(sc)
    half = pages[::2]
    st.seal(half, sc.k_bufs, sc.v_bufs, sc.slot_of_page[half], sc.plans(half, "chan"))
    rest = pages[1::2]
    st.seal(rest, sc.k_bufs, sc.v_bufs, sc.slot_of_page[rest], sc.plans(rest, "dense"))
    assert all(a.used_granules > 0 for a in st.allocators)
    assert st.bytes_used() > 0 and st.sealed_segments() == 2 * pages.numel() * 2
    dense_page = sc.req_pages[1][-1:]  # request 1 (33 tokens) has an incomplete third page, still dense
    assert st.page_state()[dense_page].item() == PAGE_DENSE
    st.free(torch.cat([pages, dense_page]))
    for a in st.allocators:
        a.check_invariants()
        assert a.used_granules == 0 and a.num_extents == 1
    assert st.bytes_used() == 0 and st.compression_ratio() == 1.0
    assert bool((st.page_state()[pages] == PAGE_FREE).all())
    before = st.snapshot()
    with pytest.raises(ValueError, match="double free"):
        st.free(pages[:1])
    with pytest.raises(ValueError, match="pages: expected distinct page ids"):
        st.free(torch.tensor([sc.req_pages[0][0].item()] * 2))
    assert st.snapshot() == before
    # the pages can be reused
    st.mark_dense(pages)
    st.seal(pages, sc.k_bufs, sc.v_bufs, sc.slot_of_page[pages], sc.plans(pages, "dense"))
    assert bool(st.is_sealed(pages).all())


def test_arena_full_leaves_store_unchanged(device):
    """When a later layer's arena cannot hold its payloads, earlier layers are rolled back: allocators, page states,
    payload runs and the arena/descriptor/bounds tensors are exactly as before."""
    s, h, d = 16, 2, 64
    dense_seg = 2 * s * d // 64  # granules of one segment's K + V, dense
    sc = make_scenario(12, seq_lens=[64, 48], num_layers=2, h_kv=h, device=device, arena_granules=6 * h * dense_seg)
    st = sc.store
    first = sc.req_pages[0][:3]
    st.seal(first, sc.k_bufs, sc.v_bufs, sc.slot_of_page[first], sc.plans(first, "dense", layers=[1]), layer_ids=[1])
    assert st.allocators[0].used_granules == 0 and st.allocators[1].free_granules == 3 * h * dense_seg
    more = torch.cat([sc.req_pages[0][3:], sc.req_pages[1]])  # 1 + 3 pages: fit layer 0 (6 free), not layer 1 (3)
    before, tables = st.snapshot(), _tables(st)
    with pytest.raises(ArenaFullError, match="arena of layer 1: expected room for"):
        st.seal(more, sc.k_bufs, sc.v_bufs, sc.slot_of_page[more], sc.plans(more, "dense"))
    assert st.snapshot() == before
    for a, b in zip(tables, _tables(st)):
        assert torch.equal(a.view(torch.int16) if a.is_floating_point() else a,
                           b.view(torch.int16) if b.is_floating_point() else b)  # fmt: skip
    assert int(st.page_state(0).eq(PAGE_SEALED).sum()) == 0
    # a bad argument also changes nothing
    with pytest.raises(ValueError, match="plans: expected one SegmentPlan per sealed layer"):
        st.seal(more, sc.k_bufs, sc.v_bufs, sc.slot_of_page[more], sc.plans(more, "dense")[:1])
    with pytest.raises(ValueError, match="pages: expected PAGE_DENSE pages"):
        st.seal(first, sc.k_bufs, sc.v_bufs, sc.slot_of_page[first], sc.plans(first, "dense", layers=[1]),
                layer_ids=[1])  # fmt: skip
    assert st.snapshot() == before
    # what fits still seals
    st.seal(more[:2], sc.k_bufs, sc.v_bufs, sc.slot_of_page[more[:2]], sc.plans(more[:2], "dense"))
    # partially sealed pages (layer 1 only) are not sealed in the pool view
    assert st.is_sealed(first).tolist() == [False] * 3 and st.is_sealed(first, layer_id=1).tolist() == [True] * 3


def test_reseal_keeps_old_payloads_until_release(device):
    """reseal packs new payloads next to the old ones and swaps descriptors; the old descriptors still decode to the
    old output until release, which then frees exactly the old granules."""
    sc = make_scenario(13, seq_lens=[64, 40], num_layers=1, h_kv=1, device=device)
    st = sc.store
    pages = _full_pages(sc)
    st.seal(pages, sc.k_bufs, sc.v_bufs, sc.slot_of_page[pages], sc.plans(pages, "dense"))
    used_old = st.allocators[0].used_granules
    meta = st.decode_metadata(sc.req_pages, sc.tails())
    q = torch.randn(2, 2, st.head_dim, generator=torch.Generator().manual_seed(3)).half().to(device)
    sel = meta.seg_ids_padded

    def ref(desc):
        return ref_sparse_decode(q, st.arenas[0], desc, sel, sc.k_bufs[0], sc.v_bufs[0], meta.tail_indptr,
                                 meta.tail_indices)  # fmt: skip

    old_desc = st.desc[0].clone()
    out_old = ref(old_desc)
    handle = st.reseal(pages, sc.k_bufs, sc.v_bufs, sc.slot_of_page[pages], sc.plans(pages, "chan"))
    assert st.pending_releases == 1 and handle.granules == used_old
    used_new = st.allocators[0].used_granules - used_old
    assert 0 < used_new < used_old, "chan payloads are smaller than dense ones"
    torch.testing.assert_close(ref(old_desc), out_old, rtol=0, atol=0)  # old payloads untouched
    out_new = ref(st.desc[0])
    assert not torch.allclose(out_new, out_old, **FP16_TOL), "the live descriptors point at the new payloads"
    # the live tables equal a fresh seal with the new plan
    fresh = CompressedKVStore(1, st.num_pages, st.page_size, 1, st.head_dim, torch.float16, device, 4096)
    fresh.mark_dense(pages)
    fresh.seal(pages, sc.k_bufs, sc.v_bufs, sc.slot_of_page[pages], sc.plans(pages, "chan"))
    torch.testing.assert_close(out_new, ref_sparse_decode(q, fresh.arenas[0], fresh.desc[0], sel, sc.k_bufs[0],
                               sc.v_bufs[0], meta.tail_indptr, meta.tail_indices), rtol=0, atol=0)  # fmt: skip
    st.release(handle)
    assert st.pending_releases == 0 and st.allocators[0].used_granules == used_new
    with pytest.raises(ValueError, match="released twice"):
        st.release(handle)
    st.free(pages)
    assert st.allocators[0].used_granules == 0 and st.allocators[0].num_extents == 1
    with pytest.raises(ValueError, match="pages: expected PAGE_SEALED pages"):
        st.reseal(pages[:0].new_tensor([sc.req_pages[1][-1].item()]), sc.k_bufs, sc.v_bufs,
                  sc.slot_of_page[sc.req_pages[1][-1:]], [SegmentPlan.uniform(1, 16, 64)])  # fmt: skip


def test_store_rejects_bad_configuration():
    """Constructor arguments are validated with '<arg>: expected <x>, got <y>'."""
    with pytest.raises(ValueError, match="page_size: expected a power of two"):
        CompressedKVStore(1, 4, 24, 1, 64, torch.float16, "cpu", 16)
    with pytest.raises(ValueError, match="head_dim: expected one of"):
        CompressedKVStore(1, 4, 16, 1, 96, torch.float16, "cpu", 16)
    with pytest.raises(ValueError, match="dtype: expected one of"):
        CompressedKVStore(1, 4, 16, 1, 64, torch.float32, "cpu", 16)
    with pytest.raises(ValueError, match="num_layers: expected an integer >= 1"):
        CompressedKVStore(0, 4, 16, 1, 64, torch.float16, "cpu", 16)


def test_each_layers_descriptor_table_starts_where_its_own_allocation_would():
    """Three rows a layer (3 pages, 1 head): the layers' tables, views of one ``desc_table``, still start 512 bytes
    apart, so the pack kernel's layer alignment is its largest, the warm-up's (with 3 rows apart it compiled another
    variant mid-serving); a write through a layer's table is the table's."""
    from mosaickv_sglang.kernels.pack import LAYER_ALIGN_MAX, _layer_table

    st = CompressedKVStore(3, 3, 16, 1, 64, torch.float16, "cpu", 64)
    base = st.desc_table.data_ptr()
    assert [t.data_ptr() - base for t in st.desc] == [0, 512, 1024]
    assert all(tuple(t.shape) == (3, 8) and t.is_contiguous() for t in st.desc)
    st.desc[2][1, 5] = 7
    assert int(st.desc_table[2, 1, 5]) == 7
    apart = tuple(4096 * j for j in range(3))
    ptrs = (apart, apart, apart, tuple(t.data_ptr() for t in st.desc), apart)
    assert _layer_table(ptrs, 2, torch.device("cpu"))[1] == LAYER_ALIGN_MAX
