# SPDX-License-Identifier: Apache-2.0
"""Beside the step in flight (MOSAICKV_SEAL_BESIDE_STEP=1), a plan whose hot pool runs low seals the least recently
written complete pages, the ones hot-pool pressure would otherwise seal inside a later step; with room to spare it
seals nothing extra, and through the backend's plans decode outputs match SGLang's torch_native backend."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sglang")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helper modules (importlib import mode)

from mkv_backend_cases import Scenario, config, prefilled  # noqa: E402

NONE = np.zeros(0, dtype=np.int64)


def _filled(seed: int) -> Scenario:
    """Three requests' prefills, nothing sealed, sealing beside the step on."""
    sc = prefilled(seed)
    sealer = sc.mosaic.sealer
    sealer.seal_beside_step = True
    sealer.end_plan()  # the prefill is the step in flight: its pages wait
    sealer.end_plan()  # a plan that wrote nothing is: every complete page may be sealed beside it
    return sc


@pytest.mark.parametrize("seed", [1, 2])
def test_a_low_hot_pool_seals_the_least_recently_written_pages_beside_the_step(seed):
    sc = _filled(seed)
    sealer, pool = sc.mosaic.sealer, sc.pool
    cold = pool.complete_dense_pages()
    free = pool.num_free_physical_pages
    assert cold.size >= 4 and sealer.pages_sealed == 0
    sealer.min_seal_pages, sealer.reserve_pages = 2, 0
    sealer.low_water_pages = free + 3  # three pages short
    sealer._seal_due(NONE, np.zeros(0, dtype=bool), NONE)
    assert (sealer.cold_pages_sealed, sealer.pages_sealed, sealer.side_seals) == (3, 3, 1)
    assert sealer.pressure_pages_sealed == 0
    assert pool.store.is_sealed(torch.from_numpy(cold[:3])).all()
    assert not pool.store.is_sealed(torch.from_numpy(cold[3:])).any()
    assert pool.num_free_physical_pages == free + 3


def test_a_shortfall_below_a_batch_seals_a_whole_batch_and_room_to_spare_seals_nothing():
    sc = _filled(3)
    sealer, pool = sc.mosaic.sealer, sc.pool
    sealer.min_seal_pages, sealer.reserve_pages = 4, 0
    sealer.low_water_pages = pool.num_free_physical_pages  # room to spare
    sealer._seal_due(NONE, np.zeros(0, dtype=bool), NONE)
    assert sealer.pages_sealed == 0 and sealer.cold_pages_sealed == 0
    sealer.low_water_pages = pool.num_free_physical_pages + 1  # one page short: a batch of 4
    sealer._seal_due(NONE, np.zeros(0, dtype=bool), NONE)
    assert sealer.cold_pages_sealed == 4 and sealer.pages_sealed == 4


def test_without_sealing_beside_the_step_only_pressure_seals():
    sc = _filled(4)
    sealer, pool = sc.mosaic.sealer, sc.pool
    sealer.seal_beside_step = False
    sealer.min_seal_pages, sealer.reserve_pages = 1, 0
    sealer.low_water_pages = pool.num_free_physical_pages + 5
    sealer._seal_due(NONE, np.zeros(0, dtype=bool), NONE)
    assert sealer.pages_sealed == 0 and sealer.cold_pages_sealed == 0


def test_the_low_water_mark_is_a_quarter_of_the_hot_pool_at_least_a_batch():
    sc = Scenario(config(ratio=3.0), group=2, seed=5, min_seal_pages=16)  # the backend's default batch
    sealer = sc.mosaic.sealer
    hot_pages = sc.pool.num_physical_pages - 1
    assert hot_pages // 4 < 16 and sealer.low_water_pages == 16
    sealer.min_seal_pages = 1
    assert sealer.low_water_pages == hot_pages // 4  # it follows the batch size
    sealer.low_water_pages = 5
    sealer.min_seal_pages = 40
    assert sealer.low_water_pages == 5  # a value of its own stays


def test_the_pack_mark_is_half_the_low_water_mark_unless_set():
    sealer = Scenario(config(ratio=3.0), group=2, seed=5, min_seal_pages=16).mosaic.sealer
    assert sealer.pack_water_pages == sealer.low_water_pages // 2 == 8
    sealer.low_water_pages = 31
    assert sealer.pack_water_pages == 15  # it follows the low-water mark
    sealer.pack_water_pages = 40
    sealer.low_water_pages = 4
    assert sealer.pack_water_pages == 40  # a value of its own stays


@pytest.mark.parametrize("name", ["low_water_pages", "pack_water_pages"])
@pytest.mark.parametrize("raw", [-1, 2.5, True, "4"])
def test_a_bad_mark_is_refused_by_name(name, raw):
    sealer = Scenario(config(ratio=3.0), group=2, seed=6).mosaic.sealer
    with pytest.raises(ValueError, match=f"{name}: expected an integer >= 0, got"):
        setattr(sealer, name, raw)


@pytest.mark.parametrize("group", [1, 4])
def test_served_plans_with_a_high_water_mark_match_the_reference(group):
    """Through the backend (auto-seal, sealing beside the step, all but two hot pages kept free): cold pages are
    sealed, and each step's outputs match SGLang's torch_native backend (ratio 1: sealed pages are exact)."""
    sc = Scenario(config(ratio=1.0), group=group, seed=17, auto_seal=True)
    sealer = sc.mosaic.sealer
    sealer.seal_beside_step = True
    sealer.low_water_pages = sc.pool.num_physical_pages - 3  # all but two of the hot pool
    _, worst = sc.served([45, 30, 61], decode_steps=12)
    assert sealer.cold_pages_sealed > 0 and sealer.side_seals > 0
    assert worst <= 2e-2, worst


def test_a_low_hot_pool_packs_a_pending_seal_beside_the_step_and_cold_pages_follow():
    """Two halves (MOSAICKV_SEAL_ASYNC=8): with room above the pack mark the pending seal waits; a low pool packs it at
    once, beside the step, and the least recently written pages start the next seal at the same plan."""
    sc = _filled(7)
    sealer, pool = sc.mosaic.sealer, sc.pool
    cold = pool.complete_dense_pages()
    assert cold.size >= 7
    sealer.min_seal_pages, sealer.reserve_pages = 2, 0
    sealer.seal_async, sealer.seal_async_plans = True, 8
    assert sealer.start_seal(cold[:2], np.zeros(2, dtype=bool))
    free = pool.num_free_physical_pages
    sealer.low_water_pages = sealer.pack_water_pages = free  # no room to spare, none short: it waits
    sealer._seal_due(NONE, np.zeros(0, dtype=bool), NONE)
    assert sealer._pending is not None and sealer.pages_sealed == 0 and sealer.cold_pages_sealed == 0
    sealer.low_water_pages = sealer.pack_water_pages = free + 5  # three short once the pending seal is packed
    sealer._seal_due(NONE, np.zeros(0, dtype=bool), NONE)
    assert (sealer.async_seals, sealer.pages_sealed, sealer.cold_pages_sealed) == (1, 2, 3)
    assert sealer.pressure_pages_sealed == 0 and sealer.side_seals >= 2
    assert pool.store.is_sealed(torch.from_numpy(cold[:2])).all()
    assert np.array_equal(np.sort(sealer._pending.pages), np.sort(cold[2:5]))
    assert pool.num_free_physical_pages == free + 2


@pytest.mark.parametrize("pack_mark", ["default", "above the pool"])
def test_a_cold_page_seal_waits_its_plan_count_unless_the_pool_falls_below_the_pack_mark(pack_mark):
    """A seal started because the pool fell below the low-water mark is not packed at the next plans while the pool
    stays there but above the pack mark (half the low-water mark by default): its pack would wait for its planner,
    still on the GPU. Below the pack mark it is taken sooner, and counted so."""
    sc = _filled(7)
    sealer, pool = sc.mosaic.sealer, sc.pool
    sealer.min_seal_pages, sealer.reserve_pages = 2, 0
    sealer.seal_async, sealer.seal_async_plans = True, 4
    free = pool.num_free_physical_pages
    sealer.low_water_pages = free + 3  # three short: a cold-page seal starts
    if pack_mark != "default":
        sealer.pack_water_pages = free + 1
    assert sealer.pack_water_pages < free if pack_mark == "default" else sealer.pack_water_pages > free
    sealer._seal_due(NONE, np.zeros(0, dtype=bool), NONE)
    pending = sealer._pending
    assert pending is not None and sealer.cold_pages_sealed == 3 and sealer.pages_sealed == 0
    waits = 3 if pack_mark == "default" else 0
    for _ in range(waits):
        sealer._seal_due(NONE, np.zeros(0, dtype=bool), NONE)
        assert sealer._pending is pending and sealer.pages_sealed == 0
    sealer._seal_due(NONE, np.zeros(0, dtype=bool), NONE)
    assert sealer.async_seals == 1 and sealer.pages_sealed == 3 and sealer.pressure_pages_sealed == 0
    assert pool.store.is_sealed(torch.from_numpy(pending.pages)).all()
    assert sealer.packs_sooner == (0 if pack_mark == "default" else 1)
