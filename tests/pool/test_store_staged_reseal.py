# SPDX-License-Identifier: Apache-2.0
"""CompressedKVStore.stage_reseal + reseal_staged (the sidecar's apply split over two threads) equals reseal: the
staging touches no store state, the commit re-checks the pages, and on a GPU the staging's uploads on another stream
are ordered before the commit's pack."""

from __future__ import annotations

import pytest
import torch
from mkv_pool_cases import make_scenario

from mosaickv_sglang.pool import PAGE_SEALED
from mosaickv_sglang.pool.store import pin_plan


def _full_pages(sc):
    return torch.cat([rp[: n // sc.s] for rp, n in zip(sc.req_pages, sc.seq_lens)])


def _twins(seed, device, **shape):
    """Two identical scenarios with every full page sealed dense (a sidecar plan then changes each descriptor)."""
    out = []
    for _ in range(2):
        sc = make_scenario(seed, seq_lens=[64, 37, 48], device=device, **shape)
        pages = _full_pages(sc)
        sc.store.seal(pages, sc.k_bufs, sc.v_bufs, sc.slot_of_page[pages], sc.plans(pages, "dense"))
        out.append(sc)
    return out


def _tables(st):
    # the arenas bitwise (as int16: payload bits that read as fp16 NaN compare unequal as floats)
    return [a.view(torch.int16).cpu() for a in st.arenas] + [t.cpu() for t in (*st.desc, *st.bounds)]


def _host_job(sc, pages, layer):
    """The sidecar's reply for ``pages`` of ``layer``: host K/V laid out as segments and a host plan."""
    k, v = sc.segment_kv(layer, pages)
    plan = sc.plans(pages, "fast", layers=[layer])[0]
    return k.cpu(), v.cpu(), plan.to(torch.device("cpu"))


@pytest.mark.parametrize("seed, head_dim, h_kv", [(0, 64, 1), (1, 128, 3), (2, 64, 4)])
def test_staged_then_committed_equals_reseal(device, seed, head_dim, h_kv):
    a, b = _twins(seed, device, head_dim=head_dim, h_kv=h_kv)
    pages = _full_pages(a)[1::2]
    layer = 1
    keys, values, plan = _host_job(b, pages, layer)
    handle_a = a.store.reseal(pages, a.k_bufs, a.v_bufs, a.slot_of_page[pages], [plan.to(device)], layer_ids=[layer])
    before = b.store.snapshot()
    staged = b.store.stage_reseal(pages, layer, keys, values, plan)
    assert b.store.snapshot() == before, "staging changed the store"
    handle_b = b.store.reseal_staged(staged)
    assert b.store.snapshot() == a.store.snapshot()
    for x, y in zip(_tables(a.store), _tables(b.store)):
        assert torch.equal(x, y)
    assert handle_a.runs[layer][0].tolist() == handle_b.runs[layer][0].tolist()
    a.store.release(handle_a)
    b.store.release(handle_b)
    assert b.store.snapshot() == a.store.snapshot()


def test_a_page_freed_after_staging_is_refused_at_commit(device):
    (sc, _) = _twins(3, device)
    pages = _full_pages(sc)[:3]
    keys, values, plan = _host_job(sc, pages, 0)
    staged = sc.store.stage_reseal(pages, 0, keys, values, plan)
    sc.store.free(pages[1:2])
    before, tables = sc.store.snapshot(), _tables(sc.store)
    with pytest.raises(ValueError, match=r"pages: expected PAGE_SEALED pages in the resealed layer, got 1 that are "
                                         rf"not \(e.g. page {int(pages[1])}\)"):
        sc.store.reseal_staged(staged)
    assert sc.store.snapshot() == before
    assert all(torch.equal(x, y) for x, y in zip(tables, _tables(sc.store)))


def test_bad_staging_inputs_are_refused(device):
    (sc, _) = _twins(4, device)
    st = sc.store
    pages = _full_pages(sc)[:2]
    keys, values, plan = _host_job(sc, pages, 0)
    with pytest.raises(ValueError, match=r"keys: expected shape \[4, 16, 64\], got \[4, 16, 32\]"):
        st.stage_reseal(pages, 0, keys[..., :32], values, plan)
    with pytest.raises(TypeError, match="values: expected torch.Tensor, got list"):
        st.stage_reseal(pages, 0, keys, [0], plan)
    with pytest.raises(ValueError, match="plans: expected"):
        st.stage_reseal(pages[:1], 0, keys[:2], values[:2], plan)
    with pytest.raises(ValueError, match="layer_ids"):
        st.stage_reseal(pages, 5, keys, values, plan)
    with pytest.raises(TypeError, match="staged: expected StagedReseal, got tuple"):
        st.reseal_staged((pages, 0))
    if not torch.device(device).type == "cuda":
        with pytest.raises(ValueError, match="stream: expected None for a store on cpu"):
            st.stage_reseal(pages, 0, keys, values, plan, stream=object())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_staged_on_another_stream_while_a_step_runs_equals_reseal():
    """As the bridge's I/O thread stages: pinned host inputs uploaded on a side stream while the current stream is
    busy (a step in flight); the commit on the current stream waits for the uploads, and the tables equal reseal's."""
    device = torch.device("cuda")
    a, b = _twins(5, device, head_dim=128, h_kv=8)
    pages = _full_pages(a)
    keys, values, plan = _host_job(b, pages, 0)
    keys, values, plan = keys.pin_memory(), values.pin_memory(), pin_plan(plan)
    handle_a = a.store.reseal(pages, a.k_bufs, a.v_bufs, a.slot_of_page[pages], [plan.to(device)], layer_ids=[0])
    side = torch.cuda.Stream(device)
    torch.cuda.synchronize(device)
    torch.cuda._sleep(200_000_000)  # the step in flight, on the current stream
    staged = b.store.stage_reseal(pages, 0, keys, values, plan, stream=side)
    assert staged.stream is side and staged.ready is not None
    handle_b = b.store.reseal_staged(staged)
    del staged  # the device tensors go back to the side stream's pool: record_stream keeps them for the pack
    torch.cuda.synchronize(device)
    assert b.store.snapshot() == a.store.snapshot()
    for x, y in zip(_tables(a.store), _tables(b.store)):
        assert torch.equal(x, y)
    assert (b.store.page_state()[pages] == PAGE_SEALED).all()
    a.store.release(handle_a)
    b.store.release(handle_b)
