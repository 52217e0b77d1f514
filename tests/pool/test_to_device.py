# SPDX-License-Identifier: Apache-2.0
"""Host-to-device moves: every tensor of a plan moves, values intact; the page-locked ring that stages them copies
every dtype and shape whole and never writes a slice whose copy is still in flight."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaickv_sglang.kernels.format import SegmentPlan
from mosaickv_sglang.pool import device as device_mod
from mosaickv_sglang.pool import to_device
from mosaickv_sglang.pool.device import ALIGN_BYTES, PinnedRing
from mosaickv_sglang.pool.store import _plan_to


def test_a_plan_moves_whole_and_a_plan_already_there_is_not_copied():
    plan = SegmentPlan.uniform(3, 16, 64)
    plan.k_factors = (torch.randn(3, 16, 4), torch.randn(3, 4, 64))  # a tuple field, not checked again
    assert _plan_to(plan, torch.device("cpu")) is plan
    moved = _plan_to(plan, torch.device("meta"))
    for f in dataclasses.fields(plan):
        old, new = getattr(plan, f.name), getattr(moved, f.name)
        parts = list(old) if isinstance(old, tuple) else [old]
        got = list(new) if isinstance(new, tuple) else [new]
        assert len(parts) == len(got), f.name
        for a, b in zip(parts, got):
            assert (a is None) == (b is None), f.name
            if a is not None:
                assert b.device.type == "meta" and b.shape == a.shape and b.dtype == a.dtype, f.name


def test_to_device_on_the_host_is_a_plain_move():
    x = torch.arange(6).view(2, 3)
    assert to_device(x, "cpu") is x
    torch.testing.assert_close(to_device(x, torch.device("cpu")), x, atol=0, rtol=0)


class FakeEvent:
    """A CUDA event stand-in: done only once the test says so."""

    def __init__(self) -> None:
        self.done = False
        self.recorded = 0

    def record(self, stream=None) -> None:
        self.recorded += 1

    def query(self) -> bool:
        return self.done


def _ring(capacity_bytes: int = 8 * ALIGN_BYTES):
    events = []

    def new_event():
        events.append(FakeEvent())
        return events[-1]

    return PinnedRing(capacity_bytes, pin=False, new_event=new_event), events


def _random(gen: torch.Generator, dtype: torch.dtype, shape) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-(2**30), 2**30, shape, generator=gen).to(dtype)


@pytest.mark.parametrize("seed", range(4))
def test_the_ring_copies_every_dtype_and_shape_whole(seed):
    gen = torch.Generator().manual_seed(seed)
    ring, events = _ring(64 * ALIGN_BYTES)
    for _ in range(40):
        dtype = [torch.int32, torch.int64, torch.float16, torch.float32, torch.bool, torch.uint8][
            int(torch.randint(0, 6, (1,), generator=gen))]
        shape = tuple(int(n) for n in torch.randint(0, 9, (int(torch.randint(1, 4, (1,), generator=gen)),),
                                                    generator=gen))  # fmt: skip
        x = _random(gen, dtype, shape)
        if x.dim() > 1 and x.shape[0] > 1:
            x = x.transpose(0, -1)  # not contiguous
        out = ring.copy_to(x, torch.device("cpu"))
        assert out is not None and out.shape == x.shape and out.dtype == x.dtype
        torch.testing.assert_close(out, x, atol=0, rtol=0)
        for e in events:
            e.done = True  # each copy done before the next: the ring wraps around as often as it likes
    assert ring.passed == 0 and ring.copies == sum(e.recorded for e in events) == len(events)


def test_a_slice_is_not_written_again_while_its_copy_is_in_flight():
    ring, events = _ring(16 * ALIGN_BYTES)
    block = ALIGN_BYTES // 4  # int32 elements of one slice
    first = [ring.copy_to(torch.full((block,), i, dtype=torch.int32), torch.device("cpu")) for i in range(16)]
    assert all(t is not None for t in first) and ring.copies == 16
    held = ring._arena.clone()
    # the ring is full of copies in flight: the next one is refused, nothing written
    assert ring.copy_to(torch.full((block,), 99, dtype=torch.int32), torch.device("cpu")) is None
    assert ring.passed == 1 and torch.equal(ring._arena, held)
    # a copy done before an older one (another stream) frees nothing the head reaches: slice 0 is still in flight
    events[1].done = True
    assert ring.copy_to(torch.full((block,), 7, dtype=torch.int32), torch.device("cpu")) is None
    events[0].done = True
    again = ring.copy_to(torch.full((2 * block,), 5, dtype=torch.int32), torch.device("cpu"))
    assert again is not None and torch.equal(again, torch.full((2 * block,), 5, dtype=torch.int32))
    assert torch.equal(ring._arena[2 * ALIGN_BYTES :], held[2 * ALIGN_BYTES :])  # slices 2..15 untouched
    assert ring.copy_to(torch.ones(block, dtype=torch.int32), torch.device("cpu")) is None  # slice 2 in flight
    assert ring.passed == 3


def test_a_copy_larger_than_an_eighth_of_the_ring_is_left_to_the_caller():
    ring, _ = _ring(16 * ALIGN_BYTES)
    assert ring.copy_to(torch.zeros(2 * ALIGN_BYTES + 1, dtype=torch.uint8), torch.device("cpu")) is None
    assert ring.copy_to(torch.zeros(2 * ALIGN_BYTES, dtype=torch.uint8), torch.device("cpu")) is not None
    assert (ring.passed, ring.copies) == (1, 1)


def test_an_empty_tensor_takes_no_slice():
    ring, events = _ring()
    out = ring.copy_to(torch.zeros(0, 3, dtype=torch.float16), torch.device("cpu"))
    assert out.shape == (0, 3) and out.dtype == torch.float16 and not events and ring.copies == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3 * ALIGN_BYTES), st.booleans()), min_size=1, max_size=60))
def test_no_two_copies_in_flight_share_bytes(steps):
    """Random copies, each done at once or left in flight: the slices of the copies in flight never overlap, and
    each copy placed carries its own bytes."""
    ring, events = _ring(16 * ALIGN_BYTES)
    for i, (nbytes, done) in enumerate(steps):
        x = torch.full((nbytes,), i % 251, dtype=torch.uint8)
        out = ring.copy_to(x, torch.device("cpu"))
        if out is not None:
            assert torch.equal(out, x)
            events[-1].done = done
        live = sorted((s, e) for s, e, ev in ring._in_flight if not ev.query())
        assert all(a[1] <= b[0] for a, b in zip(live, live[1:]))
    assert ring.copies + ring.passed == len(steps)


@pytest.mark.parametrize("capacity", [0, 8 * ALIGN_BYTES - 1, 8 * ALIGN_BYTES + 1, True])
def test_bad_capacity_is_refused_by_name(capacity):
    with pytest.raises(ValueError, match="capacity_bytes: expected a multiple of 256 bytes >= 2048"):
        PinnedRing(capacity, pin=False, new_event=FakeEvent)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_to_device_on_cuda_goes_through_the_ring_without_pinning_memory(monkeypatch):
    dev = torch.device("cuda", torch.cuda.current_device())
    ring = device_mod.pinned_ring(dev)
    before, seconds = ring.copies, device_mod.copy_seconds()
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pytest.fail("pin_memory called"))
    gen = torch.Generator().manual_seed(0)
    xs = [_random(gen, torch.int64, (int(n),)) for n in torch.randint(1, 5000, (300,), generator=gen)]
    outs = [to_device(x, "cuda") for x in xs]  # 300 copies of up to 40 KB: the ring wraps around
    torch.cuda.synchronize()
    for x, out in zip(xs, outs):
        assert out.device == dev
        torch.testing.assert_close(out.cpu(), x, atol=0, rtol=0)
    assert ring.copies - before == len(xs)
    assert device_mod.copy_seconds() > seconds  # the copies' host time, which the decode plans' stall record shows


def test_the_status_names_a_devices_ring_once_it_has_copied(monkeypatch):
    monkeypatch.setattr(device_mod, "_rings", {})
    assert device_mod.ring_status("cpu") == "" and device_mod.ring_status("cuda:0") == ""
    ring, events = _ring()
    ring.copy_to(torch.ones(3), torch.device("cpu"))
    ring.copy_to(torch.ones(10**4), torch.device("cpu"))  # larger than an eighth: past it
    device_mod._rings[torch.device("cuda", 0)] = ring
    assert device_mod.ring_status("cuda:0") == "pinned ring: 1 copies, 1 past it"


def test_the_landing_lends_aligned_views_that_do_not_overlap_and_grows_by_doubling():
    landing = device_mod.HostLanding(pin=False, capacity_bytes=1024)
    specs = [((3, 5), torch.int32), ((7,), torch.int64), ((0,), torch.float16), ((2, 2, 2), torch.bool)]
    with landing.lock:
        views = landing.views(specs)
    assert [(tuple(v.shape), v.dtype) for v in views] == [(tuple(s), d) for s, d in specs]
    assert all(v.untyped_storage().data_ptr() == landing._buffer.untyped_storage().data_ptr() for v in views)
    spans = [(v.storage_offset() * v.element_size(), (v.storage_offset() + v.numel()) * v.element_size())
             for v in views]  # fmt: skip
    assert all(start % ALIGN_BYTES == 0 for start, _ in spans)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    for i, v in enumerate(views):
        v.fill_(i + 1)
    assert [int(v.to(torch.int64).sum()) for v in views] == [15, 14, 0, 8]  # each view kept its own bytes
    assert landing.grown == 1 and landing.capacity_bytes == 1024
    big = landing.views([((1000,), torch.int32)])[0]  # 4,000 bytes: 1,024 doubled twice
    assert big.shape == (1000,) and landing.capacity_bytes == 4096 and landing.grown == 2
    landing.views([((10,), torch.int32)])  # fits: no new buffer
    assert landing.grown == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_landing_on_cuda_takes_reads_from_the_device():
    dev = torch.device("cuda", torch.cuda.current_device())
    landing = device_mod.host_landing(dev)
    x = torch.arange(5000, device=dev, dtype=torch.int32)
    with landing.lock:
        (host,) = landing.views([(x.shape, x.dtype)])
        host.copy_(x, non_blocking=True)
        torch.cuda.synchronize()
        assert host.is_pinned() and torch.equal(host, x.cpu())



def test_each_device_has_one_landing(monkeypatch):
    monkeypatch.setattr(device_mod, "_landings", {})
    monkeypatch.setattr(device_mod, "HostLanding", functools.partial(device_mod.HostLanding, pin=False))
    first = device_mod.host_landing(torch.device("cuda", 0))
    assert device_mod.host_landing(torch.device("cuda", 0)) is first
    assert device_mod.host_landing(torch.device("cuda", 1)) is not first
    assert not first.pin and first.grown == 0  # nothing allocated before the first read


def test_with_index_keeps_a_given_index_and_the_host():
    assert device_mod.with_index("cpu") == torch.device("cpu")
    assert device_mod.with_index("cuda:1") == torch.device("cuda", 1)
    assert device_mod.with_index(torch.device("meta")) == torch.device("meta")
