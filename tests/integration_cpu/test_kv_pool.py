# SPDX-License-Identifier: Apache-2.0
"""MosaicMHATokenToKVPool driven by SGLang 0.5.17's own classes on the CPU.

The pool is built by SGLang's real ``KVCacheConfigurator._build_mha_kv_pool`` (its global-context getters stubbed,
the pool class substituted the way the integration hook will), logical pages come from SGLang's real
``PagedTokenToKVPoolAllocator`` (``alloc_extend`` / ``alloc_decode`` kernels in Triton's interpreter), writes go
through ``set_kv_buffer`` with logical slots (bare and as ``KVWriteLoc``), and decode over sealed pages + dense tails
is checked against plain attention, ``ref_sparse_decode`` and SGLang's ``TorchNativeAttnBackend``.
"""

from __future__ import annotations

import functools
import logging
from types import SimpleNamespace
from typing import Dict, List, Optional

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

pytest.importorskip("sglang")

import sglang.srt.mem_cache.kv_cache_configurator as kcc  # noqa: E402
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.memory_pool import KVWriteLoc  # noqa: E402

from mosaickv_sglang.config import MosaicKVConfig  # noqa: E402
from mosaickv_sglang.kernels.format import SegmentPlan  # noqa: E402
from mosaickv_sglang.kernels.reference import ref_sparse_decode  # noqa: E402
from mosaickv_sglang.kernels.segment_scores import segment_scores_fwd, select_segments  # noqa: E402
from mosaickv_sglang.kernels.sparse_decode import sparse_decode_fwd  # noqa: E402
from mosaickv_sglang.kv_pool import HotPoolFullError, MosaicMHATokenToKVPool  # noqa: E402
from mosaickv_sglang.planner import plan_fast  # noqa: E402
from mosaickv_sglang.pool import PAGE_FREE  # noqa: E402
from mosaickv_sglang.strategies.base import dense_segment_bytes  # noqa: E402

S, D, H_KV, GROUP, LAYERS = 16, 64, 3, 2, 2
DT = torch.float16
FP16_TOL = dict(atol=3e-3, rtol=3e-3)
# ragged prompts: single token, page-aligned, odd lengths crossing pages (S = 16)
SEQ_LENS = [1, 16, 37, 80, 113]  # 18 pages
HOT = 384  # dense capacity of the SEQ_LENS tests: 24 physical pages


def _config(ratio: float = 1.0, hot_window: int = 16, sink_tokens: int = 16) -> MosaicKVConfig:
    return MosaicKVConfig("mosaic", compression_ratio=ratio, segment_size=S, hot_window=hot_window,
                          sink_tokens=sink_tokens, decode_read_budget=0, sidecar=False)  # fmt: skip


def build_pool(
    size: int, hot_tokens: int, cfg: MosaicKVConfig, layers: int = LAYERS, **extra
) -> MosaicMHATokenToKVPool:
    """The pool as SGLang's ``_build_mha_kv_pool`` constructs it, with the class substituted by a partial."""
    stub = SimpleNamespace(
        kv_cache_dtype_str="auto", pool_page_size=S, kv_cache_dtype=DT, device="cpu", post_capture_kv_active=False,
        model_config=SimpleNamespace(get_num_kv_heads=lambda tp: H_KV, head_dim=D, v_head_dim=D),
        layer_info=SimpleNamespace(num_effective_layers=layers, start_layer=0, end_layer=layers),
    )  # fmt: skip
    cls = functools.partial(MosaicMHATokenToKVPool, mosaic_config=cfg, hot_tokens=hot_tokens, **extra)
    pool = build_mha_kv_pool(stub, size, cls)
    assert isinstance(pool, MosaicMHATokenToKVPool)
    return pool


def build_mha_kv_pool(configurator: object, size: int, pool_class: object) -> object:
    """SGLang's ``KVCacheConfigurator._build_mha_kv_pool`` on ``configurator`` (its global-context getters stubbed
    for one CPU rank without speculative decoding or PD multiplexing)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kcc, "get_schedule", lambda: SimpleNamespace(prefill_only_disable_kv_cache=False))
        mp.setattr(kcc, "get_parallel", lambda: SimpleNamespace(attn_tp_size=1))
        mp.setattr(kcc, "get_exec", lambda: SimpleNamespace(features=SimpleNamespace(enable_memory_saver=False)))
        mp.setattr(kcc, "get_disagg", lambda: SimpleNamespace(enable_pdmux=False))
        mp.setattr(kcc, "get_spec", lambda: SimpleNamespace(speculative_algorithm=None))
        return kcc.KVCacheConfigurator._build_mha_kv_pool(configurator, max_total_num_tokens=size,
                                                          mha_pool_class=pool_class)  # fmt: skip


def _layer(layer_id: int) -> SimpleNamespace:
    """The attributes of a ``RadixAttention`` that the pool and the torch-native backend read."""
    return SimpleNamespace(
        layer_id=layer_id, tp_q_head_num=H_KV * GROUP, tp_k_head_num=H_KV, qk_head_dim=D, v_head_dim=D,
        scaling=D**-0.5, is_cross_attention=False, sliding_window_size=None,
    )  # fmt: skip


class Harness:
    """A pool, SGLang's paged allocator over it, and the K/V truth of every written logical slot.

    ``free_request`` also calls ``pool.free_pages`` on the pages the allocator released: what the integration hook on
    ``PagedTokenToKVPoolAllocator._release_page_ids`` will do.
    """

    def __init__(self, pool: MosaicMHATokenToKVPool, seed: int) -> None:
        self.pool = pool
        self.alloc = PagedTokenToKVPoolAllocator(pool.size, page_size=S, dtype=DT, device="cpu", kvcache=pool,
                                                 need_sort=False)  # fmt: skip
        n_slots = pool.num_logical_pages * S
        self.k = [torch.zeros(n_slots, H_KV, D, dtype=DT) for _ in range(pool.layer_num)]
        self.v = [torch.zeros(n_slots, H_KV, D, dtype=DT) for _ in range(pool.layer_num)]
        self.reqs: List[torch.Tensor] = []
        self.gen = torch.Generator().manual_seed(seed)

    def write(self, slots: torch.Tensor) -> None:
        """ensure_physical (the out-of-graph step) then set_kv_buffer in every layer, bare loc and KVWriteLoc."""
        self.pool.ensure_physical(torch.unique(slots // S))
        for li in range(self.pool.layer_num):
            k = torch.randn(slots.numel(), H_KV, D, generator=self.gen).to(DT)
            v = torch.randn(slots.numel(), H_KV, D, generator=self.gen).to(DT)
            loc = KVWriteLoc(slots) if li % 2 == 0 else slots
            self.pool.set_kv_buffer(_layer(li), loc, k, v)
            self.k[li][slots], self.v[li][slots] = k, v

    def add_requests(self, lens: List[int]) -> Optional[List[int]]:
        """Allocate fresh requests with SGLang's alloc_extend and write their prompts; None when out of pages."""
        n = len(lens)
        zeros = torch.zeros(n, dtype=torch.int64)
        seq = torch.tensor(lens, dtype=torch.int64)
        out = self.alloc.alloc_extend(zeros, zeros, seq, seq, torch.full((n,), -1, dtype=torch.int64), int(sum(lens)))
        if out is None:
            return None
        ids = []
        for part in torch.split(out, lens):
            self.write(part)
            self.reqs.append(part.clone())
            ids.append(len(self.reqs) - 1)
        return ids

    def decode_step(self, ids: List[int]) -> torch.Tensor:
        """One new token for each request in ``ids`` with SGLang's alloc_decode; returns the new logical slots."""
        new_lens = torch.tensor([self.reqs[i].numel() + 1 for i in ids], dtype=torch.int64)
        last = torch.tensor([int(self.reqs[i][-1]) for i in ids], dtype=torch.int64)
        out = self.alloc.alloc_decode(new_lens, new_lens, last)
        assert out is not None
        for j, i in enumerate(ids):
            self.reqs[i] = torch.cat([self.reqs[i], out[j : j + 1]])
        return out

    def free_request(self, i: int) -> None:
        slots = self.reqs[i]
        self.alloc.free(slots)
        self.pool.free_pages(torch.unique(slots // S))  # the allocator hook's job
        self.reqs[i] = torch.zeros(0, dtype=torch.int64)

    def segment_kv(self, layer: int, pages: torch.Tensor):
        """Written K, V of the segments of ``pages``, page-major and head-minor: ``[P * H_kv, S, d]`` each."""
        slots = pages[:, None] * S + torch.arange(S)
        k = self.k[layer][slots].permute(0, 2, 1, 3).reshape(-1, S, D)
        v = self.v[layer][slots].permute(0, 2, 1, 3).reshape(-1, S, D)
        return k, v

    def plans(self, pages: torch.Tensor, always_dense: torch.Tensor, ratio: float) -> List[SegmentPlan]:
        """plan_fast for every layer: ``ratio`` on the non-sink segments, sinks dense (always read)."""
        n = pages.numel() * H_KV
        ad = always_dense.repeat_interleave(H_KV)
        n_fixed = int(ad.sum())
        budget = n_fixed * dense_segment_bytes(S, D) + int((n - n_fixed) * dense_segment_bytes(S, D) / ratio)
        out = []
        for li in range(self.pool.layer_num):
            k, v = self.segment_kv(li, pages)
            q = torch.randn(n, 4, GROUP, D, generator=self.gen)
            out.append(plan_fast(k.float(), v.float(), budget_bytes=budget, queries=q, always_dense=ad).plan)
        return out

    def seal_sealable(self, ratio: float) -> torch.Tensor:
        """Seal every page pages_to_seal lists (hot window and sinks from the config); returns the pages."""
        pages, sinks = [], []
        for slots in self.reqs:
            if slots.numel():
                sp = self.pool.pages_to_seal(slots)
                pages.append(sp.pages)
                sinks.append(sp.always_dense)
        p, ad = torch.cat(pages), torch.cat(sinks)
        self.pool.seal_pages(p, self.plans(p, ad, ratio))
        return p

    def check_unsealed_readback(self) -> None:
        """Every written token of a page that still has a physical page reads back what was written."""
        for slots in self.reqs:
            if slots.numel() == 0:
                continue
            mapped = self.pool.physical_pages(slots // S) >= 0
            s = slots[mapped]
            phys = self.pool.physical_slots(s)
            for li in range(self.pool.layer_num):
                assert torch.equal(self.pool.get_key_buffer(li)[phys], self.k[li][s])
                assert torch.equal(self.pool.get_value_buffer(li)[phys], self.v[li][s])


def _kernel_decode(pool: MosaicMHATokenToKVPool, layer: int, q: torch.Tensor, meta, num_splits: int = 2):
    """segment_scores -> select_segments (budget = every segment) -> sparse_decode over the pool's buffers."""
    st_ = pool.store
    scores = torch.empty(meta.seg_ids_padded.shape, dtype=torch.float32)
    segment_scores_fwd(q, st_.desc[layer], st_.bounds[layer], meta.seg_ids_padded, meta.seg_counts, scores)
    sel = select_segments(scores, meta.seg_ids_padded, meta.max_segs)
    k_buf, v_buf = pool.get_kv_buffer(layer)
    bsz, h_q, d = q.shape
    out = torch.empty_like(q)
    po = torch.empty(bsz, h_q, num_splits, d, dtype=torch.float32)
    pl = torch.empty(bsz, h_q, num_splits, dtype=torch.float32)
    sparse_decode_fwd(q, st_.arenas[layer], st_.desc[layer], sel, k_buf, v_buf, meta.tail_indptr, meta.tail_indices,
                      out, po, pl, num_splits=num_splits)  # fmt: skip
    return out, sel


def _dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """float64 GQA softmax attention of ``q`` ``[H_q, d]`` over ``k``/``v`` ``[n, H_kv, d]``."""
    g = q.shape[0] // k.shape[1]
    kk = k.double().repeat_interleave(g, dim=1)
    vv = v.double().repeat_interleave(g, dim=1)
    sc = torch.einsum("hd,nhd->hn", q.double(), kk) / q.shape[1] ** 0.5
    return torch.einsum("hn,nhd->hd", torch.softmax(sc, -1), vv)


# --------------------------------------------------------------------------------------------------------------------
def test_built_by_sglang_builder_with_hot_buffers_and_one_log_line(caplog):
    """SGLang's _build_mha_kv_pool constructs the pool from its own kwargs plus the two MosaicKV ones; the dense
    buffers hold hot_tokens + one padding page, sizes count dense + store bytes, one INFO line names the ratio."""
    with caplog.at_level(logging.INFO, logger="mosaickv_sglang.kv_pool"):
        pool = build_pool(512, 128, _config(ratio=3.0))
    assert pool.size == 512 and pool.num_logical_pages == 512 // S + 1
    assert tuple(pool.k_buffer[0].shape) == (128 + S, H_KV, D) and len(pool.v_buffer) == LAYERS
    assert pool.num_free_physical_pages == 128 // S and pool.page_table.tolist()[:2] == [0, -1]
    dense = sum(b.numel() * 2 for b in pool.k_buffer + pool.v_buffer)
    assert sum(pool.get_kv_size_bytes()) == dense + pool.store_size_bytes()
    assert pool.store.arena_granules_per_layer == -(-512 * H_KV * 2 * D * 2 // 3 // 128)  # every logical token at 3x
    lines = [r.getMessage() for r in caplog.records if r.name == "mosaickv_sglang.kv_pool"]
    assert len(lines) == 1 and "Mosaic KV Cache is allocated" in lines[0] and "compression ratio: 3.00" in lines[0]
    pool.check_invariants()


def _direct_kwargs(**over):
    kw = dict(page_size=S, dtype=DT, head_num=H_KV, head_dim=D, v_head_dim=D, layer_num=LAYERS, device="cpu",
              enable_memory_saver=False, start_layer=0, end_layer=LAYERS, enable_alt_stream=True,
              enable_kv_cache_copy=False, post_capture_active=False, mosaic_config=_config(),
              hot_tokens=64)  # fmt: skip
    kw.update(over)
    return kw


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(page_size=32), ValueError, "page_size: expected the MosaicKV segment size 16, got 32"),
        (dict(hot_tokens=40), ValueError, "hot_tokens: expected a multiple of page_size"),
        (dict(hot_tokens=0), ValueError, "hot_tokens: expected an integer >= 16"),
        (dict(dtype=torch.float8_e4m3fn), ValueError, "dtype: expected one of"),
        (dict(v_head_dim=32), ValueError, "v_head_dim: expected head_dim"),
        (dict(head_dim=96, v_head_dim=96), ValueError, "head_dim: expected one of"),
        (dict(enable_kv_cache_copy=True), NotImplementedError, "speculative decoding"),
        (dict(post_capture_active=True), NotImplementedError, "post-capture KV sizing"),
        (dict(quant_method=object()), NotImplementedError, "KV cache quantization"),
        (dict(mosaic_config={"compressor": "mosaic"}), TypeError, "mosaic_config: expected MosaicKVConfig"),
    ],
)
def test_constructor_rejects_unsupported_settings(over, exc, match):
    """Settings the pool cannot serve fail at construction with a message naming the argument or feature."""
    MosaicMHATokenToKVPool(256, **_direct_kwargs())  # positive control
    with pytest.raises(exc, match=match):
        MosaicMHATokenToKVPool(256, **_direct_kwargs(**over))


def test_ragged_writes_read_back_through_physical_slots():
    """Ragged prompts and a decode step allocated by SGLang's paged allocator, written at logical slots (bare and
    KVWriteLoc), read back equal through physical_slots; physical pages are assigned only to written pages, lowest
    first, distinct, and the padding slot stays the padding slot."""
    pool = build_pool(512, HOT, _config())
    h = Harness(pool, seed=0)
    ids = h.add_requests(SEQ_LENS)
    assert ids is not None
    n_pages = sum(-(-n // S) for n in SEQ_LENS)
    assert pool.num_free_physical_pages == HOT // S - n_pages
    h.check_unsealed_readback()
    new = h.decode_step(ids)
    h.write(new)
    h.check_unsealed_readback()
    assert pool.num_free_physical_pages == HOT // S - sum(-(-(n + 1) // S) for n in SEQ_LENS)
    all_slots = torch.cat(h.reqs)
    phys = pool.physical_slots(all_slots)
    assert torch.unique(phys).numel() == phys.numel() and int(phys.min()) >= S and int(phys.max()) < HOT + S
    assert pool.physical_slots(torch.arange(S)).tolist() == list(range(S))  # padded writes go to the padding page
    # pages allocated but never written hold no physical page
    spare = h.alloc.alloc(2 * S)
    assert pool.physical_pages(torch.unique(spare // S)).tolist() == [-1, -1]
    pool.check_invariants()


def test_hot_pool_full_is_all_or_nothing_and_debug_checks_catch_unmapped_slots(monkeypatch):
    """ensure_physical beyond the dense capacity raises HotPoolFullError and changes nothing; writes to unmapped
    pages land in the padding page, and MOSAICKV_DEBUG_CHECKS=1 turns them into an error."""
    pool = build_pool(512, 64, _config())
    pool.ensure_physical(torch.tensor([3, 5]))
    before = (pool.page_table.clone(), pool.num_free_physical_pages, pool.store.snapshot())
    with pytest.raises(HotPoolFullError, match="hot pages: expected 3 free physical dense pages, got 2"):
        pool.ensure_physical(torch.tensor([3, 7, 8, 9]))
    assert torch.equal(pool.page_table, before[0]) and pool.num_free_physical_pages == before[1]
    assert pool.store.snapshot() == before[2]
    unmapped = torch.tensor([9 * S + 4])
    assert pool.physical_slots(unmapped).tolist() == [4]
    monkeypatch.setenv("MOSAICKV_DEBUG_CHECKS", "1")
    with pytest.raises(ValueError, match="logical_slots: expected slots of pages with a physical page"):
        pool.physical_slots(unmapped)
    pool.check_invariants()


@pytest.mark.parametrize("ratio", [1.0, 3.0])
def test_seal_then_kernel_decode_matches_dense_and_reference(ratio):
    """Pages sealed with plan_fast plans (ratio 1: all dense; ratio 3), then decode through segment_scores ->
    select_segments (all) -> sparse_decode over the pool's arenas and physical tails: equal to plain attention over
    the written tokens (ratio 1) and to ref_sparse_decode on the same metadata (both). Sealing returns the pages'
    physical pages; sealed + tail tokens are exactly each request's tokens."""
    pool = build_pool(512, HOT, _config(ratio=ratio))
    h = Harness(pool, seed=1)
    h.add_requests(SEQ_LENS)
    free_before = pool.num_free_physical_pages
    sealed = h.seal_sealable(ratio)
    assert sealed.numel() > 0 and pool.num_free_physical_pages == free_before + sealed.numel()
    assert bool(pool.store.is_sealed(sealed).all())
    h.check_unsealed_readback()
    pool.check_invariants()
    meta = pool.decode_metadata(h.reqs)
    for b, n in enumerate(SEQ_LENS):
        n_tail = int(meta.tail_indptr[b + 1] - meta.tail_indptr[b])
        assert int(meta.seg_counts[b]) * S + n_tail == n
    q = torch.randn(len(SEQ_LENS), H_KV * GROUP, D, generator=h.gen).to(DT)
    for layer in range(LAYERS):
        out, sel = _kernel_decode(pool, layer, q, meta)
        k_buf, v_buf = pool.get_kv_buffer(layer)
        ref = ref_sparse_decode(q, pool.store.arenas[layer], pool.store.desc[layer], sel, k_buf, v_buf,
                                meta.tail_indptr, meta.tail_indices)  # fmt: skip
        torch.testing.assert_close(out.double(), ref, **FP16_TOL)
        if ratio == 1.0:
            for b, slots in enumerate(h.reqs):
                dense = _dense_attention(q[b], h.k[layer][slots], h.v[layer][slots])
                torch.testing.assert_close(out[b].double(), dense, **FP16_TOL)
    if ratio == 3.0:
        assert pool.store.compression_ratio() > 1.5


def test_kernel_decode_after_seal_matches_sglang_torch_native_backend():
    """SGLang's TorchNativeAttnBackend decodes one step on the pool (its set_kv_buffer call writes the new token
    through a KVWriteLoc of logical slots; its req_to_token table holds the translated physical slots, as the MosaicKV
    backend's contract says); after sealing at ratio 1 (all dense), our kernels over sealed segments + physical tails
    give the same output."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    pool = build_pool(512, HOT, _config(ratio=1.0))
    h = Harness(pool, seed=2)
    ids = h.add_requests(SEQ_LENS)
    new = h.decode_step(ids)
    pool.ensure_physical(torch.unique(new // S))  # out of graph, before the forward that writes them
    bsz, max_len = len(ids), max(r.numel() for r in h.reqs)
    req_to_token = torch.zeros(bsz, max_len, dtype=torch.int64)
    for b, slots in enumerate(h.reqs):
        req_to_token[b, : slots.numel()] = pool.physical_slots(slots)
    runner = SimpleNamespace(device="cpu", req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
                             token_to_kv_pool=pool)  # fmt: skip
    backend = TorchNativeAttnBackend(runner)
    batch = SimpleNamespace(out_cache_loc=new, req_pool_indices=torch.arange(bsz),
                            seq_lens=torch.tensor([r.numel() for r in h.reqs]), encoder_lens=None)  # fmt: skip
    backend.init_forward_metadata(batch)
    q = torch.randn(bsz, H_KV * GROUP, D, generator=h.gen).to(DT)
    sglang_out = []
    for layer in range(LAYERS):
        k_new = torch.randn(bsz, H_KV, D, generator=h.gen).to(DT)
        v_new = torch.randn(bsz, H_KV, D, generator=h.gen).to(DT)
        o = backend.forward_decode(q.reshape(bsz, -1), k_new, v_new, _layer(layer), batch, save_kv_cache=True)
        h.k[layer][new], h.v[layer][new] = k_new, v_new
        sglang_out.append(o.view(bsz, H_KV * GROUP, D))
    h.check_unsealed_readback()  # the backend's write landed at the translated slots
    h.seal_sealable(1.0)
    meta = pool.decode_metadata(h.reqs)
    assert int(meta.seg_counts.sum()) > 0
    for layer in range(LAYERS):
        out, _ = _kernel_decode(pool, layer, q, meta)
        torch.testing.assert_close(out.float(), sglang_out[layer].float(), **FP16_TOL)


def test_free_returns_physical_pages_and_arena_granules_exactly():
    """Freeing every request through SGLang's allocator (plus the hook's free_pages) returns all physical pages, all
    arena granules and all store pages; the allocator gets its pages back; reset() after new writes does the same."""
    pool = build_pool(512, HOT, _config(ratio=3.0))
    h = Harness(pool, seed=3)
    n_alloc = h.alloc.available_size()
    h.add_requests(SEQ_LENS)
    h.seal_sealable(3.0)
    assert any(a.used_granules for a in pool.store.allocators)
    for i in range(len(h.reqs)):
        h.free_request(i)
    assert pool.num_free_physical_pages == HOT // S
    assert all(a.used_granules == 0 and a.free_granules == a.capacity for a in pool.store.allocators)
    assert bool((pool.store.page_state() == PAGE_FREE).all()) and pool.page_table.tolist()[1:] == [-1] * 32
    assert h.alloc.available_size() == n_alloc
    pool.check_invariants()
    h.add_requests([40, 70])
    h.seal_sealable(1.0)
    h.alloc.clear()  # SGLang's allocator reset; the hook calls pool.reset() with it
    pool.reset()
    h.reqs = []
    assert pool.num_free_physical_pages == HOT // S and pool.store.allocators[0].used_granules == 0
    pool.check_invariants()
    h.add_requests([40])
    sealed = h.seal_sealable(1.0)
    with pytest.raises(ValueError, match="pages: expected pages that are free or dense, got 1 sealed"):
        pool.ensure_physical(sealed[:1])  # sealed pages are read-only


def test_disabled_paths_raise_not_implemented():
    """Paths SGLang must not use with this pool fail loudly, naming the feature."""
    pool = build_pool(256, 64, _config())
    loc = torch.arange(S, 2 * S)
    cases = [
        (lambda: pool.move_kv_cache(loc, loc), "move_kv_cache"),
        (lambda: pool.get_contiguous_buf_infos(), "PD disaggregation"),
        (lambda: pool.get_cpu_copy(loc), "get_cpu_copy"),
        (lambda: pool.load_cpu_copy([], loc), "load_cpu_copy"),
        (lambda: pool.set_kv_buffer_prefix_valid(None, loc[None], torch.ones(1), None, None), "prefix-valid"),
        (lambda: pool.finalize_backing(None), "post-capture"),
        (lambda: pool.set_kv_buffer(_layer(0), KVWriteLoc(loc, swa_loc=loc), torch.zeros(S, H_KV, D, dtype=DT),
                                    torch.zeros(S, H_KV, D, dtype=DT)), "SWA"),  # fmt: skip
    ]
    for fn, match in cases:
        with pytest.raises(NotImplementedError, match=match):
            fn()


# --- random sequences ----------------------------------------------------------------------------------------------
_SEAL = st.tuples(st.just("seal"), st.integers(0, 7), st.sampled_from(["dense", "chan"]))
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.lists(st.integers(1, 50), min_size=1, max_size=3)),
        st.tuples(st.just("decode"), st.integers(0, 7)),
        _SEAL,
        _SEAL,  # twice: seals are the interesting transitions
        st.tuples(st.just("free"), st.integers(0, 7)),
    ),
    min_size=1,
    max_size=12,
)


def _uniform_plans(n_seg: int, kind: str) -> List[SegmentPlan]:
    if kind == "dense":
        return [SegmentPlan.uniform(n_seg, S, D) for _ in range(LAYERS)]
    return [SegmentPlan.uniform(n_seg, S, D, k_form=1, k_param=16, v_form=1, v_param=16) for _ in range(LAYERS)]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS, seed=st.integers(0, 2**16))
def test_random_alloc_write_seal_free_keep_invariants(ops, seed):
    """Random alloc/write/decode/seal/free sequences through SGLang's allocator keep the invariants: no physical page
    owned twice, logical <-> physical consistent (host, device), arena accounting exact (used granules == the sealed
    plans' granules), unsealed tokens read back what was written; freeing everything returns everything."""
    pool = build_pool(320, 96, _config())
    h = Harness(pool, seed=seed)
    rng = np.random.default_rng(seed)
    granules: Dict[int, int] = {}  # logical page -> granules it holds in all layers
    for op in [("add", [40, 17])] + ops:  # start from requests with complete pages
        live = [i for i, r in enumerate(h.reqs) if r.numel()]
        if op[0] == "add":
            need = sum(-(-n // S) for n in op[1])
            if need > min(pool.num_free_physical_pages, len(h.alloc.free_pages)):  # the kernel reads free_pages
                continue
            h.add_requests(list(op[1]))
            event("add")
        elif op[0] == "decode" and live:
            ids = [live[op[1] % len(live)]]
            grows = h.reqs[ids[0]].numel() % S == 0
            if grows and (pool.num_free_physical_pages == 0 or h.alloc.available_size() == 0):
                continue
            h.write(h.decode_step(ids))
            event("decode")
        elif op[0] == "seal" and live:
            slots = h.reqs[live[op[1] % len(live)]]
            pages = slots[: slots.numel() // S * S : S] // S  # complete pages
            pages = pages[pool.physical_pages(pages) >= 0]
            pages = pages[torch.from_numpy(rng.random(pages.numel()) < 0.7)]
            if pages.numel() == 0:
                continue
            plans = _uniform_plans(pages.numel() * H_KV, op[2])
            pool.seal_pages(pages, plans)
            event("seal")
            for j, p in enumerate(pages.tolist()):
                granules[p] = sum(int(sum(t[j * H_KV : (j + 1) * H_KV].sum() for t in pl.granules())) for pl in plans)
        elif op[0] == "free" and live:
            i = live[op[1] % len(live)]
            for p in torch.unique(h.reqs[i] // S).tolist():
                granules.pop(p, None)
            h.free_request(i)
            event("free")
        pool.check_invariants()
        assert sum(a.used_granules for a in pool.store.allocators) == sum(granules.values())
        owned = pool.page_table[1:][pool.page_table[1:] >= 0]
        assert torch.unique(owned).numel() == owned.numel()
        assert owned.numel() + pool.num_free_physical_pages == 96 // S
        h.check_unsealed_readback()
    for i, r in enumerate(h.reqs):
        if r.numel():
            h.free_request(i)
    assert pool.num_free_physical_pages == 96 // S and sum(a.used_granules for a in pool.store.allocators) == 0
    pool.check_invariants()
