# SPDX-License-Identifier: Apache-2.0
"""PageCopies: page copies in reused slots, capped, the oldest giving its slot up; reads give back what was put."""

from __future__ import annotations

import pytest
import torch

from mosaickv_sglang.sidecar.page_copies import PageCopies

SHAPE = (3, 16, 64)


def _page(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=gen).half(), torch.randn(SHAPE, generator=gen).half()


def test_put_get_forget_and_slot_reuse():
    copies = PageCopies(SHAPE, torch.float16, max_bytes=10 * 2 * 3 * 16 * 64 * 2, slab_pages=4)
    assert copies.max_pages == 10
    pages = {(layer, p): _page(10 * layer + p) for layer in range(2) for p in range(3)}
    for i, (key, (k, v)) in enumerate(pages.items()):
        assert copies.put(key, i, k, v)
    assert len(copies) == 6 and copies.used_bytes == 6 * copies.page_bytes
    assert copies.allocated_bytes == 8 * copies.page_bytes  # two slabs of 4
    for i, (key, (k, v)) in enumerate(pages.items()):
        epoch, kk, vv = copies.get(key)
        assert epoch == i and torch.equal(kk, k) and torch.equal(vv, v)
    copies.forget((0, 1))
    assert (0, 1) not in copies and copies.get((0, 1)) is None and len(copies) == 5
    k, v = _page(99)
    copies.put((5, 5), 7, k, v)  # reuses the freed slot: nothing allocated
    assert copies.allocated_bytes == 8 * copies.page_bytes and torch.equal(copies.get((5, 5))[1], k)
    copies.put((0, 0), 8, v, k)  # replacing a copy keeps one slot for the key
    assert len(copies) == 6 and copies.get((0, 0))[0] == 8 and torch.equal(copies.get((0, 0))[1], v)
    assert sorted(copies) == sorted([(0, 0), (0, 2), (1, 0), (1, 1), (1, 2), (5, 5)])


def test_the_oldest_copy_gives_its_slot_up_at_the_cap():
    copies = PageCopies(SHAPE, torch.float16, max_bytes=3 * 2 * 3 * 16 * 64 * 2 + 100, slab_pages=64)
    assert copies.max_pages == 3
    for p in range(5):
        copies.put((0, p), p, *_page(p))
    assert sorted(copies) == [(0, 2), (0, 3), (0, 4)] and copies.allocated_bytes == 3 * copies.page_bytes
    for p in (2, 3, 4):
        assert torch.equal(copies.get((0, p))[1], _page(p)[0])


def test_zero_cap_keeps_nothing_and_bad_shapes_are_refused():
    copies = PageCopies(SHAPE, torch.float16, max_bytes=0)
    assert not copies.put((0, 0), 1, *_page(0)) and len(copies) == 0 and copies.allocated_bytes == 0
    copies = PageCopies(SHAPE, torch.float16, max_bytes=1 << 20)
    with pytest.raises(ValueError, match=r"keys/values: expected shape \[3, 16, 64\], got \[2, 16, 64\]"):
        copies.put((0, 0), 1, torch.zeros(2, 16, 64), torch.zeros(2, 16, 64))
