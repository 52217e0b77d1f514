# SPDX-License-Identifier: Apache-2.0
"""The first half of a seal planned on a worker thread (MOSAICKV_SEAL_PLAN_THREAD=1,
:mod:`mosaickv_sglang.seal_plan_thread`) on the CPU: through the backend's plans the same pages are sealed at the same
plans, into the same store bits, with the same outputs, as with the planner on the scheduler's thread; a planner that
fails raises its error at the pack; outside a seal beside the step the scheduler's thread plans."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("sglang")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helper modules (importlib import mode)

from mkv_backend_cases import Scenario, config  # noqa: E402
from test_pending_seal import _filled, _store_state  # noqa: E402

from mosaickv_sglang.seal_plan_thread import PlannerThread, seal_plan_thread_enabled  # noqa: E402


def _served(group: int, threaded: bool, seed: int = 19):
    sc = Scenario(config(ratio=3.0), group=group, seed=seed, auto_seal=True)
    sealer = sc.mosaic.sealer
    sealer.seal_async, sealer.seal_async_plans, sealer.seal_beside_step = True, 3, True
    if threaded:
        sealer.planner_thread = PlannerThread()
    threads = []
    plan_with = sealer._plan_with

    def noting_thread(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return plan_with(*args, **kwargs)

    sealer._plan_with = noting_thread
    sealed, worst = sc.served([61, 38, 77], decode_steps=24)
    return sc, sealed, worst, threads


@pytest.mark.parametrize("group", [4])
def test_a_threaded_planner_seals_what_the_scheduler_thread_seals(group):
    plain, plain_sealed, plain_worst, plain_threads = _served(group, threaded=False)
    sc, sealed, worst, threads = _served(group, threaded=True)
    sealer = sc.mosaic.sealer
    assert sealer.planner_thread.jobs > 0 and sealer.async_seals > 0 and sealed[-1] > 0
    assert threads and all(name.startswith("mosaickv-seal-planner") for name in threads), threads
    assert plain_threads and not any(name.startswith("mosaickv-seal-planner") for name in plain_threads)
    assert sealed == plain_sealed and sealer.pending_voided == plain.mosaic.sealer.pending_voided
    for a, b in zip(_store_state(plain), _store_state(sc)):
        assert torch.equal(a, b)
    assert worst == plain_worst
    assert sealer.seal_plan_seconds == 0.0 and sealer.planner_thread.worker_seconds > 0
    sc.pool.check_invariants()
    sealer.planner_thread.close()


def test_a_failing_planner_raises_at_the_pack_and_leaves_the_pages_dense():
    sc, pages, sinks = _filled(4)
    sealer = sc.mosaic.sealer
    sealer.planner_thread = PlannerThread()

    def broken(*args, **kwargs):
        raise RuntimeError("planner broke")

    sealer._plan_with = broken
    with sealer._beside_step(forward_waits=False):
        assert sealer.start_seal(pages, sinks)
    assert sealer.planner_thread.jobs == 1
    with pytest.raises(RuntimeError, match="planner broke"):
        sealer.finish_seal()
    assert sealer._pending is None and sealer.pages_sealed == 0
    assert not sc.pool.store.is_sealed(torch.from_numpy(pages)).any()
    assert sealer.finish_seal() is False
    sealer.planner_thread.close()


def test_outside_a_seal_beside_the_step_the_scheduler_thread_plans():
    sc, pages, sinks = _filled(5)
    sealer = sc.mosaic.sealer
    sealer.planner_thread = PlannerThread()
    assert sealer.start_seal(pages, sinks)
    assert sealer.planner_thread.jobs == 0 and sealer._pending.plans is not None
    assert sealer.finish_seal() and sealer.pages_sealed == pages.size
    sealer.planner_thread.close()


def test_a_job_must_be_joined_before_the_next():
    worker = PlannerThread()
    worker.submit(lambda: 7)
    with pytest.raises(RuntimeError, match="not joined"):
        worker.submit(lambda: 8)
    assert worker.join() == 7 and worker.join() is None and not worker.busy
    worker.close()


def test_the_setting(monkeypatch):
    monkeypatch.delenv("MOSAICKV_SEAL_PLAN_THREAD", raising=False)
    assert not seal_plan_thread_enabled()
    assert Scenario(config(ratio=3.0), group=2, seed=3).mosaic.sealer.planner_thread is None
    monkeypatch.setenv("MOSAICKV_SEAL_PLAN_THREAD", "1")
    sealer = Scenario(config(ratio=3.0), group=2, seed=3).mosaic.sealer
    assert isinstance(sealer.planner_thread, PlannerThread)
    sealer.planner_thread.close()
    for raw in ("yes", "2"):
        monkeypatch.setenv("MOSAICKV_SEAL_PLAN_THREAD", raw)
        with pytest.raises(ValueError, match=r"MOSAICKV_SEAL_PLAN_THREAD: expected 0 or 1, got"):
            seal_plan_thread_enabled()
