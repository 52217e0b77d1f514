# SPDX-License-Identifier: Apache-2.0
"""CompressedKVStore end to end: seal -> decode/extend metadata -> kernels, against references and dense attention."""

from __future__ import annotations

import pytest
import torch
from mkv_pool_cases import FP16_TOL, dense_attention, make_scenario

from mosaickv_sglang.kernels.extend import extend_fwd
from mosaickv_sglang.kernels.format import FLAG_ALWAYS_READ, FLAGS
from mosaickv_sglang.kernels.reference import ref_extend, ref_sparse_decode
from mosaickv_sglang.kernels.segment_scores import segment_scores_fwd, select_segments
from mosaickv_sglang.kernels.sparse_decode import sparse_decode_fwd

# ragged batch: empty-ish, single token, page-aligned, odd lengths (S = 16)
SEQ_LENS = [1, 16, 37, 80, 113]


def _seal_all(sc, kind, hot_window=16, sink_tokens=16, ratio=3.0):
    """Seal every sealable page of every request in one batch; returns the pages and their sink mask."""
    pages, sinks = [], []
    for b, rp in enumerate(sc.req_pages):
        p, ad = sc.store.pages_to_seal(rp, sc.seq_lens[b], hot_window, sink_tokens)
        pages.append(p)
        sinks.append(ad)
    pages, sinks = torch.cat(pages), torch.cat(sinks)
    plans = sc.plans(pages, kind, always_dense=sinks, ratio=ratio)
    sc.store.seal(pages, sc.k_bufs, sc.v_bufs, sc.slot_of_page[pages], plans)
    return pages, sinks


def _decode(sc, layer, q, meta, num_splits=1):
    st = sc.store
    scores = torch.empty(meta.seg_ids_padded.shape, dtype=torch.float32, device=q.device)
    segment_scores_fwd(q, st.desc[layer], st.bounds[layer], meta.seg_ids_padded, meta.seg_counts, scores)
    sel = select_segments(scores, meta.seg_ids_padded, meta.max_segs)  # budget = everything
    bsz, h_q, d = q.shape
    out = torch.empty_like(q)
    po = torch.empty(bsz, h_q, num_splits, d, dtype=torch.float32, device=q.device)
    pl = torch.empty(bsz, h_q, num_splits, dtype=torch.float32, device=q.device)
    sparse_decode_fwd(q, st.arenas[layer], st.desc[layer], sel, sc.k_bufs[layer], sc.v_bufs[layer],
                      meta.tail_indptr, meta.tail_indices, out, po, pl, num_splits=num_splits)  # fmt: skip
    return out, sel


@pytest.mark.parametrize("kind,h_kv,group,layers", [("dense", 3, 2, 2), ("fast", 2, 1, 1), ("chan", 1, 3, 1)])
def test_seal_then_decode_matches_reference(device, kind, h_kv, group, layers):
    """Sealed pages + dense tails through segment_scores -> select_segments (all) -> sparse_decode_fwd equal
    ref_sparse_decode on the same metadata; sealed tokens are exactly those that left the tail."""
    sc = make_scenario(1, seq_lens=SEQ_LENS, h_kv=h_kv, num_layers=layers, device=device)
    pages, sinks = _seal_all(sc, kind)
    st = sc.store
    assert bool(st.is_sealed(pages).all()) and int(st.page_state().eq(2).sum()) == pages.numel()
    meta = st.decode_metadata(sc.req_pages, sc.tails())
    # every request: sealed segments * S + tail == its tokens
    for b, n in enumerate(SEQ_LENS):
        n_tail = int(meta.tail_indptr[b + 1] - meta.tail_indptr[b])
        assert int(meta.seg_counts[b]) * st.page_size + n_tail == n
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(len(SEQ_LENS), h_kv * group, st.head_dim, generator=gen).half().to(device)
    for layer in range(st.num_layers):
        out, sel = _decode(sc, layer, q, meta, num_splits=2)
        ref = ref_sparse_decode(q, st.arenas[layer], st.desc[layer], sel, sc.k_bufs[layer], sc.v_bufs[layer],
                                meta.tail_indptr, meta.tail_indices)  # fmt: skip
        torch.testing.assert_close(out.double().cpu(), ref, **FP16_TOL)
        if kind == "dense":  # lossless: equals plain attention over the original tokens
            for b in range(len(SEQ_LENS)):
                slots = sc.token_slots(b)
                dense = dense_attention(q[b].cpu(), sc.k_bufs[layer][slots].cpu(), sc.v_bufs[layer][slots].cpu())
                torch.testing.assert_close(out[b].double().cpu(), dense, **FP16_TOL)
        # sink pages carry FLAG_ALWAYS_READ (planned always-dense), others do not
        rows = (pages[:, None] * h_kv + torch.arange(h_kv)).reshape(-1)
        flags = st.desc[layer][rows.to(device), FLAGS].cpu()
        if kind == "fast":
            assert torch.equal(flags & FLAG_ALWAYS_READ, sinks.repeat_interleave(h_kv).int())
    if kind == "fast":
        assert st.compression_ratio() > 1.5, "plan_fast at ratio 3 compresses the non-sink pages"
    elif kind == "dense":
        assert st.compression_ratio() < 1.0, "dense payloads plus descriptors and bounds cost more than dense"


def test_decode_metadata_layout_and_fixed_width(device):
    """seg_ids_padded lists page * H_kv + head of the sealed pages in request order, -1 padded to MAX_SEGS; a fixed
    max_segs pads further and a too-small one raises."""
    sc = make_scenario(3, seq_lens=[70, 20, 0 + 1], h_kv=2, device=device)
    st = sc.store
    p0 = sc.req_pages[0][[0, 2]]  # seal pages 0 and 2 of request 0 only (out of order w.r.t. the tail)
    st.seal(p0, sc.k_bufs, sc.v_bufs, sc.slot_of_page[p0], sc.plans(p0, "dense"))
    meta = st.decode_metadata(sc.req_pages, sc.tails(), max_segs=4)
    ids = meta.seg_ids_padded.cpu()
    assert ids.shape == (3, 2, 4) and ids.dtype == torch.int32
    want = torch.stack([p0 * 2, p0 * 2 + 1])  # [H, 2]
    assert torch.equal(ids[0, :, :2], want.int()) and bool((ids[0, :, 2:] == -1).all())
    assert bool((ids[1:] == -1).all()) and meta.seg_counts.tolist() == [2, 0, 0]
    assert meta.tail_indptr.tolist() == [0, 70 - 32, 70 - 32 + 20, 70 - 32 + 21]
    assert st.decode_metadata(sc.req_pages, sc.tails()).max_segs == 2
    with pytest.raises(ValueError, match="max_segs: expected >= the most sealed pages"):
        st.decode_metadata(sc.req_pages, sc.tails(), max_segs=1)
    with pytest.raises(ValueError, match="tails: expected one tensor per request"):
        st.decode_metadata(sc.req_pages, sc.tails()[:2])


def test_extend_over_sealed_prefix_matches_reference_and_dense(device):
    """extend_fwd over (sealed prefix pages + dense prefix tail + new tokens) with the store's extend metadata equals
    ref_extend, and with an all-dense plan equals causal attention over the original tokens."""
    prefix = [37, 16, 5]
    new = [3, 1, 4]
    sc = make_scenario(4, seq_lens=[p + n for p, n in zip(prefix, new)], h_kv=2, device=device)
    st = sc.store
    d, layer, g = st.head_dim, 1, 2
    # seal the complete prefix pages (no hot window, no sinks)
    pages = torch.cat([rp[: p // st.page_size] for rp, p in zip(sc.req_pages, prefix)])
    st.seal(pages, sc.k_bufs, sc.v_bufs, sc.slot_of_page[pages], sc.plans(pages, "dense"))
    prefix_pages, prefix_tails, q_l, k_l, v_l = [], [], [], [], []
    gen = torch.Generator().manual_seed(5)
    for b, (p, n) in enumerate(zip(prefix, new)):
        slots = sc.token_slots(b)
        npg = -(-p // st.page_size)
        prefix_pages.append(sc.req_pages[b][:npg])
        sealed_tok = st.is_sealed(sc.req_pages[b][:npg]).repeat_interleave(st.page_size)[:p]
        prefix_tails.append(slots[:p][~sealed_tok])
        k_l.append(sc.k_bufs[layer][slots[p:]])
        v_l.append(sc.v_bufs[layer][slots[p:]])
        q_l.append(torch.randn(n, 2 * g, d, generator=gen).half().to(device))
    meta = st.extend_metadata(prefix_pages, prefix_tails, new)
    q, k, v = torch.cat(q_l), torch.cat(k_l), torch.cat(v_l)
    out = torch.empty_like(q)
    ks, vs = meta.alloc_scratch(torch.float16)
    args = (q, k, v, out, meta.qo_indptr, meta.max_extend_len, st.arenas[layer], st.desc[layer], meta.seg_ids,
            sc.k_bufs[layer], sc.v_bufs[layer], meta.tail_indptr, meta.tail_indices, ks, vs)  # fmt: skip
    extend_fwd(*args)
    ref = ref_extend(*args)
    torch.testing.assert_close(out.double().cpu(), ref, **FP16_TOL)
    at = 0
    for b, (p, n) in enumerate(zip(prefix, new)):
        slots = sc.token_slots(b)
        for i in range(n):
            vis = slots[: p + i + 1]
            dense = dense_attention(q[at + i].cpu(), sc.k_bufs[layer][vis].cpu(), sc.v_bufs[layer][vis].cpu())
            torch.testing.assert_close(out[at + i].double().cpu(), dense, **FP16_TOL)
        at += n
