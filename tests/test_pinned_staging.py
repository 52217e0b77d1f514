# SPDX-License-Identifier: Apache-2.0
"""PinnedStaging: a batch takes the smallest free buffer that holds it, buffers taken never overlap, what is written
into one stays until it is given back, and free buffers stay within their cap (buffers not page-locked here: the same
code on the CPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaickv_sglang.sidecar.bridge import HostCopy
from mosaickv_sglang.sidecar.pinned_staging import MIN_BUFFER_BYTES, PinnedStaging


def _span(view: torch.Tensor):
    return view.data_ptr(), view.data_ptr() + view.numel() * view.element_size()


def test_a_buffer_given_back_is_taken_again_by_a_batch_it_holds():
    staging = PinnedStaging(pin=False)
    a = staging.take(1000, torch.bfloat16)
    assert a.shape == (1000,) and a.dtype == torch.bfloat16 and staging.allocations == 1
    assert staging.allocated_bytes == MIN_BUFFER_BYTES and staging.lent == 1
    ptr = a.data_ptr()
    staging.give_back(a)
    b = staging.take(MIN_BUFFER_BYTES // 4, torch.float32)  # another size and dtype, same buffer
    assert b.data_ptr() == ptr and staging.allocations == 1 and b.numel() == MIN_BUFFER_BYTES // 4
    c = staging.take(10, torch.float16)  # the only buffer is lent: a new one
    assert c.data_ptr() != ptr and staging.allocations == 2


def test_the_smallest_free_buffer_that_holds_the_batch_is_taken_and_sizes_are_powers_of_two():
    staging = PinnedStaging(pin=False)
    big = staging.take(3 * MIN_BUFFER_BYTES, torch.uint8)
    small = staging.take(5, torch.uint8)
    assert staging.allocated_bytes == 4 * MIN_BUFFER_BYTES + MIN_BUFFER_BYTES
    big_ptr, small_ptr = big.data_ptr(), small.data_ptr()
    staging.give_back(big)
    staging.give_back(small)
    assert staging.take(100, torch.float32).data_ptr() == small_ptr
    assert staging.take(2 * MIN_BUFFER_BYTES, torch.uint8).data_ptr() == big_ptr
    assert staging.allocations == 2


def test_free_buffers_past_the_cap_are_dropped_largest_first():
    staging = PinnedStaging(pin=False, max_free_bytes=3 * MIN_BUFFER_BYTES)
    views = [staging.take(n, torch.uint8) for n in (MIN_BUFFER_BYTES, 2 * MIN_BUFFER_BYTES, 4 * MIN_BUFFER_BYTES)]
    for v in views:
        staging.give_back(v)
    assert staging.free_bytes == 3 * MIN_BUFFER_BYTES  # the 4 MiB one dropped
    assert PinnedStaging(pin=False, max_free_bytes=0).free_bytes == 0


def test_bad_input_is_refused():
    staging = PinnedStaging(pin=False)
    with pytest.raises(ValueError, match="numel: expected elements >= 0, got -1"):
        staging.take(-1, torch.float32)
    with pytest.raises(ValueError, match="max_free_bytes: expected bytes >= 0, got -1"):
        PinnedStaging(pin=False, max_free_bytes=-1)
    v = staging.take(4, torch.float32)
    staging.give_back(v)
    with pytest.raises(ValueError, match="view: expected a buffer taken from this staging"):
        staging.give_back(v)
    with pytest.raises(ValueError, match="view: expected a buffer taken from this staging"):
        staging.give_back(torch.zeros(4))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 3 * MIN_BUFFER_BYTES // 4),
                          st.sampled_from([torch.uint8, torch.float16, torch.float32])), max_size=40))
def test_buffers_lent_never_overlap_and_keep_what_was_written(ops):
    """Random takes and give-backs: every lent view's bytes are its own until given back."""
    staging = PinnedStaging(pin=False, max_free_bytes=4 * MIN_BUFFER_BYTES)
    lent = []  # (view, the value written)
    for i, (give, numel, dtype) in enumerate(ops):
        if give and lent:
            view, value = lent.pop(i % len(lent))
            assert bool((view == value).all())
            staging.give_back(view)
            continue
        view = staging.take(numel, dtype)
        assert view.numel() == numel and view.dtype == dtype
        view.fill_(i % 100)
        lent.append((view, i % 100))
        spans = sorted(_span(v) for v, _ in lent if v.numel())
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    for view, value in lent:
        assert bool((view == value).all())
    assert staging.lent == len(lent)


def test_host_copies_land_in_the_staging_and_release_gives_the_buffers_back():
    gen = torch.Generator().manual_seed(7)
    staging = PinnedStaging(pin=False)
    for _ in range(3):
        tensors = [torch.randn(5, 3, generator=gen).half(), torch.randn(4, generator=gen),
                   torch.randn(2, 7, generator=gen).half()]
        copy = HostCopy(tensors, staging)
        assert copy.ready() and staging.lent == 2  # one buffer per dtype
        for got, want in zip(copy.tensors, tensors):
            assert got.shape == want.shape and got.dtype == want.dtype and torch.equal(got, want)
            assert got.data_ptr() != want.data_ptr()  # copied, not the source's memory
        copy.release()
        assert staging.lent == 0 and copy.tensors == []
    assert staging.allocations == 2  # the second and third copies reused the first's buffers


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_copies_land_in_pinned_reused_buffers():
    gen = torch.Generator().manual_seed(3)
    staging = PinnedStaging(pin=True)
    for n in (1000, 70_000, 300):  # sizes of several power-of-two bins: one buffer all along
        tensors = [torch.randn(n, generator=gen).to("cuda", torch.bfloat16), torch.randn(7, n % 13 + 1).cuda()]
        copy = HostCopy(tensors, staging)
        copy.wait()
        for got, want in zip(copy.tensors, tensors):
            assert got.is_pinned() and torch.equal(got, want.cpu())
        copy.release()
    assert staging.allocations == 2 and staging.lent == 0
