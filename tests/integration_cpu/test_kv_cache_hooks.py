# SPDX-License-Identifier: Apache-2.0
"""The KV-cache hooks (``patches/kv_cache.py``) applied to SGLang 0.5.17's real classes by its plugin loader.

Sizing through ``DefaultPoolConfigurator.calculate_pool_sizes``, construction through
``KVCacheConfigurator._build_mha_kv_pool``, frees and ``clear()`` through ``PagedTokenToKVPoolAllocator``, the
fused-KV-write gate, and random alloc/free/seal sequences keeping SGLang's allocator and the pool in agreement.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("sglang")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helper modules (importlib import mode)

import sglang.srt.mem_cache.kv_cache_configurator as kcc  # noqa: E402
import sglang.srt.runtime_context as runtime_context  # noqa: E402
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402
from sglang.srt.model_executor.pool_configurator import DefaultPoolConfigurator  # noqa: E402
from test_kv_pool import D, DT, H_KV, LAYERS, S, build_mha_kv_pool, build_pool  # noqa: E402

from mosaickv_sglang.config import MosaicKVConfig  # noqa: E402
from mosaickv_sglang.kernels.format import SegmentPlan  # noqa: E402
from mosaickv_sglang.kv_pool import MosaicMHATokenToKVPool  # noqa: E402
from mosaickv_sglang.patches import seam  # noqa: E402
from mosaickv_sglang.pool import PoolLayout, arena_granules_for, dense_bytes_per_token  # noqa: E402
from mosaickv_sglang.kernels.format import GRANULE_BYTES  # noqa: E402
from mosaickv_sglang.pool.sizing import ARENA_SLACK, metadata_bytes_per_token  # noqa: E402

CFG = MosaicKVConfig("mosaic", compression_ratio=3.0, segment_size=S, hot_window=32, sink_tokens=16, sidecar=False)


@pytest.fixture(autouse=True)
def hooks_applied(sglang_with_plugin):
    """Every test here runs with the plugin's hooks applied (as in a scheduler process)."""


def _kvc(config: MosaicKVConfig, max_running_requests=None, chunked_prefill_size=256) -> SimpleNamespace:
    """The KVCacheConfigurator attributes the hooks read."""
    server_args = SimpleNamespace(max_running_requests=max_running_requests, chunked_prefill_size=chunked_prefill_size)
    seam.attach_config(server_args, config)
    return SimpleNamespace(
        server_args=server_args, kv_cache_dtype=DT, kv_cache_dtype_str="auto", pool_page_size=S, device="cpu",
        post_capture_kv_active=False, layer_info=SimpleNamespace(num_effective_layers=LAYERS, start_layer=0,
                                                                 end_layer=LAYERS),
        model_config=SimpleNamespace(get_num_kv_heads=lambda tp: H_KV, head_dim=D, v_head_dim=D, context_len=4096),
    )  # fmt: skip


def _sizes(kvc: SimpleNamespace, budget: int, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(runtime_context, "get_parallel", lambda: SimpleNamespace(attn_tp_size=1))
    configurator = object.__new__(DefaultPoolConfigurator)
    configurator._cell_size = dense_bytes_per_token(LAYERS, H_KV, D, DT)
    object.__setattr__(configurator, seam.KVC_ATTR, kvc)
    return DefaultPoolConfigurator.calculate_pool_sizes(configurator, budget, S)


def test_pool_sizes_grow_with_the_ratio_and_leave_stock_sizing_alone(monkeypatch):
    """With mosaic at ratio 3 the logical tokens are close to 3x the dense ones minus the hot pool; without it the
    stock formula (budget // cell size) is untouched."""
    cell = dense_bytes_per_token(LAYERS, H_KV, D, DT)
    budget = 40_000 * cell
    dense = _sizes(_kvc(MosaicKVConfig()), budget, monkeypatch).max_total_num_tokens
    assert dense == 40_000 // S * S
    kvc = _kvc(CFG)
    mosaic = _sizes(kvc, budget, monkeypatch).max_total_num_tokens
    layout = getattr(kvc.server_args, seam.LAYOUT_ATTR)
    assert isinstance(layout, PoolLayout) and layout.logical_tokens == mosaic
    assert mosaic % S == 0 and layout.hot_tokens % S == 0
    # hot pool: 64 default requests x (32 + 2 pages) + one 256-token chunk, capped at a quarter of the budget
    assert layout.hot_tokens == min(64 * (32 + 2 * S) + 256, 10_000 // S * S)
    sealed = mosaic - layout.hot_tokens  # the arenas' tokens; the hot pool's slots come on top
    assert 2.2 * (40_000 - layout.hot_tokens) < sealed < 3.0 * (40_000 - layout.hot_tokens)
    per_token = arena_granules_for(1_000_000, 3.0 / ARENA_SLACK, num_kv_heads=H_KV, head_dim=D, dtype=DT) / 1e6
    assert abs(layout.arena_granules_per_layer - sealed * per_token) <= 1 + 1e-6 * sealed * per_token
    # everything the pool allocates fits the budget: the hot pool and its padding page dense, the arenas, and a
    # descriptor and bounds row for every logical page
    used = ((layout.hot_tokens + S) * cell + LAYERS * layout.arena_granules_per_layer * GRANULE_BYTES
            + mosaic * metadata_bytes_per_token(LAYERS, H_KV, D, S, DT))  # fmt: skip
    assert budget - S * cell < used <= budget  # up to a page of tokens lost to rounding
    assert layout.max_running_requests == (layout.hot_tokens - 256) // (2 * S)


def test_a_token_cap_shrinks_the_arenas_with_the_logical_tokens(monkeypatch):
    """SGLang applies --max-total-tokens by calling calculate_pool_sizes_from_max_tokens after calculate_pool_sizes:
    the logical tokens and the arenas shrink together, the arenas to the tokens beyond the hot pool (so a full hot
    pool and full arenas are the cap, and the cap bounds memory), the hot pool stays; a cap above the budget's count
    changes nothing; a cap below the hot pool leaves the arenas one page; without mosaic the stock path runs."""
    cell = dense_bytes_per_token(LAYERS, H_KV, D, DT)
    budget = 40_000 * cell
    kvc = _kvc(CFG)
    full = _sizes(kvc, budget, monkeypatch).max_total_num_tokens
    before = getattr(kvc.server_args, seam.LAYOUT_ATTR)
    configurator = object.__new__(DefaultPoolConfigurator)
    object.__setattr__(configurator, seam.KVC_ATTR, kvc)
    capped = DefaultPoolConfigurator.calculate_pool_sizes_from_max_tokens(configurator, 20_000 + 5, S)
    after = getattr(kvc.server_args, seam.LAYOUT_ATTR)
    assert capped.max_total_num_tokens == after.logical_tokens == 20_000 // S * S
    assert after.hot_tokens == before.hot_tokens and after.max_running_requests == before.max_running_requests
    ratio = after.arena_granules_per_layer / before.arena_granules_per_layer
    hot = before.hot_tokens
    assert abs(ratio - (after.logical_tokens - hot) / (before.logical_tokens - hot)) < 1e-3
    tiny = DefaultPoolConfigurator.calculate_pool_sizes_from_max_tokens(configurator, hot // 2, S)
    assert tiny.max_total_num_tokens == hot // 2 // S * S
    one_page = arena_granules_for(S, 3.0 / ARENA_SLACK, num_kv_heads=H_KV, head_dim=D, dtype=DT)
    assert getattr(kvc.server_args, seam.LAYOUT_ATTR).arena_granules_per_layer == one_page
    object.__setattr__(kvc.server_args, seam.LAYOUT_ATTR, after)
    same = DefaultPoolConfigurator.calculate_pool_sizes_from_max_tokens(configurator, 10 * full, S)
    assert same.max_total_num_tokens == after.logical_tokens and getattr(kvc.server_args, seam.LAYOUT_ATTR) == after
    stock = _kvc(MosaicKVConfig())
    object.__setattr__(configurator, seam.KVC_ATTR, stock)
    assert DefaultPoolConfigurator.calculate_pool_sizes_from_max_tokens(configurator, 1000, S).max_total_num_tokens \
        == 1000 // S * S
    assert getattr(stock.server_args, seam.LAYOUT_ATTR, None) is None


def test_running_requests_are_capped_by_the_hot_pool():
    """resolve_max_num_reqs keeps SGLang's value unless the hot pool cannot serve that many requests."""
    layout = PoolLayout(logical_tokens=100_000, hot_tokens=4096, arena_granules_per_layer=10,
                        chunk_tokens=1024, max_running_requests=96)  # fmt: skip
    kvc = SimpleNamespace(server_args=SimpleNamespace())
    object.__setattr__(kvc.server_args, seam.LAYOUT_ATTR, layout)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kcc, "get_schedule", lambda: SimpleNamespace(max_running_requests=None))
        kvc.model_config = SimpleNamespace(context_len=4096)
        kvc.ps = SimpleNamespace(attn_dp_size=1)
        kvc.mambaish_config = None
        assert kcc.KVCacheConfigurator.resolve_max_num_reqs(kvc, 100_000) == 96
        mp.setattr(kcc, "get_schedule", lambda: SimpleNamespace(max_running_requests=8))
        assert kcc.KVCacheConfigurator.resolve_max_num_reqs(kvc, 100_000) == 8


def _build(kvc: SimpleNamespace, size: int):
    return build_mha_kv_pool(kvc, size, MHATokenToKVPool)


def test_build_substitutes_the_compressed_pool_only_with_mosaic():
    """The MHA pool class SGLang passes is replaced by the compressed pool, sized by the layout; without mosaic
    SGLang builds its own pool."""
    kvc = _kvc(CFG)
    layout = PoolLayout(logical_tokens=1024, hot_tokens=256, arena_granules_per_layer=77, chunk_tokens=128,
                        max_running_requests=4)  # fmt: skip
    object.__setattr__(kvc.server_args, seam.LAYOUT_ATTR, layout)
    pool = _build(kvc, 1024)
    assert isinstance(pool, MosaicMHATokenToKVPool)
    assert pool.hot_tokens == 256 and pool.size == 1024 and pool.mosaic_config == CFG
    assert all(a.capacity == 77 for a in pool.store.allocators)
    stock = _build(_kvc(MosaicKVConfig()), 1024)
    assert type(stock) is MHATokenToKVPool
    with pytest.raises(RuntimeError, match="sized without MosaicKV's layout"):
        _build(_kvc(CFG), 1024)


def test_fused_kv_write_is_off_with_the_compressed_pool():
    from sglang.srt.models import utils as model_utils

    pool = build_pool(512, 256, CFG)
    assert model_utils.enable_fused_set_kv_buffer(SimpleNamespace(token_to_kv_pool=pool)) is False


def _write(pool: MosaicMHATokenToKVPool, loc: torch.Tensor) -> None:
    pages = torch.unique(loc // S)
    pool.ensure_physical(pages)
    pool.note_writes(loc)


def _seal_dense(pool: MosaicMHATokenToKVPool, pages: np.ndarray) -> None:
    n = pages.size * H_KV
    pool.seal_pages(torch.from_numpy(pages), [SegmentPlan.uniform(n, S, D) for _ in range(LAYERS)])


def _token_info(alloc: PagedTokenToKVPoolAllocator, total: int, evictable: int = 0):
    """SGLang's pool statistics for a scheduler with ``alloc`` (what its leak checks compare with the total)."""
    from sglang.srt.managers.scheduler_components.pool_stats_observer import SchedulerPoolStatsObserver

    observer = SimpleNamespace(token_to_kv_pool_allocator=alloc, max_total_num_tokens=total,
                               tree_cache=SimpleNamespace(evictable_size=lambda: evictable))  # fmt: skip
    return SchedulerPoolStatsObserver._get_token_info(observer)


def test_available_size_is_capped_by_what_the_arenas_can_still_take():
    """With a small arena, SGLang's allocator reports the pool's admissible tokens once they are fewer than the free
    logical slots, so its scheduler evicts or retracts; its pool statistics (and leak checks) keep the logical
    count; freeing pages raises the report again."""
    from mosaickv_sglang.sealer import Sealer

    pool = build_pool(1024, 256, CFG, arena_granules_per_layer=300)
    alloc = PagedTokenToKVPoolAllocator(1024, page_size=S, dtype=DT, device="cpu", kvcache=pool, need_sort=False)
    sealer = Sealer(pool, num_q_heads=2 * H_KV)
    assert 256 < alloc.available_size() == pool.admissible_tokens() < 1024  # hot pool + what the arenas can take
    held = []
    while alloc.available_size() >= 4 * S and len(held) < 16:  # admit as SGLang does
        loc = alloc.alloc(4 * S)
        _write(pool, loc)
        held.append(loc)
        pages = pool.complete_dense_pages()
        sealer.seal(pages, np.zeros(pages.size, dtype=bool))
    logical = _token_info(alloc, 1024).full_available_size
    assert logical == 1024 - len(held) * 4 * S >= 512
    assert alloc.available_size() == min(logical, pool.admissible_tokens()) < 4 * S
    assert sealer.pages_sealed > 0 and pool.arena_ledger.room < pool.arena_ledger.capacity // 4
    before = alloc.available_size()
    for loc in held[:3]:
        alloc.free(loc)
    assert alloc.available_size() > before
    pool.check_invariants()


@pytest.mark.parametrize("seed", [0, 1])
def test_admitting_by_available_size_never_fails_a_forward(seed):
    """SGLang admits new tokens only up to ``available_size()`` and evicts cached requests (oldest first) for the rest.
    With a hot pool of 16 pages and arenas far smaller than the logical slots, random requests (sinks included) then
    always find a physical page for every page they write: the plan step's sealing (policy, pressure, and the last
    resort of compressing sinks too) never has to fail."""
    from mosaickv_sglang.sealer import Sealer

    pool = build_pool(2048, 256, CFG, arena_granules_per_layer=400)
    alloc = PagedTokenToKVPoolAllocator(2048, page_size=S, dtype=DT, device="cpu", kvcache=pool, need_sort=False)
    sealer = Sealer(pool, num_q_heads=2 * H_KV)
    rng = np.random.default_rng(seed)
    reqs: list = []
    evicted = 0
    for _ in range(24):
        n = int(rng.integers(1, 7)) * S
        while alloc.available_size() < n and reqs:
            alloc.free(reqs.pop(0))
            evicted += 1
        if alloc.available_size() < n:
            continue
        loc = alloc.alloc(n)
        new_pages = torch.unique(loc // S).numpy()
        sealer.before_forward([r for r in reqs if rng.random() < 0.7], new_pages)  # the running ones
        pool.ensure_physical(torch.from_numpy(new_pages))  # raises HotPoolFullError on failure
        pool.note_writes(loc)
        reqs.append(loc)
        pool.check_invariants()
        logical = _token_info(alloc, 2048).full_available_size
        assert logical + sum(r.numel() for r in reqs) == 2048
    assert evicted > 0 and sealer.pages_sealed > 0
    assert sum(r.numel() for r in reqs) < 2048 // 2  # the arenas, not the logical slots, were the limit


def test_allocator_free_and_clear_reach_the_pool():
    """Pages freed by SGLang's allocator (dense or sealed) leave the pool; clear() empties it."""
    pool = build_pool(512, 256, CFG)
    alloc = PagedTokenToKVPoolAllocator(512, page_size=S, dtype=DT, device="cpu", kvcache=pool, need_sort=False)
    loc = alloc.alloc(4 * S)
    _write(pool, loc)
    pages = torch.unique(loc // S).numpy()
    _seal_dense(pool, pages[:2])
    pool.check_invariants()
    alloc.free(loc[: 2 * S])  # the sealed pages
    assert not pool._live[pages[:2]].any() and pool._live[pages[2:]].all()
    pool.check_invariants()
    alloc.free(loc[2 * S :])
    assert not pool._live.any() and pool.num_free_physical_pages == pool.num_physical_pages - 1
    loc = alloc.alloc(3 * S)
    _write(pool, loc)
    alloc.clear()
    assert not pool._live.any() and pool.num_free_physical_pages == pool.num_physical_pages - 1
    pool.check_invariants()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "seal", "clear"]), st.integers(1, 4)), max_size=30))
def test_random_alloc_free_seal_keeps_allocator_and_pool_in_agreement(ops):
    """Random allocations, writes, dense seals, frees (with free groups) and clears: SGLang's free-page count plus
    the pages held always equal the pool's size, and the pool's own invariants hold after every step."""
    pool = build_pool(512, 256, CFG)
    alloc = PagedTokenToKVPoolAllocator(512, page_size=S, dtype=DT, device="cpu", kvcache=pool, need_sort=False)
    held: list = []
    for op, n in ops:
        if op == "alloc":
            loc = alloc.alloc(n * S)
            if loc is None or pool.num_free_physical_pages < n:
                if loc is not None:
                    alloc.free(loc)
                continue
            _write(pool, loc)
            held.append(loc)
        elif op == "free" and held:
            alloc.free_group_begin()
            for loc in held[:n]:
                alloc.free(loc)
            alloc.free_group_end()
            held = held[n:]
        elif op == "seal" and held:
            pages = pool.complete_dense_pages()[:n]
            if pages.size:
                _seal_dense(pool, pages)
        elif op == "clear":
            alloc.clear()
            held = []
        live_pages = sum(loc.numel() for loc in held) // S
        logical = _token_info(alloc, 512).full_available_size
        assert logical // S + live_pages == 512 // S
        assert alloc.available_size() == min(logical, pool.admissible_tokens())
        assert int(pool._live.sum()) == live_pages
        pool.check_invariants()


def _radix(pool: MosaicMHATokenToKVPool):
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.radix_cache import RadixCache

    alloc = PagedTokenToKVPoolAllocator(1024, page_size=S, dtype=DT, device="cpu", kvcache=pool, need_sort=False)
    params = CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=alloc, page_size=S)
    return RadixCache(params), alloc


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 5 * S), st.booleans(), st.integers(0, 4 * S)),
                min_size=1, max_size=12))  # fmt: skip
def test_radix_cache_reuse_seal_and_evict_keep_pool_exact(reqs):
    """Requests over three shared prefixes, served as SGLang's scheduler does with a radix cache: match the cached
    prefix, allocate and write the rest, seal some complete pages (dense plans), insert the page-aligned part, free
    duplicates and the partial last page, then evict. The pool holds exactly the pages the tree holds, a matched
    prefix is reused in whatever form it was sealed, and eviction and reset() free sealed storage too."""
    from array import array

    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    pool = build_pool(1024, 512, CFG)
    cache, alloc = _radix(pool)
    rng = np.random.default_rng(0)
    prefixes = [rng.integers(0, 1000, 3 * S).tolist() for _ in range(3)]
    for prefix_id, tail_len, seal, evict_tokens in reqs:
        tokens = prefixes[prefix_id] + rng.integers(0, 1000, tail_len).tolist()
        key = RadixKey(array("l", tokens))
        match = cache.match_prefix(MatchPrefixParams(key=key))
        cached = match.device_indices
        assert cached.numel() % S == 0
        reused = torch.unique(cached // S).numpy() if cached.numel() else np.zeros(0, dtype=np.int64)
        assert pool._live[reused].all()  # reused pages are still held (dense or sealed)
        new_len = len(tokens) - cached.numel()
        loc = alloc.alloc(-(-new_len // S) * S)
        if loc is None or pool.num_free_physical_pages < -(-new_len // S):
            if loc is not None:
                alloc.free(loc)
            continue
        loc = loc[:new_len]
        _write(pool, loc)
        if seal:
            full = pool.complete_dense_pages()
            if full.size:
                _seal_dense(pool, full[: max(1, full.size // 2)])
        kv = torch.cat([cached.long(), loc.long()])
        aligned = len(tokens) // S * S
        res = cache.insert(InsertParams(key=RadixKey(array("l", tokens[:aligned])), value=kv[:aligned]))
        # as cache_finished_req: duplicates of what the tree already had, and the partial last page, are freed
        alloc.free(kv[cached.numel() : res.prefix_len])
        alloc.free(kv[aligned:])
        if evict_tokens:
            cache.evict(EvictParams(num_tokens=evict_tokens))
        held = cache.total_size()
        assert held % S == 0
        assert int(pool._live.sum()) == held // S
        assert _token_info(alloc, 1024, evictable=cache.evictable_size()).full_available_size + held == 1024
        assert alloc.available_size() <= 1024 - held
        pool.check_invariants()
    cache.reset()
    alloc.clear()
    assert not pool._live.any()
    assert all(a.used_granules == 0 for a in pool.store.allocators)
