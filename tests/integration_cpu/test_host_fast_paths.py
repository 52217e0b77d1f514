# SPDX-License-Identifier: Apache-2.0
"""The batched host paths of a decode step against the per-request paths they replace, on random pool states.

``decode_metadata_rows`` / ``pages_to_seal_rows`` / ``Sealer.before_forward_rows`` read a batch as one
``req_to_token`` matrix; ``decode_metadata`` / ``pages_to_seal`` / ``before_forward`` (kept) read one tensor per
request. States mix free, dense, sealed, partly sealed (some layers) and inconsistent pages (live without a physical
page but not sealed in the store); batches are ragged, share pages, and are sometimes corrupted (misaligned, out of
range, unwritten pages) so that both sides must raise the same error.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import List, Optional, Tuple

import numpy as np
import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

from mosaickv_sglang.attention_backend import MosaicAttnBackend, _slice_lens  # noqa: E402
from mosaickv_sglang.config import MosaicKVConfig  # noqa: E402
from mosaickv_sglang.kv_pool import MosaicMHATokenToKVPool  # noqa: E402
from mosaickv_sglang.pool import PAGE_DENSE, PAGE_SEALED  # noqa: E402
from mosaickv_sglang.sealer import QueryWindow, Sealer  # noqa: E402

S, H_KV, D, LAYERS = 16, 2, 64, 3
NUM_PAGES = 48  # logical pages, padding page included


def _pool(hot_window: int, sink_tokens: int) -> MosaicMHATokenToKVPool:
    cfg = MosaicKVConfig("mosaic", segment_size=S, hot_window=hot_window, sink_tokens=sink_tokens, sidecar=False,
                         decode_read_budget=0)  # fmt: skip
    return MosaicMHATokenToKVPool((NUM_PAGES - 1) * S, S, torch.float16, H_KV, D, LAYERS, "cpu", False,
                                  mosaic_config=cfg, hot_tokens=(NUM_PAGES - 1) * S)  # fmt: skip


def _random_state(pool: MosaicMHATokenToKVPool, rng: np.random.Generator) -> np.ndarray:
    """Every page free, dense (partly filled), sealed, sealed in some layers, or live without a physical page;
    returns the pages a request may hold (all but the free ones)."""
    kinds = rng.choice(5, size=NUM_PAGES, p=[0.2, 0.3, 0.3, 0.12, 0.08])
    st = pool.store
    for p in range(1, NUM_PAGES):
        k = kinds[p]
        if k in (1, 3):
            pool.ensure_physical(torch.tensor([p]))
            pool.note_writes(torch.arange(p * S, p * S + int(rng.integers(1, S + 1))))
            if k == 3:
                st._force_state(rng.choice(LAYERS, size=int(rng.integers(1, LAYERS)), replace=False), p, PAGE_SEALED)
        elif k == 2:
            st._force_state(slice(None), p, PAGE_SEALED)
            pool._live[p] = True
        elif k == 4:
            st._force_state(slice(None), p, PAGE_DENSE)
            pool._live[p] = True
    return np.flatnonzero(kinds[1:]) + 1


def _random_batch(rng: np.random.Generator, corrupt: bool, held: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Rows of ``B`` requests over random pages (of ``held`` mostly; shared between requests at times), ragged
    lengths, padded with garbage; ``corrupt`` breaks one request's slots (misaligned, out of range)."""
    b = int(rng.integers(0, 10))
    lens = rng.integers(0, 9 * S, size=b)
    aligned = rng.random(b) < 0.2
    lens[aligned] = rng.integers(0, 9, size=b)[aligned] * S
    width = int(lens.max()) if b else 0
    width += int(rng.choice([0, 1, S - 1, S, 3 * S]))
    rows = rng.integers(-5, NUM_PAGES * S + 5, size=(b, width)).astype(np.int32)
    for i, n in enumerate(lens):
        pages = rng.choice(held, size=-(-int(n) // S))
        if pages.size and rng.random() < 0.05:
            pages[rng.integers(0, pages.size)] = rng.integers(0, NUM_PAGES)  # perhaps free or padding
        rows[i, :n] = (np.repeat(pages, S) * S + np.tile(np.arange(S), pages.size))[:n]
    if corrupt and b and lens.max() > 1:
        i = int(np.argmax(lens))
        j = int(rng.integers(0, lens[i]))
        what = rng.integers(0, 3)
        if what == 0:
            rows[i, j] += 1  # misaligned
        elif what == 1:
            rows[i, j] = -1
        else:
            rows[i, j] = NUM_PAGES * S
    return rows, lens


def _reference_or_error(fn, *args) -> Tuple[Optional[object], Optional[str]]:
    try:
        return fn(*args), None
    except ValueError as err:
        return None, str(err)


def _assert_same_meta(a, b) -> None:
    for name in ("seg_ids_padded", "seg_counts", "tail_indptr", "tail_indices"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and x.device == y.device, name
        assert torch.equal(x, y), name
    assert a.max_segs == b.max_segs


@pytest.mark.parametrize("seed", range(40))
def test_decode_metadata_rows_equals_per_request_reference(seed):
    rng = np.random.default_rng(seed)
    pool = _pool(hot_window=int(rng.choice([0, S, 3 * S])), sink_tokens=int(rng.choice([0, S, 2 * S])))
    held = _random_state(pool, rng)
    for trial in range(12):
        rows, lens = _random_batch(rng, corrupt=trial % 3 == 2, held=held)
        slots = [torch.from_numpy(rows[i, :n]) for i, n in enumerate(lens)]
        ref, err = _reference_or_error(pool.decode_metadata, slots)
        if err is not None:
            with pytest.raises(ValueError) as got:
                pool.decode_metadata_rows(rows, lens)
            assert str(got.value) == err
            continue
        meta, tail_lens = pool.decode_metadata_rows(rows, lens)
        _assert_same_meta(meta, ref)
        assert tail_lens.dtype == np.int64 and tail_lens.tolist() == torch.diff(ref.tail_indptr).tolist()


@pytest.mark.parametrize("seed", range(40))
def test_pages_to_seal_rows_equals_per_request_reference(seed):
    rng = np.random.default_rng(1000 + seed)
    pool = _pool(hot_window=int(rng.choice([0, S, 2 * S, 5 * S])), sink_tokens=int(rng.choice([0, 1, S, 3 * S])))
    held = _random_state(pool, rng)
    for trial in range(12):
        rows, lens = _random_batch(rng, corrupt=trial % 3 == 2, held=held)
        ref, err = _reference_or_error(pool.pages_to_seal_per_request, rows, lens)
        if err is not None:
            with pytest.raises(ValueError) as got:
                pool.pages_to_seal_rows(rows, lens)
            assert str(got.value) == err
            continue
        pages, dense = pool.pages_to_seal_rows(rows, lens)
        assert pages.dtype == ref[0].dtype and dense.dtype == ref[1].dtype
        assert pages.tolist() == ref[0].tolist() and dense.tolist() == ref[1].tolist()


@pytest.mark.parametrize("seed", range(20))
def test_before_forward_rows_takes_the_same_decisions(seed):
    """The pages handed to the seal step (and so the seals) of both entry points are identical."""
    rng = np.random.default_rng(2000 + seed)
    pool = _pool(hot_window=int(rng.choice([0, S, 3 * S])), sink_tokens=int(rng.choice([0, S])))
    held = _random_state(pool, rng)
    sealer = Sealer(pool, H_KV * 2)
    seen: List[Tuple[List[int], List[bool], List[int]]] = []
    sealer._seal_due = lambda c, m, n: seen.append((c.tolist(), m.tolist(), n.tolist()))
    for _ in range(10):
        rows, lens = _random_batch(rng, corrupt=False, held=held)
        new_pages = np.unique(rng.integers(0, NUM_PAGES, size=int(rng.integers(0, 6)))).astype(np.int64)
        slots = [torch.from_numpy(rows[i, :n]) for i, n in enumerate(lens)]
        r1, e1 = _reference_or_error(sealer.before_forward, slots, new_pages)
        r2, e2 = _reference_or_error(sealer.before_forward_rows, rows, lens, new_pages)
        assert e1 == e2
        if e1 is None:
            assert seen[-1] == seen[-2]


def _corrupt_a_page_start(rng: np.random.Generator, rows: np.ndarray, lens: np.ndarray) -> bool:
    """Break the first slot of one page of a request (misaligned, -1 or out of range); False when no request has a
    token."""
    have = np.flatnonzero(lens > 0)
    if have.size == 0:
        return False
    i = int(rng.choice(have))
    j = int(rng.integers(0, -(-int(lens[i]) // S))) * S
    rows[i, j] = (rows[i, j] + 1, -1, NUM_PAGES * S)[int(rng.integers(0, 3))]
    return True


@pytest.mark.parametrize("seed", range(30))
def test_page_start_rows_give_what_whole_rows_give(seed):
    """``step = S`` (each page's first slot only, what a decode step copies from ``req_to_token``) gives the same
    metadata, pages to seal and seal decisions as whole rows on batches laid out as the paged allocator lays them;
    a bad page start is refused as whole rows refuse it."""
    rng = np.random.default_rng(3000 + seed)
    pool = _pool(hot_window=int(rng.choice([0, S, 3 * S])), sink_tokens=int(rng.choice([0, S, 2 * S])))
    held = _random_state(pool, rng)
    sealer = Sealer(pool, H_KV * 2)
    seen: List[Tuple[List[int], List[bool], List[int]]] = []
    sealer._seal_due = lambda c, m, n: seen.append((c.tolist(), m.tolist(), n.tolist()))
    checked = 0
    for trial in range(12):
        rows, lens = _random_batch(rng, corrupt=False, held=held)
        if trial % 3 == 2 and _corrupt_a_page_start(rng, rows, lens):
            for step in (1, S):
                with pytest.raises(ValueError):
                    pool.decode_metadata_rows(rows[:, ::step], lens, step)
            continue
        whole, err = _reference_or_error(pool.decode_metadata_rows, rows, lens)
        starts = rows[:, ::S]
        if err is not None:  # unwritten pages: the same error from page starts
            with pytest.raises(ValueError) as got:
                pool.decode_metadata_rows(starts, lens, S)
            assert str(got.value) == err
            continue
        meta, tail_lens = pool.decode_metadata_rows(starts, lens, S)
        _assert_same_meta(meta, whole[0])
        assert tail_lens.tolist() == whole[1].tolist()
        assert [x.tolist() for x in pool.pages_to_seal_rows(starts, lens, S)] == [
            x.tolist() for x in pool.pages_to_seal_rows(rows, lens)]
        new_pages = np.unique(rng.integers(0, NUM_PAGES, size=int(rng.integers(0, 6)))).astype(np.int64)
        sealer.before_forward_rows(rows, lens, new_pages)
        sealer.before_forward_rows(starts, lens, new_pages, step=S)
        assert seen[-1] == seen[-2]
        checked += 1
    assert checked >= 4
    with pytest.raises(ValueError, match=f"step: expected 1 or page_size {S}, got 4"):
        pool.decode_metadata_rows(rows[:, ::4], lens, 4)
    with pytest.raises(ValueError, match=r"lens: expected lengths in \[0, 32\], got \[33, 33\]"):
        pool.pages_to_seal_rows(np.zeros((1, 2), dtype=np.int32), np.array([33]), S)


def test_decode_step_copies_page_starts_unless_debug_checks(monkeypatch):
    """A decode plan reads ``req_to_token`` every ``S``-th column (every column under ``MOSAICKV_DEBUG_CHECKS``), and
    both plans are the same."""
    pool = _pool(hot_window=S, sink_tokens=0)
    r2t = torch.zeros(2, 4 * S, dtype=torch.int32)
    r2t[0, : 2 * S + 1] = torch.cat([torch.arange(5 * S, 6 * S), torch.arange(S, 2 * S), torch.tensor([7 * S])])
    r2t[1, :1] = 3 * S
    pool.ensure_physical(torch.tensor([5, 1, 7, 3]))
    pool.note_writes(torch.cat([torch.arange(5 * S, 6 * S), torch.arange(S, 2 * S)]))
    be = _backend(pool, r2t)
    widths: List[int] = []
    real = be._req_rows
    be._req_rows = lambda idx, seq, step=1: widths.append(step) or real(idx, seq, step)
    loc = torch.tensor([7 * S, 3 * S], dtype=torch.int64)
    seq = torch.tensor([2 * S + 1, 1])
    batch = SimpleNamespace(forward_mode=ForwardMode.DECODE, out_cache_loc=loc, req_pool_indices=torch.arange(2),
                            seq_lens=seq, seq_lens_cpu=seq)  # fmt: skip
    be.init_forward_metadata(batch)
    fast = be.forward_metadata
    monkeypatch.setenv("MOSAICKV_DEBUG_CHECKS", "1")
    be.init_forward_metadata(batch)
    checked = be.forward_metadata
    assert widths == [S, 1]
    for name in ("seg_ids_padded", "seg_counts", "tail_indptr", "tail_indices"):
        assert torch.equal(getattr(fast, name), getattr(checked, name)), name
    assert fast.tail_indices.numel() == 2 * S + 2  # nothing sealed: every written slot is in the dense tail


def test_slice_lens_follows_python_slices():
    rng = np.random.default_rng(0)
    for width in (0, 1, 5, 64):
        lens = rng.integers(-2 * width - 2, 2 * width + 3, size=50).tolist()
        assert _slice_lens(lens, width).tolist() == [len(range(width)[:n]) for n in lens]


def test_query_window_index_cache_keeps_the_ring():
    """Observations through the cached ring indices fill the ring as freshly computed ones do."""
    gen = torch.Generator().manual_seed(0)
    a, b = (QueryWindow(2, H_KV, 2, D, 7, torch.device("cpu")) for _ in range(2))
    for _ in range(40):
        layer, t = int(torch.randint(0, 2, (1,), generator=gen)), int(torch.randint(0, 12, (1,), generator=gen))
        q = torch.randn(t, H_KV * 2 * D, generator=gen)
        a.observe(layer, q)
        b._idx.clear()
        b.observe(layer, q)
        assert torch.equal(a.ring, b.ring) and a._next == b._next and a._count == b._count


def _backend(pool: MosaicMHATokenToKVPool, req_to_token: torch.Tensor) -> MosaicAttnBackend:
    runner = SimpleNamespace(device="cpu", req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
                             token_to_kv_pool=pool)  # fmt: skip
    return MosaicAttnBackend(runner, num_q_heads=H_KV * 2, auto_seal=False)


def test_write_kv_uses_plan_slots_only_while_the_page_table_is_unchanged():
    pool = _pool(hot_window=S, sink_tokens=0)
    r2t = torch.zeros(2, 4 * S, dtype=torch.int32)
    r2t[0, : S + 1] = torch.arange(S, 2 * S + 1)  # pages 1 and 2
    r2t[1, :1] = 3 * S  # page 3
    pool.ensure_physical(torch.tensor([1, 2]))
    pool.note_writes(torch.arange(S, 2 * S))
    be = _backend(pool, r2t)
    loc = torch.tensor([2 * S, 3 * S], dtype=torch.int64)
    seq = torch.tensor([S + 1, 1])
    be.init_forward_metadata(SimpleNamespace(forward_mode=ForwardMode.DECODE, out_cache_loc=loc,
                                             req_pool_indices=torch.arange(2), seq_lens=seq, seq_lens_cpu=seq))
    md = be.forward_metadata
    assert md.write_loc is loc and torch.equal(md.write_slots, pool.physical_slots(loc))
    layer = SimpleNamespace(layer_id=1)
    calls = []
    pool.set_kv_buffer_physical = lambda *a: calls.append("physical")
    pool.set_kv_buffer = lambda *a: calls.append("logical")
    k = torch.randn(2, H_KV, D).half()
    be._write_kv(md, layer, loc, k, k)
    be._write_kv(md, layer, loc.clone(), k, k)  # another tensor: translated again
    del pool.set_kv_buffer
    pool.ensure_physical(torch.tensor([4]))  # the page table changed
    pool.set_kv_buffer = lambda *a: calls.append("logical")
    be._write_kv(md, layer, loc, k, k)
    assert calls == ["physical", "logical", "logical"]
