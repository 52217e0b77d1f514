# SPDX-License-Identifier: Apache-2.0
"""What the sidecar costs the scheduler's step (issue #5): a plan's staleness check before a forward reads the pool's
seal state once per job, not once per page (each read used to scan the whole ``[L, num_pages]`` state table), and the
worker process runs below the scheduler's priority, so a busy sidecar never takes a CPU the step wants."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from mosaickv_sglang.sidecar.bridge import SidecarBridge
from mosaickv_sglang.sidecar.client import DEFAULT_WORKER_NICE, JobOutcome, JobStatus, SidecarClient, SidecarConfig
from mosaickv_sglang.sidecar.protocol import SegmentKey

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:  # --import-mode=importlib puts no test folder on sys.path
    sys.path.insert(0, TESTS)
from bridge_fakes import D, H, S, FakePool, FakeWindow  # noqa: E402

PAGES_PER_JOB = 4


class CountingPool(FakePool):
    """:class:`FakePool` that counts the seal-state reads."""

    def __init__(self) -> None:
        super().__init__()
        self.state_reads = 0

    def sealed_in_layer(self, pages: np.ndarray, layer: int) -> np.ndarray:
        self.state_reads += 1
        return super().sealed_in_layer(pages, layer)


class OneJobClient:
    """Hands back ``outcomes`` on the first tick; no slot is ever busy."""

    disabled = False
    free_slots = 8

    def __init__(self, outcomes) -> None:
        self.outcomes = list(outcomes)

    def tick(self, budget_ms=None):
        out, self.outcomes = self.outcomes, []
        return out

    def close(self) -> None:
        pass


def _bridge(pool: FakePool) -> SidecarBridge:
    cfg = SidecarConfig(seg_size=S, head_dim=D, group_size=1, window=4, num_slots=8, max_segments=H * PAGES_PER_JOB)
    return SidecarBridge(pool, FakeWindow(), cfg, shadow_bytes=0)


def _job(pool: FakePool, layer: int, pages) -> JobOutcome:
    pool.seal(list(pages))
    keys = tuple(SegmentKey(layer, hd, p, int(pool.page_epoch[p])) for p in pages for hd in range(H))
    dense = torch.zeros(len(keys), S, D)
    return JobOutcome(0, JobStatus.OK, keys, result=SimpleNamespace(plan="plan"), valid=(True,) * len(keys),
                      keys=dense, values=dense.clone())  # fmt: skip


def test_a_plan_s_staleness_check_reads_the_pool_once_per_job():
    """Applying a job of several pages in a tick before a forward checks all its pages in one read of the pool's seal
    state; the plan is applied (pages current) or discarded (one page freed), as before."""
    pool = CountingPool()
    bridge = _bridge(pool)
    bridge.client = OneJobClient([_job(pool, 1, range(PAGES_PER_JOB))])
    assert bridge.tick() == 1
    assert pool.state_reads == 1
    assert [(layer, pages) for layer, pages, _ in pool.resealed] == [(1, list(range(PAGES_PER_JOB)))]

    pool2 = CountingPool()
    bridge2 = _bridge(pool2)
    job = _job(pool2, 0, range(PAGES_PER_JOB))
    pool2.free([2])
    bridge2.client = OneJobClient([job])
    assert bridge2.tick() == 0
    assert pool2.state_reads <= 1 and pool2.resealed == [] and bridge2.plans_discarded == 1


def test_an_idle_tick_reads_no_pool_state_and_repacks_nothing():
    """A tick with nothing landed and nothing finished (most decode steps) touches neither the pool's seal state
    nor its arenas."""
    pool = CountingPool()
    bridge = _bridge(pool)
    bridge.client = OneJobClient([])
    for _ in range(10):
        assert bridge.tick() == 0
    assert pool.state_reads == 0 and pool.resealed == [] and pool.released == 0


def test_the_worker_runs_below_the_scheduler_s_priority():
    """By default the worker adds :data:`DEFAULT_WORKER_NICE` to its niceness: where it shares a CPU with the
    scheduler, the scheduler's step runs first."""
    assert SidecarConfig().nice == DEFAULT_WORKER_NICE > 0
    cfg = SidecarConfig(seg_size=S, head_dim=D, group_size=1, window=4, num_slots=1, max_segments=H)
    with SidecarClient(cfg) as sc:
        assert sc.wait_ready(120.0)
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        theirs = os.getpriority(os.PRIO_PROCESS, sc.pid)
    assert theirs == min(19, mine + DEFAULT_WORKER_NICE)
