# SPDX-License-Identifier: Apache-2.0
"""Sealing in two halves (MOSAICKV_SEAL_ASYNC=N, :mod:`mosaickv_sglang.pending_seal`) on the CPU: the first half
reads nothing from the device and seals nothing; the second makes no synchronisation and packs exactly what a whole
seal packs, N plans later unless the hot pool needs the room; a page freed in between voids the plan and the live pages
are sealed by a later plan; through the backend's plans, every page is sealed one plan later than without it (N = 1),
never sooner (N = 3), and decode outputs match the reference backend. Beside the step, the pack the next plan would
make is made after the current step's launch (:meth:`Sealer.after_launch`) and packs the same. On a GPU, the second
half does not wait for the step in flight, after a launch neither."""

from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("sglang")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helper modules (importlib import mode)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench (repository root)

from mkv_backend_cases import Scenario, config, prefilled  # noqa: E402

from bench.host_syncs import HostSyncCounter  # noqa: E402
from mosaickv_sglang import pending_seal  # noqa: E402
from mosaickv_sglang.pool import ArenaFullError  # noqa: E402
from mosaickv_sglang.pool.pages import PAGE_FREE, PAGE_SEALED  # noqa: E402


def _filled(seed: int, ratio: float = 3.0) -> tuple:
    """A scenario whose requests have complete pages out of the hot window, none sealed: ``(scenario, pages,
    sinks)``."""
    sc = prefilled(seed, ratio)
    pages, sinks = [], []
    for b in range(len(sc.lens)):
        sp = sc.pool.pages_to_seal(sc.slots(b))
        pages.append(sp.pages.numpy())
        sinks.append(sp.always_dense.numpy())
    return sc, np.concatenate(pages).astype(np.int64), np.concatenate(sinks)


def _device_syncs(count: HostSyncCounter) -> dict:
    """The synchronisations ``count`` saw by site, less the reads of host tensors (``.numpy()`` raises on a CUDA
    tensor, so those read the host's page ids and sizes)."""
    return {k: v for k, v in count.by_site.items() if not k.startswith("reads:numpy ")}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bits: packed payloads can hold NaN patterns, which ``torch.equal`` never finds equal."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.clone().view(ints[t.element_size()]) if t.is_floating_point() else t.clone()


def _store_state(sc: Scenario) -> list:
    store = sc.pool.store
    return [_bits(t) for t in (*store.arenas, *store.desc, *store.bounds)] + [
        torch.from_numpy(np.array(a)) for a in (store._k_off, store._v_off, store._k_gran, store._v_gran)
    ]


def test_two_halves_pack_what_a_whole_seal_packs():
    whole, pages, sinks = _filled(4)
    split, pages2, sinks2 = _filled(4)
    assert np.array_equal(pages, pages2) and pages.size >= 4
    assert whole.mosaic.sealer.seal(pages, sinks)
    sealer = split.mosaic.sealer
    free_before = split.pool.num_free_physical_pages
    with HostSyncCounter() as count:
        assert sealer.start_seal(pages2, sinks2)
    assert not _device_syncs(count), dict(count.by_site)
    assert not split.pool.store.is_sealed(torch.from_numpy(pages2)).any()
    assert split.pool.num_free_physical_pages == free_before and sealer.seal_calls == 0
    with HostSyncCounter() as count:
        assert sealer.finish_seal()
    # nor a scalar stored through an index (a wait for the step in flight: a put, part of the syncs)
    assert not _device_syncs(count) and count.puts == 0, dict(count.by_site)
    assert sealer.finish_seal() is False  # nothing left pending
    assert (sealer.seal_calls, sealer.async_seals, sealer.pages_sealed) == (1, 1, pages.size)
    assert split.pool.num_free_physical_pages == whole.pool.num_free_physical_pages
    assert split.pool.arena_ledger.reserved == whole.pool.arena_ledger.reserved
    for a, b in zip(_store_state(whole), _store_state(split)):
        assert torch.equal(a, b)
    batch = whole.decode_batch()
    assert torch.equal(batch.out_cache_loc, split.decode_batch().out_cache_loc)
    outs = [whole.run_both(batch), split.run_both(batch)]
    for (mw, _, _), (ms, _, _) in zip(*outs):
        assert torch.equal(mw, ms)


def test_a_page_freed_in_between_voids_the_plan_and_the_rest_is_sealed_later():
    sc, pages, sinks = _filled(7)
    sealer = sc.mosaic.sealer
    sealer.seal_async = True
    reserved = sc.pool.arena_ledger.reserved
    assert sealer.start_seal(pages, sinks)
    gone = pages[-1]
    sc.pool.free_pages(torch.tensor([gone]))
    assert sealer.finish_seal() is False
    assert (sealer.pending_voided, sealer.pages_sealed, sealer.async_seals) == (1, 0, 0)
    assert sc.pool.arena_ledger.reserved == reserved and not sc.pool.store.is_sealed(torch.from_numpy(pages)).any()
    # the next plan finds the live pages again (they are due), plans them, and the one after packs them
    none = np.zeros(0, dtype=np.int64)
    sealer._seal_due(none, np.zeros(0, dtype=bool), none)
    assert sealer._pending is not None and np.array_equal(np.sort(sealer._pending.pages), np.sort(pages[:-1]))
    sealer._seal_due(none, np.zeros(0, dtype=bool), none)
    assert sealer.pages_sealed == pages.size - 1 and sealer.async_seals == 1
    assert sc.pool.store.is_sealed(torch.from_numpy(pages[:-1])).all()


def _first_half_pending(seed: int, plans: int) -> tuple:
    """:func:`_filled` with its pages cut in two, the first half planned, packed ``plans`` plans later, batches of one
    page: ``(scenario, sealer, first, later, the later pages' sinks)``."""
    sc, pages, sinks = _filled(seed)
    assert pages.size >= 4
    first, later = pages[: pages.size // 2], pages[pages.size // 2:]
    sealer = sc.mosaic.sealer
    sealer.seal_async, sealer.seal_async_plans, sealer.min_seal_pages = True, plans, 1
    assert sealer.start_seal(first, sinks[: first.size])
    return sc, sealer, first, later, sinks[first.size:]


def test_a_voided_plan_keeps_the_pages_deferred_while_it_was_pending():
    sc, sealer, first, later, later_sinks = _first_half_pending(7, plans=3)
    sealer._policy_seal(later, later_sinks)  # due while a seal is pending: deferred
    sc.pool.free_pages(torch.tensor([int(first[0])]))
    assert sealer.finish_seal() is False and sealer.pending_voided == 1
    assert set(sealer._deferred[0].tolist()) == set(first[1:].tolist()) | set(later.tolist())
    _no_plan(sealer)  # all of them are due again: planned now, packed plans later
    assert set(sealer._pending.pages.tolist()) == set(first[1:].tolist()) | set(later.tolist())


def _filled_with_full_arenas(seed: int):
    """:func:`_filled`, then the arena ledger filled: no seal has room."""
    sc, pages, sinks = _filled(seed)
    ledger = sc.pool.arena_ledger
    ledger.reserve(np.array([0], dtype=np.int64), np.array([ledger.room], dtype=np.int64))
    return sc, pages, sinks


def test_no_room_leaves_the_pages_dense_with_nothing_pending():
    sc, pages, sinks = _filled_with_full_arenas(2)
    sealer = sc.mosaic.sealer
    assert sealer.start_seal(pages, sinks) is False
    assert sealer._pending is None and sealer.pages_left_dense == pages.size


def test_pages_tried_again_with_the_arenas_full_count_once_until_freed():
    sc, pages, sinks = _filled_with_full_arenas(3)
    sealer = sc.mosaic.sealer
    assert sealer.seal(pages, sinks) is False
    assert sealer.seal(pages, sinks) is False and sealer.seal(pages[:2], sinks[:2]) is False
    assert (sealer.pages_left_dense, sealer.seal_calls) == (pages.size, 3)
    # freeing a page moves its epoch: the next time it is due (written again), it counts anew
    sc.pool.free_pages(torch.tensor([int(pages[0])]))
    assert sealer.seal(pages, sinks) is False
    assert sealer.pages_left_dense == pages.size + 1


def test_the_environment_turns_it_on(monkeypatch):
    monkeypatch.setenv("MOSAICKV_SEAL_ASYNC", "1")
    assert pending_seal.seal_async_enabled()
    sc = Scenario(config(ratio=3.0), group=2, seed=1)
    assert sc.mosaic.sealer.seal_async and sc.mosaic.sealer.seal_async_plans == 1
    monkeypatch.setenv("MOSAICKV_SEAL_ASYNC", " 4 ")
    assert pending_seal.seal_async_plans() == 4
    sc = Scenario(config(ratio=3.0), group=2, seed=1)
    assert sc.mosaic.sealer.seal_async and sc.mosaic.sealer.seal_async_plans == 4
    for off in ("0", ""):
        monkeypatch.setenv("MOSAICKV_SEAL_ASYNC", off)
        assert not pending_seal.seal_async_enabled() and pending_seal.seal_async_plans() == 0


@pytest.mark.parametrize("raw", ["yes", "-1", "1.5"])
def test_a_bad_plan_count_is_refused_by_name(monkeypatch, raw):
    monkeypatch.setenv("MOSAICKV_SEAL_ASYNC", raw)
    with pytest.raises(ValueError, match=r"MOSAICKV_SEAL_ASYNC: expected a whole number of plans >= 0 \(0: off\), got"):
        pending_seal.seal_async_plans()
    with pytest.raises(ValueError, match="MOSAICKV_SEAL_ASYNC"):
        Scenario(config(ratio=3.0), group=2, seed=1)


def _no_plan(sealer) -> None:
    """One plan that writes no new page and finds no page due."""
    none = np.zeros(0, dtype=np.int64)
    sealer._seal_due(none, np.zeros(0, dtype=bool), none)


def test_a_pending_seal_waits_n_plans_then_packs_what_a_whole_seal_packs():
    whole, pages, sinks = _filled(5)
    split, _, _ = _filled(5)
    assert whole.mosaic.sealer.seal(pages, sinks)
    sealer = split.mosaic.sealer
    sealer.seal_async, sealer.seal_async_plans = True, 3
    assert sealer.start_seal(pages, sinks)
    for _ in range(2):
        _no_plan(sealer)
        assert sealer._pending is not None and sealer.pages_sealed == 0
        assert not split.pool.store.is_sealed(torch.from_numpy(pages)).any()
    _no_plan(sealer)
    assert sealer._pending is None and (sealer.async_seals, sealer.pages_sealed) == (1, pages.size)
    for a, b in zip(_store_state(whole), _store_state(split)):
        assert torch.equal(a, b)


def test_hot_pool_pressure_packs_a_pending_seal_at_once():
    sc, pages, sinks = _filled(6)
    sealer = sc.mosaic.sealer
    sealer.seal_async, sealer.seal_async_plans = True, 5
    assert sealer.start_seal(pages, sinks)
    _no_plan(sealer)
    assert sealer._pending is not None
    free = sc.pool.num_free_physical_pages
    sealer.reserve_pages = free + 1  # this plan needs more hot pages than are free without the pending seal's
    _no_plan(sealer)
    assert sealer._pending is None and sealer.pages_sealed == pages.size
    assert sc.pool.num_free_physical_pages > free


def test_pages_due_while_a_seal_is_pending_wait_and_are_sealed_after_it():
    sc, sealer, first, later, later_sinks = _first_half_pending(8, plans=2)
    pages = np.concatenate([first, later])
    none = np.zeros(0, dtype=np.int64)
    sealer._seal_due(later, later_sinks, none)  # the pending seal waits; so do the due pages
    assert np.array_equal(sealer._pending.pages, first) and sealer.pages_sealed == 0
    _no_plan(sealer)  # the pending seal packs; the deferred pages start their own
    assert sealer.pages_sealed == first.size and np.array_equal(np.sort(sealer._pending.pages), np.sort(later))
    _no_plan(sealer)
    _no_plan(sealer)
    assert sealer.pages_sealed == pages.size and sealer.async_seals == 2 and sealer.pending_voided == 0
    assert sc.pool.store.is_sealed(torch.from_numpy(pages)).all()


def _plan(sealer) -> None:
    """:func:`_no_plan`, ended as the backend ends a plan before the step's launch (:meth:`Sealer.end_plan`)."""
    _no_plan(sealer)
    sealer.end_plan()


def _beside(sc: Scenario, plans: int):
    """``sc``'s sealer sealing in two halves, packs ``plans`` plans later, beside the step, with no low-pool pack."""
    sealer = sc.mosaic.sealer
    sealer.seal_async, sealer.seal_async_plans, sealer.seal_beside_step = True, plans, True
    sealer.low_water_pages = 0
    return sealer


def test_after_a_launch_the_pack_the_next_plan_would_make_is_made_and_packs_what_a_whole_seal_packs():
    whole, pages, sinks = _filled(5)
    split, _, _ = _filled(5)
    assert whole.mosaic.sealer.seal(pages, sinks)
    sealer = _beside(split, 3)
    assert sealer.start_seal(pages, sinks)
    sealer.end_plan()
    assert sealer.after_launch() is False  # the launch of the plan that launched the planner: too soon
    _plan(sealer)
    assert sealer.after_launch() is False and sealer._pending is not None  # the next plan would not pack it
    _plan(sealer)
    with HostSyncCounter() as count:
        assert sealer.after_launch()  # the next plan, its third, would
    assert not _device_syncs(count) and count.puts == 0, dict(count.by_site)
    assert sealer._pending is None and sealer.side_seals == 1
    assert (sealer.async_seals, sealer.packs_after_launch, sealer.pages_sealed) == (1, 1, pages.size)
    for a, b in zip(_store_state(whole), _store_state(split)):
        assert torch.equal(a, b)
    _plan(sealer)
    assert sealer.after_launch() is False and sealer.packs_after_launch == 1  # nothing pending


def test_after_a_launch_a_low_hot_pool_packs_the_pending_seal_before_its_plan_count():
    sc, pages, sinks = _filled(6)
    sealer = _beside(sc, 8)
    assert sealer.start_seal(pages, sinks)
    sealer.end_plan()
    sealer.pack_water_pages = sc.pool.num_free_physical_pages + 1
    assert sealer.after_launch() is False  # low, but its planner was launched by the plan just ended
    sealer.pack_water_pages = 0
    _plan(sealer)
    assert sealer.after_launch() is False
    sealer.pack_water_pages = sc.pool.num_free_physical_pages + 1  # the next plan would find the pool low
    assert sealer.after_launch() and sealer.pages_sealed == pages.size and sealer.packs_after_launch == 1
    assert sealer.packs_sooner == 1


def _low_pool_pending(k: int):
    """A pending seal beside the step, planned by the plan just ended, packed after ``k`` plans for a low pool (below
    the pack-water mark from now on, with room for every plan): ``(scenario, sealer, pages)``."""
    sc, pages, sinks = _filled(6)
    sealer = _beside(sc, 8)
    sealer.pack_sooner_after = k
    assert sealer.start_seal(pages, sinks)
    sealer.end_plan()
    sealer.pack_water_pages = sc.pool.num_free_physical_pages + 1
    return sc, sealer, pages


def test_after_a_launch_a_low_hot_pool_packs_sooner_only_for_the_kth_plan():
    """MOSAICKV_PACK_SOONER_AFTER=3: the launches of the planning plan and of the next leave the pending seal to its
    planner; the next launch packs it, beside the step (the next plan would be its third)."""
    sc, sealer, pages = _low_pool_pending(3)
    for _ in range(2):
        assert sealer.after_launch() is False
        _plan(sealer)
        assert sealer._pending is not None and sealer.pages_sealed == 0
    assert sealer.after_launch() and sealer.packs_after_launch == 1
    assert sealer._pending is None and sealer.pages_sealed == pages.size and sealer.packs_sooner == 1


def test_in_a_plan_a_low_hot_pool_packs_sooner_only_from_the_kth_plan():
    """The same without the pack after a launch: the first two plans leave it, the third packs it."""
    sc, sealer, pages = _low_pool_pending(3)
    sealer.pack_after_launch = False
    for _ in range(2):
        _plan(sealer)
        assert sealer._pending is not None and sealer.pages_sealed == 0
    _plan(sealer)
    assert sealer._pending is None and sealer.pages_sealed == pages.size and sealer.packs_sooner == 1


def test_with_seal_slice_pages_a_low_hot_pool_packs_sooner_only_once_every_slice_is_planned():
    """MOSAICKV_SEAL_SLICE_PAGES on: a seal in 4 slices is packed sooner for a low pool from its 5th plan (the 4th
    one's launch plans its last slice), not from the MOSAICKV_PACK_SOONER_AFTER=1 that holds without it; with room
    short of the plan's needs, at once."""
    sc, sealer, pages = _low_pool_pending(1)
    sealer._pending.slices = [range(0, 1), range(1, 2)] * 2  # four slices: only their count matters here
    assert not sealer._pending_waits(0, plans_waited=1)
    sealer.slice_pages = 4
    assert [sealer._pending_waits(0, plans_waited=k) for k in (1, 4, 5)] == [True, True, False]
    assert not sealer._pending_waits(sc.pool.num_free_physical_pages + 1, plans_waited=1)


class _Copy:
    """A stand-in for the sizes copy's CUDA event: landed, or still running (its planner on the device) until a
    synchronize of ``seconds``."""

    def __init__(self, landed: bool, seconds: float = 0.0) -> None:
        self.landed, self.seconds = landed, seconds

    def query(self) -> bool:
        return self.landed

    def synchronize(self) -> None:
        time.sleep(self.seconds)
        self.landed = True


@pytest.mark.parametrize("landed", [True, False])
def test_a_pack_that_waits_for_its_planner_is_counted_and_logged(caplog, landed):
    """A pack whose sizes copy had not landed (its planner still running) counts in packs_waited with the host's
    wait, and the status line says so; one that had landed counts nothing."""
    sc, pages, sinks = _filled(6)
    sealer = sc.mosaic.sealer
    sealer.seal_async, sealer.seal_async_plans = True, 1
    assert sealer.start_seal(pages, sinks)
    sealer._pending.ready = [_Copy(landed, 0.03)]
    assert sealer.finish_seal()
    waited = 0 if landed else 1
    assert sealer.packs_waited == waited and (sealer.pack_wait_seconds >= 0.03) == (not landed)
    with caplog.at_level(logging.INFO, logger="mosaickv_sglang.sealer"):
        sealer.maybe_log_status(now=1e12)
    assert re.search(rf"; {waited} waited \d+ ms for their planner\)", caplog.text), caplog.text


def test_a_plan_short_of_room_packs_at_once_whatever_the_kth_plan():
    """Sooner than K plans only when a plan lacks the room for its own new pages."""
    sc, pages, sinks = _filled(6)
    sealer = _beside(sc, 8)
    sealer.pack_sooner_after = 5
    assert sealer.start_seal(pages, sinks)
    sealer.end_plan()
    free = sc.pool.num_free_physical_pages
    sealer.reserve_pages = free + 1
    _plan(sealer)
    assert sealer._pending is None and sealer.pages_sealed == pages.size and sealer.packs_sooner == 1
    assert sc.pool.num_free_physical_pages > free


def test_the_kth_plan_comes_from_the_environment(monkeypatch):
    """``MOSAICKV_PACK_SOONER_AFTER`` when set; else the layer slices' count (1 without slices), so that a pack due
    sooner does not come before the last slice's launch."""
    monkeypatch.delenv("MOSAICKV_PACK_SOONER_AFTER", raising=False)
    monkeypatch.delenv("MOSAICKV_SEAL_LAYER_SLICES", raising=False)
    assert pending_seal.pack_sooner_after_plans() == 1
    assert Scenario(config(ratio=3.0), group=2, seed=1).mosaic.sealer.pack_sooner_after == 1
    monkeypatch.setenv("MOSAICKV_SEAL_LAYER_SLICES", "4")
    assert pending_seal.pack_sooner_after_plans() == 4
    monkeypatch.setenv("MOSAICKV_PACK_SOONER_AFTER", " 3 ")
    assert Scenario(config(ratio=3.0), group=2, seed=1).mosaic.sealer.pack_sooner_after == 3
    for raw in ("0", "two", "-2"):
        monkeypatch.setenv("MOSAICKV_PACK_SOONER_AFTER", raw)
        with pytest.raises(ValueError, match=r"MOSAICKV_PACK_SOONER_AFTER: expected an integer number of plans >= 1"):
            pending_seal.pack_sooner_after_plans()


@pytest.mark.parametrize("why", ["a granule freed since the plan", "not beside the step", "turned off"])
def test_after_a_launch_nothing_is_packed_unless_beside_the_step_with_nothing_freed(monkeypatch, why):
    if why == "turned off":
        monkeypatch.setenv("MOSAICKV_PACK_AFTER_LAUNCH", "0")
    sc, pages, sinks = _filled(9)
    assert pages.size >= 4
    first, later = pages[: pages.size // 2], pages[pages.size // 2:]
    sealer = _beside(sc, 2)
    assert sealer.seal(first, sinks[: first.size])
    assert sealer.start_seal(later, sinks[first.size:])
    sealer.end_plan()
    _plan(sealer)
    if why == "a granule freed since the plan":
        frees = sc.pool.store.granule_frees
        sc.pool.free_pages(torch.from_numpy(first[:1]))  # a sealed page: its granules go back to the arena
        assert sc.pool.store.granule_frees > frees
    elif why == "not beside the step":
        sealer.seal_beside_step = False
    assert sealer.after_launch() is False and sealer._pending is not None
    _no_plan(sealer)  # the next plan packs it, as without the hook
    assert sealer._pending is None and sealer.packs_after_launch == 0
    assert sc.pool.store.is_sealed(torch.from_numpy(later)).all()


def test_the_pack_after_a_launch_is_on_unless_turned_off(monkeypatch):
    monkeypatch.delenv("MOSAICKV_PACK_AFTER_LAUNCH", raising=False)
    assert pending_seal.pack_after_launch_enabled()
    assert Scenario(config(ratio=3.0), group=2, seed=1).mosaic.sealer.pack_after_launch
    monkeypatch.setenv("MOSAICKV_PACK_AFTER_LAUNCH", "0")
    assert not pending_seal.pack_after_launch_enabled()
    monkeypatch.setenv("MOSAICKV_PACK_AFTER_LAUNCH", "no")
    with pytest.raises(ValueError, match=r"MOSAICKV_PACK_AFTER_LAUNCH: expected 0 or 1, got 'no'"):
        Scenario(config(ratio=3.0), group=2, seed=1)


def test_the_hook_after_run_batch_calls_the_sealers_after_launch():
    from mosaickv_sglang.patches.scheduler import seal_after_launch
    from mosaickv_sglang.runtime import register_sealer

    sc, pages, sinks = _filled(5)  # its backend registered its sealer, as in a scheduler process
    sealer = _beside(sc, 2)
    assert sealer.start_seal(pages, sinks)
    sealer.end_plan()
    _plan(sealer)
    try:
        register_sealer(None)
        seal_after_launch(None, object(), sc.decode_batch())  # no mosaic backend here: nothing
        assert sealer._pending is not None
        register_sealer(sealer)
        seal_after_launch(None, object(), sc.decode_batch())
    finally:
        register_sealer(None)
    assert sealer.packs_after_launch == 1 and sealer.pages_sealed == pages.size


def _choosing_plan(sealer, pages: np.ndarray, sinks: np.ndarray) -> None:
    """A plan beside the step that finds ``pages`` due (and writes no new page), ended as the backend ends it."""
    sealer._seal_due(pages, sinks, np.zeros(0, dtype=np.int64))
    sealer.end_plan()


def _hooked(seed: int, plans: int) -> tuple:
    """:func:`_filled` sealing in two halves beside the step, ``plans`` plans later, batches of one page, after a first
    plan and its launch (so the sealer has seen the hook run): ``(scenario, sealer, pages, sinks)``."""
    sc, pages, sinks = _filled(seed)
    sealer = _beside(sc, plans)
    sealer.min_seal_pages = 1
    sealer.end_plan()
    assert sealer.after_launch() is False
    return sc, sealer, pages, sinks


def test_after_the_hook_ran_a_plan_only_chooses_the_pages_and_the_launch_plans_them_as_a_plan_would():
    whole, pages, sinks = _filled(5)
    split, sealer, _, _ = _hooked(5, plans=2)
    order = np.argsort(pages)  # a plan seals its due pages in page order
    assert whole.mosaic.sealer.seal(pages[order], sinks[order])
    planning = sealer.seal_plan_seconds
    _choosing_plan(sealer, pages, sinks)
    assert sealer._pending is None and sealer.seal_plan_seconds == planning  # chosen, not planned
    assert np.array_equal(sealer._to_start[0], np.sort(pages)) and sealer.side_seals == 0
    with HostSyncCounter() as count:
        assert sealer.after_launch()
    assert not _device_syncs(count) and count.puts == 0, dict(count.by_site)
    assert sealer._to_start is None and sealer.starts_after_launch == 1 and sealer.side_seals == 1
    assert np.array_equal(sealer._pending.pages, np.sort(pages)) and sealer._pending.plans_waited == 0
    assert sealer.seal_plan_seconds > planning and sealer.pages_sealed == 0
    assert sealer.after_launch() is False  # planned by the plan whose step was just launched: too soon to pack
    _plan(sealer)
    assert sealer.after_launch() and sealer.packs_after_launch == 1  # the next plan, its second, would pack it
    assert (sealer.async_seals, sealer.pages_sealed, sealer.pending_voided) == (1, pages.size, 0)
    for a, b in zip(_store_state(whole), _store_state(split)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("why", ["the hook never ran", "turned off", "a seal pending"])
def test_a_plan_plans_the_first_half_itself_without_the_hook_turned_off_or_with_a_seal_pending(monkeypatch, why):
    if why == "turned off":
        monkeypatch.setenv("MOSAICKV_PLAN_AFTER_LAUNCH", "0")
    sc, pages, sinks = _filled(8)
    first, later = pages[: pages.size // 2], pages[pages.size // 2:]
    sealer = _beside(sc, 3)
    sealer.min_seal_pages = 1
    sealer.end_plan()
    if why != "the hook never ran":
        assert sealer.after_launch() is False
    if why == "a seal pending":
        assert sealer.start_seal(first, sinks[: first.size])
        _choosing_plan(sealer, later, sinks[first.size:])
        assert sealer._to_start is None and np.array_equal(sealer._pending.pages, first)  # the pages wait (deferred)
        assert np.array_equal(np.sort(sealer._deferred[0]), np.sort(later))
        return
    _choosing_plan(sealer, pages, sinks)
    assert sealer._to_start is None and np.array_equal(sealer._pending.pages, np.sort(pages))
    assert sealer.starts_after_launch == 0 and sealer.side_seals == 1


def test_a_first_half_the_hook_did_not_plan_is_planned_at_the_next_plan_and_every_page_is_sealed():
    sc, sealer, pages, sinks = _hooked(10, plans=2)
    _choosing_plan(sealer, pages, sinks)
    assert sealer._to_start is not None
    _plan(sealer)  # no hook after that launch: this plan plans them first, then counts itself
    assert sealer._to_start is None and sealer._pending is not None and sealer._pending.plans_waited == 1
    assert sealer.starts_after_launch == 0
    _plan(sealer)
    assert sealer.pages_sealed == pages.size and sc.pool.store.is_sealed(torch.from_numpy(pages)).all()
    sc.pool.check_invariants()


def test_a_page_freed_between_the_plan_and_its_launch_is_left_out_of_the_first_half():
    sc, sealer, pages, sinks = _hooked(11, plans=2)
    _choosing_plan(sealer, pages, sinks)
    gone = np.sort(pages)[0]
    sc.pool.free_pages(torch.tensor([int(gone)]))
    assert sealer.after_launch()
    assert np.array_equal(sealer._pending.pages, np.sort(pages)[1:])
    _plan(sealer)
    _plan(sealer)
    assert sealer.pages_sealed == pages.size - 1 and sealer.pending_voided == 0
    sc.pool.check_invariants()


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["choose", "plan", "launch", "free"]), st.integers(0, 63)), max_size=20),
       st.integers(1, 3), st.integers(1, 2), st.integers(1, 2))  # fmt: skip
def test_random_plans_launches_and_frees_seal_every_live_chosen_page_and_no_freed_one(ops, plans, slices, packs):
    """Random plans that choose due pages, plans that choose none, launches (the hook after ``run_batch``) and frees
    of dense, pending or sealed pages, with both halves after the launch: the pool's invariants hold after every step,
    and once plans and launches run on with nothing new, every chosen page still held is sealed, none freed is, and
    nothing is left to plan or pack; planned in one layer slice or two (MOSAICKV_SEAL_LAYER_SLICES), packed in one or
    two (MOSAICKV_PACK_LAYER_SLICES)."""
    sc, sealer, pages, sinks = _hooked(12, plans)
    sealer.layer_slices, sealer.pack_layer_slices = slices, packs
    sink_of = dict(zip(pages.tolist(), sinks.tolist()))
    freed: set = set()
    chosen: set = set()
    for op, n in ops:
        held = [p for p in pages.tolist() if p not in freed]
        if op == "choose":
            dense = [p for p in held if not bool(sc.pool.store.is_sealed(torch.tensor([p]))[0])]
            pick = np.array(dense[n % 3:][: 1 + n % 4], dtype=np.int64) if dense else np.zeros(0, dtype=np.int64)
            chosen.update(pick.tolist())
            _choosing_plan(sealer, pick, np.array([sink_of[p] for p in pick.tolist()], dtype=bool))
        elif op == "plan":
            _plan(sealer)
        elif op == "launch":
            sealer.after_launch()
        elif op == "free" and held:
            gone = held[n % len(held)]
            sc.pool.free_pages(torch.tensor([gone]))
            freed.add(gone)
        sc.pool.check_invariants()
    for _ in range(2 * (plans + 2)):  # a pending seal, then the pages deferred while it was pending
        _plan(sealer)
        sealer.after_launch()
    sc.pool.check_invariants()
    assert sealer._to_start is None and sealer._pending is None
    kept = np.array(sorted(chosen - freed), dtype=np.int64)
    assert bool(sc.pool.store.is_sealed(torch.from_numpy(kept)).all()), kept
    gone = np.array(sorted(freed), dtype=np.int64)
    assert not bool(sc.pool.store.is_sealed(torch.from_numpy(gone)).any()), gone


def test_the_plan_after_a_launch_is_on_unless_turned_off(monkeypatch):
    monkeypatch.delenv("MOSAICKV_PLAN_AFTER_LAUNCH", raising=False)
    assert pending_seal.plan_after_launch_enabled()
    assert Scenario(config(ratio=3.0), group=2, seed=1).mosaic.sealer.plan_after_launch
    monkeypatch.setenv("MOSAICKV_PLAN_AFTER_LAUNCH", "0")
    assert not Scenario(config(ratio=3.0), group=2, seed=1).mosaic.sealer.plan_after_launch
    monkeypatch.setenv("MOSAICKV_PLAN_AFTER_LAUNCH", "2")
    with pytest.raises(ValueError, match=r"MOSAICKV_PLAN_AFTER_LAUNCH: expected 0 or 1, got '2'"):
        Scenario(config(ratio=3.0), group=2, seed=1)


@pytest.mark.parametrize("group, plans", [(4, 2)])
def test_served_with_the_pack_after_each_launch_seals_no_later_and_decode_matches_the_reference(group, plans):
    """Through the backend, beside the step, packs N plans later: with the sealer's after_launch after each step,
    pages are sealed no later than without it (and some earlier), and every step's outputs match the reference
    backend as closely (ratio 1: sealed pages are exact, so a wrong pack would show)."""
    runs = {}
    for hook in (False, True):
        sc = Scenario(config(ratio=1.0), group=group, seed=17, auto_seal=True)
        sealer = sc.mosaic.sealer
        sealer.seal_async, sealer.seal_async_plans, sealer.seal_beside_step = True, plans, True
        sealed, worst = sc.served([61, 38, 77], decode_steps=14, after_launch=hook)
        runs[hook] = (sealed, worst, sealer)
    (plain_sealed, plain_worst, plain), (hook_sealed, hook_worst, sealer) = runs[False], runs[True]
    assert plain.async_seals > 0 and plain.packs_after_launch == 0 and plain.starts_after_launch == 0
    assert sealer.packs_after_launch > 0 and sealer.starts_after_launch > 0 and sealer.pending_voided == 0
    assert all(h >= p for h, p in zip(hook_sealed, plain_sealed)), (hook_sealed, plain_sealed)
    assert hook_sealed != plain_sealed and hook_sealed[-1] == plain_sealed[-1]
    assert hook_worst <= max(2 * plain_worst, 2e-2), (hook_worst, plain_worst)


def test_served_with_packs_in_layer_slices_seals_the_same_pages_and_decode_matches_the_reference():
    """Through the backend with the hook after each step, planned and packed in two layer slices against in one:
    every page sealed in the end is sealed alike, pages are sealed in every layer at most a few steps later, and every
    step's outputs match the reference backend as closely (ratio 1: a page read half packed would show)."""
    runs = {}
    for slices in (1, 2):
        sc = Scenario(config(ratio=1.0), group=4, seed=17, auto_seal=True)
        sealer = sc.mosaic.sealer
        sealer.seal_async, sealer.seal_async_plans, sealer.seal_beside_step = True, 2, True
        sealer.layer_slices = sealer.pack_layer_slices = slices
        sealed, worst = sc.served([61, 38, 77], decode_steps=14, after_launch=True)
        sc.pool.check_invariants()
        runs[slices] = (sealed, worst, sealer, sc)
    (whole_sealed, whole_worst, _, whole), (sliced_sealed, sliced_worst, sealer, sc) = runs[1], runs[2]
    assert sealer.pack_slices_after_launch > 0 and sealer.packs_rolled_back == 0 and sealer.pending_voided == 0
    assert sliced_sealed[-1] == whole_sealed[-1] > 0, (sliced_sealed, whole_sealed)
    assert torch.equal(sc.pool.store.page_state(), whole.pool.store.page_state())
    assert sliced_worst <= max(2 * whole_worst, 2e-2), (sliced_worst, whole_worst)


@pytest.mark.parametrize("group, beside", [(1, False), (4, False), (4, True)])
def test_served_plans_seal_a_plan_later_and_decode_matches_the_reference(group, beside):
    """Through the backend (auto-seal, one page a batch; with or without sealing beside the step in flight): every
    seal is packed at the next plan, and each step's outputs match SGLang's torch_native backend as closely as
    without it (ratio 1: sealed pages are exact, so a wrong pack would show)."""
    runs = {}
    for mode in (False, True):
        sc = Scenario(config(ratio=1.0), group=group, seed=11, auto_seal=True)
        sc.mosaic.sealer.seal_async = mode
        sc.mosaic.sealer.seal_beside_step = beside
        sealed, worst = sc.served([40, 23, 57], decode_steps=24)
        runs[mode] = (sealed, worst, sc.mosaic.sealer)
    (sync_sealed, sync_worst, _), (async_sealed, async_worst, sealer) = runs[False], runs[True]
    assert sync_sealed[-1] > 0 and sealer.async_seals > 0 and sealer.pending_voided == 0
    assert sealer.side_seals > 0 if beside else sealer.side_seals == 0
    assert async_sealed[1:] == sync_sealed[:-1]
    assert async_worst <= max(2 * sync_worst, 2e-2), (async_worst, sync_worst)


@pytest.mark.parametrize("group, beside", [(8, True)])
def test_served_plans_seal_n_plans_later_never_sooner_and_decode_matches_the_reference(group, beside):
    """As above with N = 3: pages are sealed, never sooner than without two halves, and every step's outputs match
    the reference backend as closely."""
    runs = {}
    for plans in (0, 3):
        sc = Scenario(config(ratio=1.0), group=group, seed=13, auto_seal=True)
        sealer = sc.mosaic.sealer
        sealer.seal_async, sealer.seal_async_plans, sealer.seal_beside_step = plans > 0, plans, beside
        sealed, worst = sc.served([61, 38, 77], decode_steps=30)
        runs[plans] = (sealed, worst, sealer)
    (sync_sealed, sync_worst, _), (async_sealed, async_worst, sealer) = runs[0], runs[3]
    assert sync_sealed[-1] > 0 and sealer.async_seals > 0 and async_sealed[-1] > 0
    assert all(a <= s for a, s in zip(async_sealed, sync_sealed)), (async_sealed, sync_sealed)
    assert async_sealed != sync_sealed
    assert async_worst <= max(2 * sync_worst, 2e-2), (async_worst, sync_worst)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["plain", "graphs"])
def test_beside_the_step_the_forward_stream_does_not_wait_for_a_pending_seals_planner(monkeypatch, mode):
    """On a GPU, with sealing beside the step and N = 3: a seal's planner (slowed here by a kernel of about half a
    second on its stream) runs beside the following steps, which the forward stream launches and finishes before it
    ends; its pack, plans later, waits for it. Every step's outputs and the pool's final state equal those of the same
    steps with an unslowed planner. ``graphs``: both sides plan through seal graphs (``MOSAICKV_SEAL_GRAPH_PAGES``),
    replayed on their own stream once the query window is full."""
    import test_cuda_graph_decode as graph_cases
    from mkv_backend_cases import layer
    from test_kv_pool import D, DT, H_KV, LAYERS

    monkeypatch.setenv("MOSAICKV_WARMUP", "0")
    group = 4
    sides = [graph_cases._CudaSide(config(ratio=3.0), group, monkeypatch) for _ in range(2)]
    for side in sides:
        side.mosaic.auto_seal = True
        sealer = side.mosaic.sealer
        sealer.seal_beside_step, sealer.seal_async, sealer.seal_async_plans, sealer.min_seal_pages = True, True, 3, 1
        if mode == "graphs":
            sealer.use_seal_graphs((1, 2, 4, 8, 16, 32))
    slow, twin = sides
    plan = slow.mosaic.sealer.plan_layers
    slowed, slept = [], []

    def slow_plan(*args, **kwargs):
        torch.cuda._sleep(1_000_000_000)  # on the planner's stream: the side stream
        after_sleep = torch.cuda.Event()
        after_sleep.record()
        slept.append(after_sleep)
        slowed.append(torch.cuda.current_stream())  # last: the test waits for it
        return plan(*args, **kwargs)

    monkeypatch.setattr(slow.mosaic.sealer, "plan_layers", slow_plan)
    h_q, h_kv, d = H_KV * group, H_KV, D
    gen = torch.Generator(device="cuda").manual_seed(23)
    forward = torch.cuda.Stream()
    # a server's caches are warm: pinned blocks of each size class and device blocks for the forward stream (a
    # cudaHostAlloc or cudaMalloc while the side stream sleeps can wait for it)
    warm = [torch.empty(1 << p, dtype=torch.uint8, pin_memory=True) for p in range(9, 23) for _ in range(16)]
    with torch.cuda.stream(forward):
        warm += [torch.empty(1 << 26, dtype=torch.uint8, device="cuda")]
        warm += [torch.empty(1 << p, dtype=torch.uint8, device="cuda") for p in range(9, 20) for _ in range(64)]
    del warm
    beside = 0
    for step, ext in enumerate([[37, 40, 25], [40, 21, 40]] + [None] * 8):
        batches = [graph_cases._to_cuda(s.extend_batch(ext) if ext else Scenario.decode_batch(s)) for s in sides]
        decode = batches[0].forward_mode.is_decode()
        n = batches[0].out_cache_loc.numel()
        ins = [tuple(torch.randn(*shape, generator=gen, device="cuda").to(DT)
                     for shape in ((n, h_q * d), (n, h_kv, d), (n, h_kv, d))) for _ in range(LAYERS)]  # fmt: skip
        # the twin first: a kernel's first launch loads its module, which (lazy loading) can wait for kernels in flight
        twin.mosaic.init_forward_metadata(batches[1])
        fm = twin.mosaic.forward_decode if decode else twin.mosaic.forward_extend
        want = [fm(q, k, v, layer(li, group), batches[1]) for li, (q, k, v) in enumerate(ins)]
        torch.cuda.synchronize()
        started = len(slowed)
        with torch.cuda.stream(forward):
            slow.mosaic.init_forward_metadata(batches[0])
            fm = slow.mosaic.forward_decode if decode else slow.mosaic.forward_extend
            got = [fm(q, k, v, layer(li, group), batches[0]) for li, (q, k, v) in enumerate(ins)]
        pending = slow.mosaic.sealer._pending
        if len(slowed) > started and pending is not None and pending.plans_waited == 0:
            done = torch.cuda.Event()
            done.record(forward)
            done.synchronize()
            assert slowed[-1] != forward, f"step {step}: the seal was planned on the forward stream"
            assert not slept[-1].query(), f"step {step}: the step waited for the planner"
            beside += 1
        torch.cuda.synchronize()
        for li in range(LAYERS):
            assert torch.equal(got[li], want[li]), (step, li)
    assert beside >= 1, "no seal was planned beside a step"
    for side in sides:
        assert side.mosaic.sealer.pressure_pages_sealed == 0
        assert side.mosaic.sealer.async_seals >= 1 and side.mosaic.sealer.pending_voided == 0
    assert slow.mosaic.sealer.pages_sealed == twin.mosaic.sealer.pages_sealed
    if mode == "graphs":
        for side in sides:
            graphs = side.mosaic.sealer.seal_graphs
            assert graphs.failed is None and graphs.replays >= 1, graphs.status()
    assert torch.equal(slow.pool.store.page_state(), twin.pool.store.page_state())
    slow.pool.check_invariants()


def _cuda_half_sealed(monkeypatch, seed: int) -> tuple:
    """On CUDA: three requests' prefills through the mosaic backend, then the first half of their due pages sealed
    (which loads the kernels): ``(side, pages, sinks)``, the second half of ``pages`` still dense."""
    import test_cuda_graph_decode as graph_cases
    from mkv_backend_cases import layer
    from test_kv_pool import D, DT, H_KV, LAYERS

    monkeypatch.setenv("MOSAICKV_WARMUP", "0")
    group = 2
    side = graph_cases._CudaSide(config(ratio=3.0), group, monkeypatch)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    batch = graph_cases._to_cuda(side.extend_batch([70, 53, 90]))
    n = batch.out_cache_loc.numel()
    side.mosaic.init_forward_metadata(batch)
    for li in range(LAYERS):
        q, k, v = (torch.randn(*shape, generator=gen, device="cuda").to(DT)
                   for shape in ((n, H_KV * group * D), (n, H_KV, D), (n, H_KV, D)))  # fmt: skip
        side.mosaic.forward_extend(q, k, v, layer(li, group), batch)
    due = [side.pool.pages_to_seal(side.slots(b)) for b in range(len(side.lens))]
    pages = torch.cat([sp.pages for sp in due]).numpy().astype(np.int64)
    sinks = torch.cat([sp.always_dense for sp in due]).numpy()
    assert pages.size >= 4
    half = pages.size // 2
    assert side.mosaic.sealer.seal(pages[:half], sinks[:half])
    return side, pages, sinks


def _warm_caches() -> None:
    """A server's caches are warm: pinned and device blocks of each size class (a cudaHostAlloc or cudaMalloc while
    a step runs can wait for it); then nothing queued."""
    warm = [torch.empty(1 << p, dtype=torch.uint8, pin_memory=True) for p in range(9, 23) for _ in range(16)]
    warm += [torch.empty(1 << p, dtype=torch.uint8, device="cuda") for p in range(9, 20) for _ in range(64)]
    del warm
    torch.cuda.synchronize()


def _returns_before(in_flight: "torch.cuda.Event", call, what: str) -> None:
    """``call()`` returns true with no synchronisation (sync debug mode raises on one), before the step in flight
    (recorded by ``in_flight``) ends."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        assert call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not in_flight.query(), f"{what} waited for the step in flight"


def _noted_waits(monkeypatch) -> list:
    """From now on, every ``(stream, other)`` of a ``torch.cuda.Stream.wait_stream`` call, in order."""
    waits = []
    wait_stream = torch.cuda.Stream.wait_stream

    def noted_wait(stream, other):
        waits.append((stream, other))
        return wait_stream(stream, other)

    monkeypatch.setattr(torch.cuda.Stream, "wait_stream", noted_wait)
    return waits


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_a_pending_seals_pack_does_not_wait_for_the_step_in_flight(monkeypatch):
    """On a GPU, the second half of a seal (the arena allocation, the pack, the release of the dense pages) queues its
    work behind a step in flight (a kernel of about half a second here) without waiting for it, and makes no
    synchronisation (``torch.cuda.set_sync_debug_mode("error")`` raises on one). The pages end sealed as with the CPU's
    pack. Before, the release's ``page_table[idx] = -1`` copied -1 to the device and waited for the stream."""
    side, pages, sinks = _cuda_half_sealed(monkeypatch, seed=31)
    half, sealer = pages.size // 2, side.mosaic.sealer
    assert sealer.start_seal(pages[half:], sinks[half:])
    sealer._pending.host_sizes()  # the sizes have landed (a later plan's case)
    _warm_caches()
    torch.cuda._sleep(1_000_000_000)  # the step in flight
    in_flight = torch.cuda.Event()
    in_flight.record()
    _returns_before(in_flight, sealer.finish_seal, "the pack")
    torch.cuda.synchronize()
    assert side.pool.store.is_sealed(torch.from_numpy(pages)).all()
    assert (side.pool.page_table.cpu()[torch.from_numpy(pages)] == -1).all()
    side.pool.check_invariants()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_pack_after_a_launch_runs_beside_the_step_and_the_forward_stream_waits_for_it(monkeypatch):
    """On a GPU, :meth:`Sealer.after_launch` called on the scheduler's stream (as the hook after
    ``Scheduler.run_batch`` is) packs on the side stream without waiting for the step just launched on the forward
    stream (a kernel of about half a second here), with no synchronisation, and makes the forward stream (the last
    plan's stream), not the scheduler's, wait for the pack."""
    side, pages, sinks = _cuda_half_sealed(monkeypatch, seed=37)
    half, sealer = pages.size // 2, side.mosaic.sealer
    sealer.seal_beside_step, sealer.seal_async, sealer.seal_async_plans = True, True, 2
    sealer.low_water_pages = 0
    forward = torch.cuda.Stream()
    with torch.cuda.stream(forward):
        assert sealer.start_seal(pages[half:], sinks[half:])
        sealer.end_plan()
    sealer._pending.host_sizes()  # the sizes have landed (a later plan's case)
    sealer._pending.plans_waited = 1  # one plan since: the next would pack it
    _warm_caches()
    with torch.cuda.stream(forward):
        sealer.end_plan()  # the plan of the step about to launch
        torch.cuda._sleep(1_000_000_000)  # the step launched
        in_flight = torch.cuda.Event()
        in_flight.record()
    waits = _noted_waits(monkeypatch)
    _returns_before(in_flight, sealer.after_launch, "the pack after the launch")
    assert torch.cuda.current_stream() != forward  # the hook's stream was put back
    assert (forward, sealer._side_stream) in waits, waits
    assert not any(s == torch.cuda.current_stream() for s, _ in waits), waits
    torch.cuda.synchronize()
    assert sealer.packs_after_launch == 1 and side.pool.store.is_sealed(torch.from_numpy(pages)).all()
    side.pool.check_invariants()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_first_half_planned_after_a_launch_runs_beside_the_step_and_nothing_waits_for_it(monkeypatch):
    """On a GPU, the first half of a seal that a plan left to :meth:`Sealer.after_launch` (called on the scheduler's
    stream, as the hook after ``Scheduler.run_batch`` is) is planned on the side stream without waiting for the step
    just launched on the forward stream (a kernel of about half a second here), with no synchronisation, and no
    stream is made to wait for the planner (only its pack, plans later, waits for it). The pack then seals the
    pages."""
    side, pages, sinks = _cuda_half_sealed(monkeypatch, seed=41)
    half, sealer = pages.size // 2, side.mosaic.sealer
    sealer.seal_beside_step, sealer.seal_async, sealer.seal_async_plans = True, True, 2
    sealer.low_water_pages, sealer.min_seal_pages = 0, 1
    forward = torch.cuda.Stream()
    with torch.cuda.stream(forward):
        sealer.end_plan()
    assert sealer.after_launch() is False  # the hook runs
    _warm_caches()
    with torch.cuda.stream(forward):
        _choosing_plan(sealer, pages[half:], sinks[half:])  # the plan of the step about to launch
        torch.cuda._sleep(1_000_000_000)  # the step launched
        in_flight = torch.cuda.Event()
        in_flight.record()
    assert sealer._to_start is not None and sealer._pending is None
    waits = _noted_waits(monkeypatch)
    _returns_before(in_flight, sealer.after_launch, "the planner after the launch")
    assert sealer.starts_after_launch == 1 and sealer._pending is not None
    assert not any(other == sealer._side_stream for _, other in waits), waits
    assert torch.cuda.current_stream() != forward  # the hook's stream was put back
    torch.cuda.synchronize()
    with torch.cuda.stream(forward):
        _plan(sealer)
        _plan(sealer)  # its second plan packs it
    torch.cuda.synchronize()
    assert sealer.pages_sealed >= pages.size - half and side.pool.store.is_sealed(torch.from_numpy(pages)).all()
    side.pool.check_invariants()


@pytest.mark.parametrize("env, read", [(pending_seal.SEAL_LAYER_SLICES_ENV, pending_seal.seal_layer_slices),
                                       (pending_seal.PACK_LAYER_SLICES_ENV, pending_seal.pack_layer_slices)])
def test_layer_slices_come_from_the_environment_and_cut_the_layers_evenly(monkeypatch, env, read):
    monkeypatch.delenv(env, raising=False)
    assert read() == 1
    monkeypatch.setenv(env, "4")
    assert read() == 4
    monkeypatch.setenv(env, "0")
    with pytest.raises(ValueError, match=env):
        read()
    assert pending_seal.layer_slices(32, 4) == [range(0, 8), range(8, 16), range(16, 24), range(24, 32)]
    assert pending_seal.layer_slices(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    assert pending_seal.layer_slices(2, 5) == [range(0, 1), range(1, 2)]
    assert pending_seal.layer_slices(3, 1) == [range(0, 3)]


@pytest.mark.parametrize("env,read", [(pending_seal.SEAL_SLICE_PAGES_ENV, pending_seal.seal_slice_pages),
                                      (pending_seal.SEAL_MAX_PAGES_ENV, pending_seal.seal_max_pages)])
def test_page_counts_come_from_the_environment(monkeypatch, env, read):
    monkeypatch.delenv(env, raising=False)
    assert read() == 0
    monkeypatch.setenv(env, " 16 ")
    assert read() == 16
    for raw in ("-1", "x", "1.5"):
        monkeypatch.setenv(env, raw)
        with pytest.raises(ValueError, match=f"{env}: expected a whole number of pages"):
            read()


def test_seal_slice_pages_scales_the_slices_with_the_pages():
    scaled = pending_seal.page_scaled_slices
    assert [scaled(8, p, 16) for p in (0, 1, 16, 17, 32, 64, 128)] == [8, 8, 8, 16, 16, 32, 64]
    assert scaled(8, 128, 0) == 8 and scaled(1, 128, 16) == 1  # off, or no slices to scale
    with pytest.raises(ValueError, match="page_scaled_slices: expected slices >= 1"):
        scaled(0, 16, 16)


def _sliced(seed: int, plans: int, slices: int) -> tuple:
    """:func:`_hooked` with the first half planned in ``slices`` layer slices, and a whole seal of the same pages in a
    scenario of its own: ``(scenario, sealer, pages, sinks, whole scenario)``."""
    whole, pages, sinks = _filled(seed)
    order = np.argsort(pages)  # a plan seals its due pages in page order
    assert whole.mosaic.sealer.seal(pages[order], sinks[order])
    sc, sealer, pages, sinks = _hooked(seed, plans)
    sealer.layer_slices = slices
    return sc, sealer, pages, sinks, whole


def test_in_layer_slices_each_launch_plans_the_next_and_the_pack_packs_what_a_whole_seal_packs():
    sc, sealer, pages, sinks, whole = _sliced(5, plans=3, slices=2)
    _choosing_plan(sealer, pages, sinks)
    assert sealer.after_launch() and sealer.starts_after_launch == 1
    pending = sealer._pending
    assert pending.slices == [range(0, 1), range(1, 2)] and len(pending.plans) == 1
    assert pending.next_slice == range(1, 2)
    w = sealer.window  # queries the step in flight asks: the second slice plans from the window the first read
    gen = torch.Generator().manual_seed(3)
    for li in range(len(w._count)):
        w.observe(li, 4 * torch.randn(5, w.num_kv_heads * w.group_size * w.head_dim, generator=gen))
    _plan(sealer)
    with HostSyncCounter() as count:
        assert sealer.after_launch()  # the second slice, beside the step just launched
    assert not _device_syncs(count) and count.puts == 0, dict(count.by_site)
    assert sealer.slices_after_launch == 1 and pending.next_slice is None and len(pending.plans) == 2
    assert sealer.pages_sealed == 0 and sealer.side_seals == 2
    _plan(sealer)
    assert sealer.after_launch() and sealer.packs_after_launch == 1  # the next plan, its third, would pack it
    assert (sealer.async_seals, sealer.pages_sealed, sealer.slices_caught_up) == (1, pages.size, 0)
    for a, b in zip(_store_state(whole), _store_state(sc)):
        assert torch.equal(a, b)
    _plan(sealer)
    assert sealer.after_launch() is False and sealer.slices_after_launch == 1  # nothing left to plan or pack


@pytest.mark.parametrize("plans", [1, 2, 5])
def test_a_pack_due_for_its_plan_count_waits_a_launch_after_the_last_slice(caplog, plans):
    """``MOSAICKV_SEAL_ASYNC=N`` with ``S`` slices: the pack comes after max(N, S + 1) plans, so each of the ``S - 1``
    launches after the first plans its slice and the pack, a launch after the last, plans none itself."""
    sc, sealer, pages, sinks, whole = _sliced(5, plans=plans, slices=2)
    _choosing_plan(sealer, pages, sinks)
    assert sealer.after_launch() and sealer.starts_after_launch == 1
    slices = len(sealer._pending.slices)
    assert slices == 2
    due = max(plans, slices + 1)
    for k in range(1, due - 1):
        _plan(sealer)
        assert sealer.after_launch() == (k < slices), k  # the launch plans its slice, or nothing
        assert sealer._pending is not None and sealer.pages_sealed == 0, k
    assert sealer.slices_after_launch == len(sealer._pending.slices) - 1 and sealer._pending.next_slice is None
    _plan(sealer)
    assert sealer._pending is not None  # the pack the next plan would make: after this plan's launch
    assert sealer.after_launch() and sealer.packs_after_launch == 1
    assert sealer._pending is None and sealer.pages_sealed == pages.size
    assert (sealer.slices_caught_up, sealer.packs_sooner, sealer.packs_waited) == (0, 0, 0)
    for a, b in zip(_store_state(whole), _store_state(sc)):
        assert torch.equal(a, b)
    with caplog.at_level(logging.INFO, logger="mosaickv_sglang.sealer"):
        sealer.maybe_log_status(now=1e12)
    assert f"(1 packed {due} plans later or sooner, " in caplog.text, caplog.text


def test_a_pack_due_before_the_last_slice_plans_the_rest_itself_and_packs_the_same():
    sc, sealer, pages, sinks, whole = _sliced(5, plans=1, slices=2)
    _choosing_plan(sealer, pages, sinks)
    assert sealer.after_launch() and sealer._pending.next_slice == range(1, 2)
    sealer.reserve_pages = sc.pool.num_free_physical_pages + 1  # the next plan lacks room without the seal's pages
    _plan(sealer)  # so it packs it at once, before a launch planned the second slice
    assert sealer._pending is None and sealer.slices_caught_up == 1 and sealer.slices_after_launch == 0
    assert sealer.packs_sooner == 1
    assert sealer.pages_sealed == pages.size
    for a, b in zip(_store_state(whole), _store_state(sc)):
        assert torch.equal(a, b)


def test_a_page_freed_between_slices_leaves_the_rest_unplanned_and_the_pack_voids_the_seal():
    sc, sealer, pages, sinks, _ = _sliced(11, plans=3, slices=2)
    _choosing_plan(sealer, pages, sinks)
    assert sealer.after_launch()
    gone = int(np.sort(pages)[0])
    sc.pool.free_pages(torch.tensor([gone]))
    _plan(sealer)
    assert sealer.after_launch() is False and sealer._pending.next_slice == range(1, 2)  # nothing planned for it
    assert sealer.slices_after_launch == 0
    _plan(sealer)
    assert sealer.after_launch()  # the pack its third plan would make: voided, the live pages due again
    assert sealer.pending_voided == 1 and sealer.slices_caught_up == 0 and sealer.pages_sealed == 0
    for _ in range(6):
        _plan(sealer)
        sealer.after_launch()
    assert sealer.pages_sealed == pages.size - 1 and sealer._pending is None
    assert sc.pool.store.is_sealed(torch.from_numpy(np.sort(pages)[1:])).all()
    sc.pool.check_invariants()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("packs", [1, 2])
def test_on_cuda_layer_slices_planned_after_launches_seal_and_decode_as_one_call(monkeypatch, packs):
    """On a GPU, through seal graphs, beside the step, with the hook after each launch: a side whose first halves are
    planned in two layer slices (one a launch, on the side stream), and packed in ``packs``, decodes every step bit for
    bit as the same side run one launch at a time (a synchronize before and after each hook: no stream overlap), and
    as a side planning and packing every layer at once in every step where both read the same seal states of seals
    planned at the same launches. With ``packs`` > 1 they do not always: a pack in layer slices seals its pages a
    launch later (dense in the attention's view until its last slice), and the next seal starts a launch later too,
    planned from later queries; with one pack they always do, and end with the same pool."""
    import test_cuda_graph_decode as graph_cases
    from mkv_backend_cases import layer
    from test_kv_pool import D, DT, H_KV, LAYERS

    monkeypatch.setenv("MOSAICKV_WARMUP", "0")
    group = 4
    sides = [graph_cases._CudaSide(config(ratio=3.0), group, monkeypatch) for _ in range(3)]
    for slices, side in zip((2, 2, 1), sides):  # beside the step, one launch at a time, every layer at once
        side.mosaic.auto_seal = True
        sealer = side.mosaic.sealer
        sealer.seal_beside_step, sealer.seal_async, sealer.seal_async_plans, sealer.min_seal_pages = True, True, 3, 1
        sealer.layer_slices, sealer.pack_layer_slices = slices, packs if slices > 1 else 1
        sealer.use_seal_graphs((1, 2, 4, 8, 16, 32))
    gen = torch.Generator(device="cuda").manual_seed(29)
    forward = torch.cuda.Stream()
    sliced, serial, whole = sealers = [side.mosaic.sealer for side in sides]
    at, starts = [0], ([], [], [])  # the steps each side started a seal at (planned from that step's queries)
    for sealer, started in zip(sealers, starts):
        sealer.start_seal = lambda *a, real=sealer.start_seal, started=started: started.append(at[0]) or real(*a)
    other_states, checked_after_pack = [], 0
    for step, ext in enumerate([[37, 40, 25], [40, 21, 40]] + [None] * 10):
        at[0] = step
        batches = [graph_cases._to_cuda(s.extend_batch(ext) if ext else Scenario.decode_batch(s)) for s in sides]
        decode = batches[0].forward_mode.is_decode()
        n = batches[0].out_cache_loc.numel()
        ins = [tuple(torch.randn(*shape, generator=gen, device="cuda").to(DT)
                     for shape in ((n, H_KV * group * D), (n, H_KV, D), (n, H_KV, D))) for _ in range(LAYERS)]  # fmt: skip
        outs, states, packed = [], [], sliced.pack_slices_after_launch  # last slices packed before this step
        done = [sealer.async_seals for sealer in sealers]  # seals packed before this step
        for i, (side, batch) in enumerate(zip(sides, batches)):
            with torch.cuda.stream(forward):
                side.mosaic.init_forward_metadata(batch)
                fm = side.mosaic.forward_decode if decode else side.mosaic.forward_extend
                outs.append([fm(q, k, v, layer(li, group), batch) for li, (q, k, v) in enumerate(ins)])
            states.append(side.pool.store.page_state())
            if i == 1:
                torch.cuda.synchronize()
            side.mosaic.sealer.after_launch()
            if i == 1:
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        assert torch.equal(states[0], states[1]), step
        for li in range(LAYERS):
            assert torch.equal(outs[0][li], outs[1][li]), (step, li)  # no race between the side and forward streams
        assert torch.equal(states[0] == PAGE_FREE, states[2] == PAGE_FREE), step  # the same pages held, if not sealed
        if not torch.equal(states[0], states[2]):
            other_states.append(step)
        elif done[0] == done[2] and starts[0][: done[0]] == starts[2][: done[0]]:  # the same queries planned them
            for li in range(LAYERS):
                assert torch.equal(outs[0][li], outs[2][li]), (step, li)
            checked_after_pack += packed > 0 and bool((states[0] == PAGE_SEALED).any())
    assert starts[0] == starts[1] and len(starts[0]) >= 2, starts
    assert (len(other_states) > 0) == (packs > 1) == (starts[0] != starts[2]), (other_states, starts)
    assert checked_after_pack > 0 or packs == 1  # a pack in layer slices read alike by a later step
    assert sliced.slices_after_launch >= 1 and whole.slices_after_launch == 0
    assert (sliced.pack_slices_after_launch >= 1) == (packs > 1) and sliced.packs_rolled_back == 0
    assert sliced.pages_sealed == serial.pages_sealed > 0 and whole.pages_sealed > 0
    assert sliced.pending_voided == whole.pending_voided == 0
    assert torch.equal(sides[0].pool.store.page_state(), sides[1].pool.store.page_state())
    if packs == 1:
        assert sliced.pages_sealed == whole.pages_sealed
        assert torch.equal(sides[0].pool.store.page_state(), sides[2].pool.store.page_state())
    for side in sides:
        side.pool.check_invariants()


def _pack_under_way(seed: int) -> tuple:
    """:func:`_sliced` (two planner slices, packed after 3 plans) with packs in two layer slices, run up to the
    launch that packs the first: ``(scenario, sealer, pages, whole scenario)``."""
    sc, sealer, pages, sinks, whole = _sliced(seed, plans=3, slices=2)
    sealer.pack_layer_slices = 2
    _choosing_plan(sealer, pages, sinks)
    assert sealer.after_launch() and sealer.starts_after_launch == 1
    _plan(sealer)
    assert sealer.after_launch() and sealer.slices_after_launch == 1
    _plan(sealer)
    with HostSyncCounter() as count:
        assert sealer.after_launch() and sealer.packs_after_launch == 1  # the pack's first slice
    assert not _device_syncs(count) and count.puts == 0, dict(count.by_site)
    pending = sealer._pending
    assert pending is not None and pending.pack_left == [range(1, 2)] and sealer.pages_sealed == 0
    pages_t = torch.from_numpy(pages)
    store = sc.pool.store
    assert store.is_sealed(pages_t, layer_id=0).all() and not store.is_sealed(pages_t, layer_id=1).any()
    assert not store.is_sealed(pages_t).any()  # the attention's view: dense, read from the hot pages still held
    assert (sc.pool.physical_pages(pages_t) >= 0).all()
    sc.pool.check_invariants()
    return sc, sealer, pages, whole


def test_a_pack_in_layer_slices_writes_one_slice_a_launch_and_packs_what_a_whole_seal_packs(caplog):
    sc, sealer, pages, whole = _pack_under_way(5)
    _plan(sealer)  # a plan with room: the pack under way waits for the next launch
    assert sealer._pending is not None and sealer.pages_sealed == 0
    with HostSyncCounter() as count:
        assert sealer.after_launch() and sealer.pack_slices_after_launch == 1  # the last slice
    assert not _device_syncs(count) and count.puts == 0, dict(count.by_site)
    assert sealer._pending is None and (sealer.async_seals, sealer.pages_sealed) == (1, pages.size)
    assert (sealer.packs_after_launch, sealer.packs_rolled_back, sealer.pending_voided) == (1, 0, 0)
    assert (sc.pool.physical_pages(torch.from_numpy(pages)) < 0).all()  # the last slice freed the hot pages
    for a, b in zip(_store_state(whole), _store_state(sc)):
        assert torch.equal(a, b)
    sc.pool.check_invariants()
    with caplog.at_level(logging.INFO, logger="mosaickv_sglang.sealer"):
        sealer.maybe_log_status(now=1e12)
    assert ", packs in 2 layer slices (1 later slices after a launch, 0 rolled back)" in caplog.text, caplog.text
    _plan(sealer)
    assert sealer.after_launch() is False  # nothing left


def test_a_plan_short_of_room_packs_the_rest_of_a_pack_in_layer_slices_at_once():
    sc, sealer, pages, whole = _pack_under_way(5)
    sealer.reserve_pages = sc.pool.num_free_physical_pages + 1  # the next plan lacks room without the seal's pages
    _plan(sealer)
    assert sealer._pending is None and sealer.pages_sealed == pages.size and sealer.pack_slices_after_launch == 0
    assert sealer.packs_sooner == 0 and sealer.seal_calls == 1  # one pack, one call, already due at its start
    for a, b in zip(_store_state(whole), _store_state(sc)):
        assert torch.equal(a, b)
    sc.pool.check_invariants()


def test_a_page_freed_between_pack_slices_rolls_the_seal_back_and_the_live_pages_are_sealed_later():
    sc, sealer, pages, _ = _pack_under_way(11)
    ledger = sc.pool.arena_ledger
    reserved = ledger.reserved
    gone = int(np.sort(pages)[0])
    sc.pool.free_pages(torch.tensor([gone]))  # its layer-0 payload freed: the next plan cannot seal beside the step
    _plan(sealer)  # so it finishes the pack under way, which finds the page gone and rolls the seal back
    assert sealer.packs_rolled_back == 1 and sealer.pending_voided == 1 and sealer.pack_slices_after_launch == 0
    assert sealer.pages_sealed == 0 and sealer.async_seals == 0
    live = torch.from_numpy(np.sort(pages)[1:])
    assert np.array_equal(np.sort(sealer._pending.pages), live.numpy())  # due again, planned anew by that plan
    assert sealer.after_launch() and sealer.slices_after_launch == 2  # and its second slice after the launch
    assert not sc.pool.store.is_sealed(live, layer_id=0).any()  # dense again in every layer
    assert ledger.reserved < reserved and all(a.used_granules == 0 for a in sc.pool.store.allocators)
    sc.pool.check_invariants()
    for _ in range(8):
        _plan(sealer)
        sealer.after_launch()
    assert sealer._pending is None and sealer.pages_sealed == pages.size - 1
    assert sc.pool.store.is_sealed(live).all()
    sc.pool.check_invariants()


def test_no_arena_room_for_a_later_pack_slice_rolls_the_seal_back(monkeypatch, caplog):
    sc, sealer, pages, _ = _pack_under_way(5)
    store = sc.pool.store
    real = store.seal

    def full(*args, **kwargs):  # a fragmented arena: the ledger had room, the allocator finds none
        raise ArenaFullError(64, 64, 8)

    monkeypatch.setattr(store, "seal", full)
    _plan(sealer)
    with caplog.at_level(logging.ERROR, logger="mosaickv_sglang.sealer"):
        assert sealer.after_launch()
    assert "an arena is full although its ledger has room" in caplog.text
    assert sealer.packs_rolled_back == 1 and sealer._pending is None and sealer.pages_sealed == 0
    assert not store.is_sealed(torch.from_numpy(pages), layer_id=0).any()
    sc.pool.check_invariants()
    monkeypatch.setattr(store, "seal", real)
    for _ in range(8):
        _plan(sealer)
        sealer.after_launch()
    assert sealer.pages_sealed == pages.size and store.is_sealed(torch.from_numpy(pages)).all()
    sc.pool.check_invariants()


@pytest.mark.parametrize("seed", [3, 8])
def test_with_seal_max_pages_a_first_half_plans_at_most_that_many_and_the_rest_wait_for_the_next(seed, caplog):
    """MOSAICKV_SEAL_MAX_PAGES=M: a first half of more than M pages plans its first M, the others join the deferred
    pages (those already there kept), and the next seal takes them; every page ends sealed, each once."""
    sc, pages, sinks = _filled(seed)
    sealer = sc.mosaic.sealer
    sealer.seal_async, sealer.seal_async_plans = True, 1
    cap = max(1, pages.size // 3)
    sealer.max_seal_pages = cap
    earlier = pages[-1:]
    sealer._defer(earlier, sinks[-1:])
    assert sealer.start_seal(pages[:-1], sinks[:-1])
    assert np.array_equal(sealer._pending.pages, pages[:cap]) and sealer.seals_capped == 1
    held, held_sinks = sealer._still_deferrable()
    assert np.array_equal(held, np.concatenate([earlier, pages[cap:-1]]))
    assert np.array_equal(held_sinks, np.concatenate([sinks[-1:], sinks[cap:-1]]))
    assert sealer.finish_seal() and sealer.pages_sealed == cap
    capped = 1
    while held.size:
        capped += int(held.size > cap)
        sealer._defer(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool))
        assert sealer.start_seal(held, held_sinks) and sealer._pending.pages.size == min(cap, held.size)
        assert sealer.finish_seal()
        held, held_sinks = sealer._still_deferrable()
    assert sealer.pages_sealed == pages.size and sealer.seals_capped == capped >= 2
    assert sc.pool.store.is_sealed(torch.from_numpy(pages)).all()
    with caplog.at_level(logging.INFO, logger="mosaickv_sglang.sealer"):
        sealer.maybe_log_status(now=1e12)
    assert f"{sealer.seals_capped} capped at {cap} pages, " in caplog.text
