# SPDX-License-Identifier: Apache-2.0
"""Two tensor-parallel ranks as two processes (gloo): every page-level decision agrees after every step.

Each rank runs the mosaic backend on its own random K/V and queries, as its own KV heads would, through the same
batches of SGLang's paged allocator. After each step the ranks all-gather a digest of their page-level state
(logical -> physical pages, live and sealed pages, arena ledger, sealing counters). With a small arena the ledger
refuses batches part of the way through, so the run also covers arena-full decisions (with a hot pool that can
hold every page: pages the arena refuses stay dense).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("sglang")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import mkv_tp_ranks  # noqa: E402

WORLD = 2


@pytest.mark.parametrize("arena_granules,hot_pages,beside_async", [(None, 16, False), (425, 32, False), (None, 16, True)],
                         ids=["roomy-arena", "arena-fills", "beside-step-two-halves"])  # fmt: skip
def test_two_rank_processes_take_the_same_page_decisions(tmp_path, monkeypatch, arena_granules, hot_pages,
                                                         beside_async):  # fmt: skip
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init_file = str(tmp_path / "gloo-init")
    procs = [ctx.Process(target=mkv_tp_ranks.run_rank,
                         args=(r, WORLD, init_file, arena_granules, hot_pages, results, beside_async))
             for r in range(WORLD)]  # fmt: skip
    for p in procs:
        p.start()
    got = {}
    deadline = time.monotonic() + 900
    while len(got) < WORLD:
        try:
            rank, agreed, stats, err = results.get(timeout=5)
            got[rank] = (agreed, stats, err)
        except queue_module.Empty:
            assert all(p.is_alive() for p in procs), "a rank process exited before reporting"
            assert time.monotonic() < deadline, "the ranks did not report within 900 s"
    for p in procs:
        p.join(timeout=60)
    for rank, (agreed, stats, err) in sorted(got.items()):
        assert err is None, f"rank {rank}: {err}"
        assert agreed == [True] * len(mkv_tp_ranks.STEPS), f"rank {rank}: digests agreed per step {agreed}"
    (_, s0, _), (_, s1, _) = got[0], got[1]
    assert s0[:4] == s1[:4] and s0[5:] == s1[5:]  # pages sealed, under pressure, left dense, reserved, cold, async
    assert s0[0] > 0
    assert (s0[2] > 0) == (arena_granules is not None)  # a full arena left pages dense, on both ranks alike
    if beside_async:
        assert s0[5] > 0 and s0[6] > 0  # cold pages sealed beside the step, seals packed plans later
