# SPDX-License-Identifier: Apache-2.0
"""GranuleAllocator: invariants under random alloc/free sequences, all-or-nothing failure, coalescing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaickv_sglang.pool import ArenaFullError, GranuleAllocator

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.lists(st.integers(1, 24), min_size=1, max_size=12)),
        st.tuples(st.just("free"), st.floats(0.0, 1.0), st.integers(1, 4)),
    ),
    min_size=1,
    max_size=40,
)


def _check_live(alloc: GranuleAllocator, live: dict) -> None:
    """No overlap among live runs nor with free space; exact accounting."""
    alloc.check_invariants()
    cover = np.zeros(alloc.capacity, dtype=np.int64)
    for off, size in live.values():
        cover[off : off + size] += 1
    starts, lens = alloc.extents()
    for s0, n0 in zip(starts, lens):
        cover[s0 : s0 + n0] += 1
    assert (cover == 1).all(), "every granule is either in exactly one live run or free"
    used = sum(size for _, size in live.values())
    assert alloc.used_granules == used
    assert alloc.used_granules + alloc.free_granules == alloc.capacity


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(0, 200), ops=OPS)
def test_random_alloc_free_keeps_invariants(capacity, ops):
    """Random batches of allocations and frees: live runs never overlap each other or free space, used + free ==
    capacity, failed batches change nothing, and freeing everything leaves one extent."""
    alloc = GranuleAllocator(capacity)
    live: dict = {}
    next_id = 0
    for op in ops:
        if op[0] == "alloc":
            sizes = np.array(op[1], dtype=np.int64)
            before = alloc.state()
            largest = alloc.largest_free
            out = alloc.try_alloc(sizes)
            if out is None:
                assert alloc.state() == before, "a failed batch leaves the allocator unchanged"
                assert int(sizes.sum()) > largest, "a batch that fits in one extent never fails"
                with pytest.raises(ArenaFullError):
                    alloc.alloc(torch.from_numpy(sizes))
                assert alloc.state() == before
            else:
                assert out.shape == sizes.shape
                for o, s in zip(out.tolist(), sizes.tolist()):
                    live[next_id] = (o, s)
                    next_id += 1
        else:
            _, frac, count = op
            keys = sorted(live)
            if keys:
                start = int(frac * (len(keys) - 1))
                chosen = keys[start : start + count]
                off = np.array([live[k][0] for k in chosen])
                sz = np.array([live[k][1] for k in chosen])
                alloc.free(off, sz)
                for k in chosen:
                    del live[k]
        _check_live(alloc, live)
    if live:
        alloc.free(np.array([o for o, _ in live.values()]), np.array([s for _, s in live.values()]))
    assert alloc.free_granules == capacity
    assert alloc.num_extents == (1 if capacity else 0), "freed runs coalesce back into one extent"


@settings(max_examples=30, deadline=None)
@given(size=st.integers(1, 6), holes=st.lists(st.integers(1, 20), min_size=1, max_size=8))
def test_fragmented_uniform_batches_fill_every_hole(size, holes):
    """With free space split into holes, a batch of equal-size payloads succeeds exactly when the holes have room for
    it (sum of floor(hole / size)): the spread path uses every fragment."""
    # build: hole_i, then a 1-granule pin, repeated
    capacity = sum(holes) + len(holes)
    alloc = GranuleAllocator(capacity)
    off = alloc.alloc(np.array([g for h in holes for g in (h, 1)]))
    alloc.free(off[0::2], np.array(holes))  # free the holes, keep the pins
    room = sum(h // size for h in holes)
    before = alloc.state()
    assert alloc.try_alloc(np.full(room + 1, size)) is None
    assert alloc.state() == before
    got = alloc.alloc(np.full(room, size))
    assert got.size == room and alloc.used_granules == len(holes) + room * size
    alloc.check_invariants()


@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, 200), ops=OPS, batch=st.lists(st.integers(1, 24), min_size=1, max_size=12))
def test_carving_a_batchs_total_places_it_as_try_alloc_does(capacity, ops, batch):
    """On any free list (random allocations and frees first), ``try_carve`` of a batch's total plus the batch's
    exclusive prefix sums gives try_alloc's offsets and leaves the same free list when one extent holds the batch (an
    exact fit removes the extent); else it returns None and changes nothing."""
    alloc = GranuleAllocator(capacity)
    live = []
    for op in ops:
        if op[0] == "alloc":
            sizes = np.array(op[1], dtype=np.int64)
            out = alloc.try_alloc(sizes)
            live += [] if out is None else list(zip(out.tolist(), sizes.tolist()))
        elif live:
            _, frac, count = op
            start = int(frac * (len(live) - 1))
            chosen, live = live[start : start + count], live[:start] + live[start + count :]
            alloc.free(np.array([o for o, _ in chosen]), np.array([n for _, n in chosen]))
    sizes = np.array(batch, dtype=np.int64)
    twin = GranuleAllocator(capacity)
    twin._starts, twin._lens, twin._free = alloc._starts.copy(), alloc._lens.copy(), alloc.free_granules
    before, largest = alloc.state(), alloc.largest_free
    start = alloc.try_carve(int(sizes.sum()))
    if start is None:
        assert alloc.state() == before and int(sizes.sum()) > largest
    else:
        assert (start + np.cumsum(sizes) - sizes).tolist() == twin.try_alloc(sizes).tolist()
        assert alloc.state() == twin.state()
    alloc.check_invariants()


def test_carve_takes_the_smallest_extent_and_an_exact_fit_removes_it():
    alloc = GranuleAllocator(100)
    off = alloc.alloc(np.array([10, 1, 30, 1, 12]))  # extents after freeing 0 and 2: [0,10), [11,41), [54,100)
    alloc.free(off[[0, 2]], np.array([10, 30]))
    assert alloc.try_carve(10) == 0 and alloc.num_extents == 2
    assert alloc.try_carve(31) == 54 and alloc.try_carve(50) is None and alloc.try_carve(0) is None
    assert alloc.extents()[0].tolist() == [11, 85] and alloc.free_granules == 45
    alloc.check_invariants()


def test_contiguous_batch_and_best_fit():
    """A batch that fits in one extent is placed contiguously in the smallest extent that holds it."""
    alloc = GranuleAllocator(100)
    off = alloc.alloc(np.array([10, 1, 30, 1, 12]))  # extents after freeing 0 and 2: [0,10) and [11,41)
    alloc.free(off[[0, 2]], np.array([10, 30]))
    got = alloc.alloc(np.array([3, 4, 2]))
    assert got.tolist() == [0, 3, 7], "best fit: the 10-granule hole, payloads adjacent in order"
    got2 = alloc.alloc(np.array([20]))
    assert got2.tolist() == [11]


def test_double_free_and_bad_arguments_raise_and_change_nothing():
    """Freeing free space, overlapping runs or out-of-range runs raises ValueError without side effects."""
    alloc = GranuleAllocator(64)
    off = alloc.alloc(np.array([8, 8, 8]))
    alloc.free(off[:1], np.array([8]))
    before = alloc.state()
    with pytest.raises(ValueError, match="double free"):
        alloc.free(off[:1], np.array([8]))
    with pytest.raises(ValueError, match="double free"):
        alloc.free(np.array([8, 12]), np.array([8, 8]))  # the two runs overlap
    with pytest.raises(ValueError, match="offsets: expected runs inside"):
        alloc.free(np.array([60]), np.array([8]))
    with pytest.raises(ValueError, match="sizes: expected every payload >= 1"):
        alloc.alloc(np.array([0]))
    with pytest.raises(ValueError, match="capacity: expected an integer >= 0"):
        GranuleAllocator(-1)
    assert alloc.state() == before
    with pytest.raises(ArenaFullError, match="arena: expected room for 100 granules"):
        alloc.alloc(np.array([50, 50]))
