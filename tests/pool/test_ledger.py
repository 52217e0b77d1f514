# SPDX-License-Identifier: Apache-2.0
"""ArenaLedger: reservations from byte budgets, and the planner never packs more than a batch reserved."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mosaickv_sglang.kernels.format import GRANULE_BYTES
from mosaickv_sglang.planner import plan_fast
from mosaickv_sglang.pool import ArenaLedger, seal_budget_bytes
from mosaickv_sglang.strategies.base import dense_segment_bytes, overhead_bytes


@pytest.mark.parametrize("h,s,d", [(3, 16, 64), (8, 64, 128), (1, 32, 64)])
@pytest.mark.parametrize("ratio", [1.0, 2.0, 3.0, 6.75])
def test_reservation_is_the_payload_budget_split_over_the_pages(h, s, d, ratio):
    rng = np.random.default_rng(h * 100 + s + int(ratio * 10))
    ledger = ArenaLedger(64, 10**9, h, s, d)
    sink = rng.random(13) < 0.3
    res = ledger.reservation(sink, ratio)
    seg, over = dense_segment_bytes(s, d), overhead_bytes(d)
    dense_page = h * (seg - over) // GRANULE_BYTES
    assert (res[sink] == dense_page).all()
    n, n_sink = sink.size * h, int(sink.sum()) * h
    assert res.sum() == (seal_budget_bytes(n, n_sink, seg, ratio) - n * over) // GRANULE_BYTES
    assert res[~sink].max() - res[~sink].min() <= 1
    if ratio == 1.0:
        assert (res == dense_page).all()


@pytest.mark.parametrize("h,s,d,ratio", [(3, 16, 64, 3.0), (4, 32, 128, 2.0), (2, 64, 64, 6.0), (8, 16, 128, 4.0)])
def test_fast_plans_never_pack_more_granules_than_the_batch_reserved(h, s, d, ratio):
    """The ledger's promise rests on the planner's: payload granules of a plan <= the reservation."""
    gen = torch.Generator().manual_seed(h * 7 + s)
    pages = 6
    sink = np.zeros(pages, dtype=bool)
    sink[0] = True
    keys = torch.randn(pages * h, s, d, generator=gen) * torch.rand(pages * h, 1, d, generator=gen)
    values = torch.randn(pages * h, s, d, generator=gen)
    seg = dense_segment_bytes(s, d)
    budget = seal_budget_bytes(pages * h, h, seg, ratio)
    queries = torch.randn(pages * h, 8, 2, d, generator=gen)
    plan = plan_fast(keys, values, budget_bytes=budget, queries=queries,
                     always_dense=torch.from_numpy(np.repeat(sink, h))).plan  # fmt: skip
    kg, vg = plan.granules()
    reserved = ArenaLedger(pages + 1, 10**9, h, s, d).reservation(sink, ratio)
    assert int(kg.sum() + vg.sum()) <= int(reserved.sum())


def test_reserve_release_and_check():
    ledger = ArenaLedger(8, 100, 2, 16, 64)
    ledger.reserve(np.array([1, 2]), np.array([30, 40]))
    assert (ledger.reserved, ledger.room) == (70, 30)
    with pytest.raises(ValueError, match="pages: expected pages without a reservation"):
        ledger.reserve(np.array([2]), np.array([5]))
    ledger.release(np.array([1, 5]))
    assert (ledger.reserved, ledger.room) == (40, 60)
    ledger.check()
    ledger.reset()
    assert ledger.reserved == 0
    with pytest.raises(ValueError, match="capacity: expected granules >= 0, got -1"):
        ArenaLedger(8, -1, 2, 16, 64)
