# SPDX-License-Identifier: Apache-2.0
"""PinnedStaging: one arena allocated at construction and never again, lent in aligned slices that never overlap and
keep what was written into them until given back; a take that no free run holds is refused (``None``), and succeeds
once enough is given back, in any order (the arena not page-locked here: the same code on the CPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaickv_sglang.sidecar import pinned_staging as staging_mod
from mosaickv_sglang.sidecar.bridge import HostCopy
from mosaickv_sglang.sidecar.pinned_staging import ALIGN_BYTES, PinnedStaging

DTYPES = [torch.float16, torch.float32, torch.int64, torch.uint8]


def _offset(staging: PinnedStaging, view: torch.Tensor) -> int:
    """Byte offset of ``view`` in ``staging``'s arena."""
    assert view.untyped_storage().data_ptr() == staging._arena.untyped_storage().data_ptr()
    return view.storage_offset() * view.element_size()


def _fill(view: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random contents written into ``view``; returns a copy to compare with later."""
    if view.dtype.is_floating_point:
        data = torch.randn(view.numel(), generator=gen).to(view.dtype)
    else:
        data = torch.randint(0, 100, (view.numel(),), generator=gen).to(view.dtype)
    view.copy_(data)
    return data


@pytest.fixture
def no_new_memory(monkeypatch):
    """Fails any ``torch.empty`` in the staging module after construction (the arena is allocated once)."""

    def refuse(*args, **kwargs):
        raise AssertionError("PinnedStaging allocated after construction")

    def arm():
        monkeypatch.setattr(staging_mod.torch, "empty", refuse)

    return arm


def test_takes_are_aligned_slices_of_the_one_arena_and_round_trip(no_new_memory):
    gen = torch.Generator().manual_seed(11)
    staging = PinnedStaging(pin=False, capacity_bytes=64 * ALIGN_BYTES)
    no_new_memory()
    assert staging.capacity_bytes == 64 * ALIGN_BYTES and staging.lent_bytes == 0 and staging.lent == 0
    for _ in range(20):
        dtype = DTYPES[int(torch.randint(len(DTYPES), (1,), generator=gen))]
        numel = int(torch.randint(0, 10 * ALIGN_BYTES // dtype.itemsize, (1,), generator=gen))
        view = staging.take(numel, dtype)
        assert view is not None and view.shape == (numel,) and view.dtype == dtype
        assert _offset(staging, view) % ALIGN_BYTES == 0
        want = _fill(view, gen)
        units = max(1, -(-numel * dtype.itemsize // ALIGN_BYTES))
        assert staging.lent == 1 and staging.lent_bytes == units * ALIGN_BYTES
        assert torch.equal(view, want)
        staging.give_back(view)
        assert staging.lent == 0 and staging.lent_bytes == 0 and staging.largest_free_bytes == staging.capacity_bytes
    assert staging.refusals == 0 and staging.peak_lent_bytes <= 10 * ALIGN_BYTES


def test_a_take_no_free_run_holds_is_refused_then_served_once_room_is_given_back(no_new_memory):
    staging = PinnedStaging(pin=False, capacity_bytes=8 * ALIGN_BYTES)
    no_new_memory()
    a = staging.take(3 * ALIGN_BYTES, torch.uint8)
    b = staging.take(ALIGN_BYTES // 4, torch.float32)
    c = staging.take(4 * ALIGN_BYTES // 8, torch.int64)
    assert [_offset(staging, v) for v in (a, b, c)] == [0, 3 * ALIGN_BYTES, 4 * ALIGN_BYTES]
    assert staging.lent_bytes == staging.capacity_bytes and staging.free_bytes == 0
    assert staging.take(1, torch.uint8) is None and staging.refusals == 1
    staging.give_back(b)  # one unit free: a 2-unit take still refused
    assert staging.take(ALIGN_BYTES + 1, torch.uint8) is None and staging.refusals == 2
    d = staging.take(ALIGN_BYTES // 2, torch.float16)
    assert d is not None and _offset(staging, d) == 3 * ALIGN_BYTES and staging.refusals == 2
    assert staging.take(0, torch.float32) is None  # an empty take still needs a unit of its own
    assert staging.take_all([(1, torch.uint8), (1, torch.uint8)]) is None and staging.refusals == 4


def test_out_of_order_give_backs_merge_and_the_front_is_reused_when_the_end_is_taken(no_new_memory):
    """Batches are lent in order and mostly given back in order: a freed slice ahead of older ones is reusable at
    once, runs given back in any order merge, and a take that does not fit at the end wraps to the front."""
    staging = PinnedStaging(pin=False, capacity_bytes=10 * ALIGN_BYTES)
    no_new_memory()
    views = [staging.take(2 * ALIGN_BYTES, torch.uint8) for _ in range(5)]
    assert staging.free_bytes == 0
    staging.give_back(views[3])  # out of order
    staging.give_back(views[1])
    assert staging.largest_free_bytes == 2 * ALIGN_BYTES
    staging.give_back(views[2])  # merges with both neighbours
    assert staging.largest_free_bytes == 6 * ALIGN_BYTES and staging.lent == 2
    big = staging.take(6 * ALIGN_BYTES // 4, torch.float32)
    assert _offset(staging, big) == 2 * ALIGN_BYTES
    staging.give_back(views[0])
    staging.give_back(big)
    tail = staging.take(3 * ALIGN_BYTES, torch.uint8)  # 8 units free at the front, 2 lent at the end
    assert _offset(staging, tail) == 0
    staging.give_back(views[4])
    staging.give_back(tail)
    assert staging.lent_bytes == 0 and staging._free == [(0, staging.capacity_bytes)]


def test_take_all_is_all_or_nothing():
    staging = PinnedStaging(pin=False, capacity_bytes=4 * ALIGN_BYTES)
    got = staging.take_all([(ALIGN_BYTES // 2, torch.float16), (3, torch.int64)])
    assert [v.dtype for v in got] == [torch.float16, torch.int64] and staging.lent == 2
    assert staging.fits([(2 * ALIGN_BYTES, torch.uint8)]) and not staging.fits([(ALIGN_BYTES, torch.uint8)] * 3)
    assert staging.refusals == 0 and staging.lent == 2  # fits takes nothing
    assert staging.take_all([(ALIGN_BYTES, torch.uint8), (2 * ALIGN_BYTES, torch.uint8)]) is None
    assert staging.lent == 2 and staging.lent_bytes == 2 * ALIGN_BYTES and staging.refusals == 1
    assert staging._free == [(2 * ALIGN_BYTES, 4 * ALIGN_BYTES)]  # the first slice placed was given back


def test_bad_input_is_refused():
    for capacity in (0, -ALIGN_BYTES, ALIGN_BYTES + 1, ALIGN_BYTES // 2):
        with pytest.raises(ValueError, match=f"capacity_bytes: expected a multiple of {ALIGN_BYTES} bytes >= "
                                             f"{ALIGN_BYTES}, got {capacity}"):  # fmt: skip
            PinnedStaging(pin=False, capacity_bytes=capacity)
    staging = PinnedStaging(pin=False, capacity_bytes=4 * ALIGN_BYTES)
    with pytest.raises(ValueError, match="numel: expected elements >= 0, got -1"):
        staging.take(-1, torch.float32)
    with pytest.raises(ValueError, match="numel: expected elements >= 0, got -2"):
        staging.take_all([(4, torch.uint8), (-2, torch.uint8)])
    assert staging.lent == 0
    v = staging.take(4, torch.float32)
    keep = staging.take(4, torch.float32)
    staging.give_back(v)
    with pytest.raises(ValueError, match="view: expected a view taken from this staging and not given back yet, "
                                         "got 4 elements of torch.float32"):  # fmt: skip
        staging.give_back(v)  # already given back
    with pytest.raises(ValueError, match="view: expected a view taken from this staging"):
        staging.give_back(torch.zeros(4))  # foreign
    with pytest.raises(ValueError, match="view: expected a view taken from this staging"):
        staging.give_back(keep[1:])  # part of a lent slice, not the slice
    with pytest.raises(ValueError, match="view: expected a view taken from this staging"):
        staging.give_back(keep[:2])
    with pytest.raises(ValueError, match="view: expected a view taken from this staging"):
        PinnedStaging(pin=False, capacity_bytes=4 * ALIGN_BYTES).give_back(keep)  # another staging's
    staging.give_back(keep)
    assert staging.lent == 0 and staging.lent_bytes == 0


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3 * ALIGN_BYTES), st.sampled_from(DTYPES),
                          st.integers(0, 2**31 - 1)), max_size=60),
       st.integers(4, 40))  # fmt: skip
def test_slices_lent_never_overlap_and_keep_what_was_written(ops, units):
    """Random takes and give-backs (in any order): every lent view is aligned, its bytes are its own until given
    back, a refusal only when no free run holds it, and the counters add up."""
    staging = PinnedStaging(pin=False, capacity_bytes=units * ALIGN_BYTES)
    lent = []  # (view, what was written)
    for give, numel, dtype, seed in ops:
        gen = torch.Generator().manual_seed(seed)
        if give and lent:
            view, want = lent.pop(seed % len(lent))
            assert torch.equal(view, want)
            staging.give_back(view)
        else:
            span = max(1, -(-numel * dtype.itemsize // ALIGN_BYTES)) * ALIGN_BYTES
            largest = staging.largest_free_bytes
            view = staging.take(numel, dtype)
            if view is None:
                assert largest < span
                continue
            assert view.numel() == numel and view.dtype == dtype and _offset(staging, view) % ALIGN_BYTES == 0
            assert view.data_ptr() % dtype.itemsize == 0 or numel == 0
            lent.append((view, _fill(view, gen)))
        spans = sorted((_offset(staging, v), _offset(staging, v) + v.numel() * v.element_size()) for v, _ in lent)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
        assert all(torch.equal(v, want) for v, want in lent)
        assert staging.lent == len(lent)
        assert staging.lent_bytes + sum(end - start for start, end in staging._free) == staging.capacity_bytes
    for view, _ in lent:
        staging.give_back(view)
    assert staging.lent_bytes == 0 and staging._free == [(0, staging.capacity_bytes)]


def test_host_copies_land_in_the_staging_and_release_gives_the_slices_back():
    gen = torch.Generator().manual_seed(7)
    staging = PinnedStaging(pin=False, capacity_bytes=16 * ALIGN_BYTES)
    for _ in range(3):
        tensors = [torch.randn(5, 3, generator=gen).half(), torch.randn(4, generator=gen),
                   torch.randn(2, 7, generator=gen).half()]  # fmt: skip
        copy = HostCopy.try_stage(tensors, staging)
        assert copy is not None and copy.ready() and staging.lent == 2  # one slice per dtype
        for got, want in zip(copy.tensors, tensors):
            assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)
            assert got.untyped_storage().data_ptr() == staging._arena.untyped_storage().data_ptr()
        copy.release()
        assert staging.lent == 0 and copy.tensors == []


def test_a_host_copy_the_staging_cannot_hold_takes_nothing():
    staging = PinnedStaging(pin=False, capacity_bytes=2 * ALIGN_BYTES)
    fits = [torch.zeros(ALIGN_BYTES // 4)]
    too_big = [torch.zeros(ALIGN_BYTES // 4), torch.zeros(ALIGN_BYTES // 2).half(), torch.zeros(1, dtype=torch.int64)]
    assert HostCopy.try_stage(too_big, staging) is None and staging.lent == 0 and staging.refusals == 1
    with pytest.raises(RuntimeError, match="staging: expected room for the copies, got 512 bytes free in one run"):
        HostCopy(too_big, staging)
    copy = HostCopy(fits, staging)
    assert staging.lent == 1
    copy.release()
    assert staging.lent == 0


def test_a_host_copy_that_fails_gives_its_slices_back():
    staging = PinnedStaging(pin=False, capacity_bytes=4 * ALIGN_BYTES)
    buffers = staging.take_all([(4, torch.float32), (2, torch.float16)])
    with pytest.raises(RuntimeError):
        HostCopy([torch.zeros(4), torch.zeros(3).half()], staging, buffers)  # 3 elements into a slice of 2
    assert staging.lent == 0 and staging.lent_bytes == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_copies_land_in_the_pinned_arena():
    gen = torch.Generator().manual_seed(3)
    staging = PinnedStaging(pin=True, capacity_bytes=1 << 20)
    for n in (1000, 70_000, 300):
        tensors = [torch.randn(n, generator=gen).to("cuda", torch.bfloat16), torch.randn(7, n % 13 + 1).cuda()]
        copy = HostCopy.try_stage(tensors, staging)
        assert copy is not None
        copy.wait()
        for got, want in zip(copy.tensors, tensors):
            assert got.is_pinned() and torch.equal(got, want.cpu())
        copy.release()
    assert staging.lent == 0 and staging.refusals == 0
