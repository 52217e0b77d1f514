# SPDX-License-Identifier: Apache-2.0
"""The sidecar end to end: a real spawned worker, shared-memory slots, faults (kill -9, hang), determinism."""

from __future__ import annotations

import os
import signal
import time
from typing import List, Tuple

import pytest
import torch
from mkv_sidecar_data import READY_TIMEOUT_S, make_segments, plan_tensors, tiny_config

from mosaickv_sglang.planner import plan_exact
from mosaickv_sglang.sidecar import JobOutcome, JobStatus, SidecarClient

RATIO = 2.0  # at this ratio the test data gets low-rank segments, so plans carry SVD factors


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _submit(client: SidecarClient, seed: int, n: int = 4, layer: int = 0) -> Tuple[int, tuple]:
    k, v, q = make_segments(n, seed=seed)
    keys = [client.generations.key(layer, 0, 100 * seed + p) for p in range(n)]
    job = client.try_submit(keys, k, v, q, ratio=RATIO)
    assert job is not None
    return job, (k, v, q)


def _one_thread_plan(k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, client: SidecarClient):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker's setting: same reduction order
    try:
        return plan_exact(k, v, q, ratio=RATIO, menu=client.menu)
    finally:
        torch.set_num_threads(threads)


def test_end_to_end_plan_equals_in_process_plan(rank0: SidecarClient):
    """submit -> poll returns plan_exact's plan of the same data: same choices, forms and kept tokens, factors
    allclose."""
    job, (k, v, q) = _submit(rank0, seed=11, n=6)
    (out,) = rank0.drain(30.0)
    assert (out.job_id, out.status, out.valid) == (job, JobStatus.OK, (True,) * 6)
    got, ref = plan_tensors(out.result), plan_tensors(_one_thread_plan(k, v, q, rank0))
    assert "k_a" in ref or "v_a" in ref, "test data should give low-rank segments"
    assert got.keys() == ref.keys()
    for name in ("choice", "token_keep", "k_form", "k_param", "v_form", "v_param", "flags", "seg_bytes"):
        assert torch.equal(got[name], ref[name]), name
    for name in set(ref) - {"choice", "token_keep", "k_form", "k_param", "v_form", "v_param", "flags", "seg_bytes"}:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    assert rank0.free_slots == rank0.config.num_slots and rank0.counters.queue_depth == 0


def test_bounded_queue_keeps_the_fast_plan(rank0: SidecarClient):
    """With every slot busy try_submit returns None at once (counted); slots come back after poll."""
    before = rank0.counters
    jobs = [_submit(rank0, seed=20 + i, n=2)[0] for i in range(rank0.config.num_slots)]
    k, v, q = make_segments(2, seed=29)
    t0 = time.perf_counter()
    assert rank0.try_submit([rank0.generations.key(0, 0, 1), rank0.generations.key(0, 0, 2)], k, v, q, ratio=RATIO) \
        is None
    assert time.perf_counter() - t0 < 0.5
    assert rank0.counters.rejected_full == before.rejected_full + 1 and rank0.counters.queue_depth == len(jobs)
    outs = rank0.drain(30.0)
    assert [o.job_id for o in outs] == jobs and all(o.status == JobStatus.OK for o in outs)
    assert rank0.free_slots == rank0.config.num_slots
    assert _submit(rank0, seed=29, n=2)[0] == jobs[-1] + 1
    rank0.drain(30.0)


def test_stale_generation_discards_the_plan(rank0: SidecarClient):
    """A page freed/reused after submission: its plan is discarded and counted; other segments of a job survive."""
    before = rank0.counters
    all_stale, _ = _submit(rank0, seed=30, n=3)
    partly, _ = _submit(rank0, seed=31, n=3)
    rank0.generations.bump([3000, 3001, 3002, 3101])  # every page of job 1, one page of job 2
    outs = {o.job_id: o for o in rank0.drain(30.0)}
    assert outs[all_stale].status == JobStatus.STALE and outs[all_stale].result is None
    assert outs[partly].status == JobStatus.OK and outs[partly].valid == (True, False, True)
    c = rank0.counters
    assert c.discarded_stale == before.discarded_stale + 1
    assert c.segments_discarded == before.segments_discarded + 4
    assert c.completed == before.completed + 1
    assert rank0.free_slots == rank0.config.num_slots


def test_two_ranks_give_byte_identical_plans(ranks: Tuple[SidecarClient, SidecarClient]):
    """Two independent sidecars fed the same inputs return byte-identical plans."""
    results: List[List[JobOutcome]] = []
    for client in ranks:
        client.drain(30.0)
        jobs = [_submit(client, seed=40 + i, n=5, layer=i)[0] for i in range(2)]
        outs = client.drain(30.0)
        assert [o.job_id for o in outs] == jobs and all(o.status == JobStatus.OK for o in outs)
        results.append(outs)
    for a, b in zip(*results):
        ta, tb = plan_tensors(a.result), plan_tensors(b.result)
        assert ta.keys() == tb.keys()
        for name in ta:
            assert ta[name].dtype == tb[name].dtype and ta[name].numpy().tobytes() == tb[name].numpy().tobytes(), name


def test_kill_mid_work_restarts_and_loses_only_in_flight_jobs():
    """kill -9 while the worker plans: detected, restarted within 5 s, in-flight jobs end LOST (none hangs), their
    slots come back, and new jobs complete on the new worker."""
    client = SidecarClient(tiny_config(num_slots=3, job_delay_s=0.5))
    with client:
        assert client.wait_ready(READY_TIMEOUT_S)
        old_pid = client.pid
        jobs = [_submit(client, seed=50 + i, n=2)[0] for i in range(3)]
        time.sleep(0.2)  # the worker is inside job 0
        os.kill(old_pid, signal.SIGKILL)
        t_kill = time.monotonic()
        outs: List[JobOutcome] = []
        while client.counters.restarts == 0 and time.monotonic() - t_kill < 5.0:
            outs += client.tick(budget_ms=2.0)
            time.sleep(0.01)
        assert client.counters.restarts == 1, "not restarted within 5 s"
        assert client.pid != old_pid and client.is_alive and _pid_gone(old_pid)
        assert [o.job_id for o in outs] == jobs and all(o.status == JobStatus.LOST for o in outs)
        assert client.counters.lost == 3 and client.counters.queue_depth == 0
        assert client.free_slots == 3
        # a job submitted while the new worker starts waits in its slot and completes once it is ready
        new_jobs = [_submit(client, seed=60 + i, n=2)[0] for i in range(2)]
        assert client.wait_ready(READY_TIMEOUT_S)
        done = client.drain(30.0)
        assert [o.job_id for o in done] == new_jobs and all(o.status == JobStatus.OK for o in done)
        assert client.free_slots == 3 and client.counters.completed == 2
        last_pid = client.pid
    assert not client.is_alive and last_pid is not None and _pid_gone(last_pid)


def test_hung_worker_is_replaced_and_close_terminates_it():
    """A worker stuck in a job past job_timeout_s is killed and replaced (the job ends LOST); close() stops a worker
    that does not answer Shutdown (here the replacement, busy starting) by terminating it after the shutdown
    timeout, and leaves no process behind."""
    client = SidecarClient(tiny_config(job_delay_s=60.0, job_timeout_s=1.0, shutdown_timeout_s=0.3))
    client.start()
    try:
        assert client.wait_ready(READY_TIMEOUT_S)
        first_pid = client.pid
        job, _ = _submit(client, seed=70, n=2)
        outs = client.drain(10.0)
        assert [(o.job_id, o.status) for o in outs] == [(job, JobStatus.LOST)]
        assert "no progress" in outs[0].error and _pid_gone(first_pid)
        t0 = time.monotonic()
        while client.counters.restarts == 0 and time.monotonic() - t0 < 5.0:
            client.tick()
            time.sleep(0.01)
        second_pid = client.pid
        assert client.counters.restarts == 1 and second_pid not in (None, first_pid) and not client.is_ready
        job2, _ = _submit(client, seed=71, n=2)  # waits in its slot for the new worker
        t0 = time.monotonic()
        lost = client.close()
        assert time.monotonic() - t0 < 5.0
        assert [(o.job_id, o.status) for o in lost] == [(job2, JobStatus.LOST)]
        assert _pid_gone(second_pid) and not client.is_alive
    finally:
        client.close()


def test_a_blocked_scheduler_does_not_make_a_ready_worker_look_dead():
    """A scheduler that did not tick for longer than start_timeout_s (a kernel warmup, a long forward) finds the
    worker's Ready unread in the pipe: the client reads it instead of killing a healthy worker as not ready."""
    client = SidecarClient(tiny_config(start_timeout_s=5.0))
    client.start()
    try:
        w = client._worker
        assert w is not None and w.conn.poll(READY_TIMEOUT_S), "the worker sent nothing"
        pid = client.pid
        w.started_at -= 1000.0  # as if the scheduler had been blocked since the spawn
        assert client.tick() == []
        assert client.is_ready and client.pid == pid and client.counters.restarts == 0
        job, _ = _submit(client, seed=80, n=2)
        assert [(o.job_id, o.status) for o in client.drain(30.0)] == [(job, JobStatus.OK)]
    finally:
        client.close()


def test_submit_requires_a_started_client():
    """Using a client before start() is refused with a clear error."""
    client = SidecarClient(tiny_config())
    k, v, q = make_segments(1, seed=0)
    with pytest.raises(RuntimeError, match="try_submit: expected a started, open client"):
        client.try_submit([client.generations.key(0, 0, 0)], k, v, q, ratio=RATIO)
    assert client.tick() == [] and client.close() == []


def test_worker_thread_pools_are_capped_through_its_environment():
    """The worker's BLAS/OpenMP pools are sized before it imports torch: its environment carries
    ``num_threads`` for OMP/MKL/OpenBLAS, and the scheduler's own environment is left as it was."""
    before = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    client = SidecarClient(tiny_config(num_threads=2))
    client.start()
    try:
        # /proc/PID/environ is the block the process was exec'ed with: read it once the worker runs (not between the
        # fork and the exec, where it still shows the parent's start-up environment)
        assert client.wait_ready(READY_TIMEOUT_S)
        env = dict(
            item.split("=", 1) for item in open(f"/proc/{client.pid}/environ").read().split("\0") if "=" in item
        )
        assert {k: env.get(k) for k in before} == {k: "2" for k in before}
        assert {k: os.environ.get(k) for k in before} == before
    finally:
        client.close()


def test_watchdog_restarts_a_dead_worker_while_the_scheduler_does_not_tick():
    """A scheduler stuck for long (a first-use compile) does not tick: the client's watchdog thread still notices a
    killed worker and starts a new one within seconds; the next tick returns the in-flight job as LOST, exactly once."""
    client = SidecarClient(tiny_config(num_slots=2, job_delay_s=2.0, watchdog_s=0.1))
    with client:
        assert client.wait_ready(READY_TIMEOUT_S)
        old_pid = client.pid
        job, _ = _submit(client, seed=90, n=2)
        os.kill(old_pid, signal.SIGKILL)
        t_kill = time.monotonic()
        while client.counters.restarts == 0 and time.monotonic() - t_kill < 5.0:
            time.sleep(0.02)  # no tick
        assert client.counters.restarts == 1, "the watchdog did not restart the worker within 5 s"
        assert client.pid not in (None, old_pid) and client.is_alive and _pid_gone(old_pid)
        outs = client.tick()
        assert [(o.job_id, o.status) for o in outs] == [(job, JobStatus.LOST)]
        assert client.tick() == [] and client.free_slots == 2
        assert client.wait_ready(READY_TIMEOUT_S)
        job2, _ = _submit(client, seed=91, n=2)
        assert [(o.job_id, o.status) for o in client.drain(30.0)] == [(job2, JobStatus.OK)]
        last_pid = client.pid
    assert _pid_gone(last_pid) and client._watchdog is not None and not client._watchdog.is_alive()


def test_without_watchdog_a_dead_worker_waits_for_a_tick():
    """``watchdog_s=0``: a killed worker stays down until the scheduler ticks; that tick ends its job LOST and the
    restart follows on the next ticks."""
    client = SidecarClient(tiny_config(num_slots=2, job_delay_s=2.0, watchdog_s=0.0))
    with client:
        assert client.wait_ready(READY_TIMEOUT_S) and client._watchdog is None
        old_pid = client.pid
        job, _ = _submit(client, seed=92, n=2)
        os.kill(old_pid, signal.SIGKILL)
        time.sleep(1.0)
        assert client.counters.restarts == 0 and client.pid == old_pid  # nobody looked
        assert [(o.job_id, o.status) for o in client.tick()] == [(job, JobStatus.LOST)]
        t0 = time.monotonic()
        while client.counters.restarts == 0 and time.monotonic() - t0 < 5.0:
            assert client.tick() == []
            time.sleep(0.02)
        assert client.counters.restarts == 1 and client.pid not in (None, old_pid)
