# SPDX-License-Identifier: Apache-2.0
"""Decode step timer (mosaickv_sglang/step_timer.py): which periods count, the pending bound, and the bucket
quantiles against exact ones on random samples."""

from __future__ import annotations

import numpy as np
import pytest

from mosaickv_sglang.step_timer import DECODE_STEP_BUCKETS, DecodeStepTimer, histogram_quantile


class SteppedClock:
    """A clock that returns the given times in order."""

    def __init__(self, times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


def test_only_decode_after_decode_counts():
    """A prefill step breaks the chain: the decode step after it starts a new period, the prefill's own time and the
    gap before it never count."""
    kinds = [True, True, False, True, True, True, False, False, True]
    times = [0.0, 0.010, 0.030, 0.100, 0.112, 0.125, 0.300, 0.310, 0.400]
    timer = DecodeStepTimer(clock=SteppedClock(times))
    got = [timer.step(k) for k in kinds]
    assert got[0] is None and got[2] is None and got[3] is None and got[6:] == [None, None, None]
    assert got[1] == pytest.approx(0.010) and got[4] == pytest.approx(0.012) and got[5] == pytest.approx(0.013)
    assert timer.drain() == pytest.approx([0.010, 0.012, 0.013])
    assert timer.drain() == []


def test_pending_periods_are_bounded():
    """Never drained, the timer keeps at most max_pending periods, the newest, and counts what it dropped."""
    timer = DecodeStepTimer(clock=SteppedClock([float(i) for i in range(101)]), max_pending=10)
    for _ in range(101):
        timer.step(True)
    pending = timer.drain()
    assert len(pending) <= 10 and timer.dropped + len(pending) == 100
    with pytest.raises(ValueError, match="max_pending: expected >= 1, got 0"):
        DecodeStepTimer(max_pending=0)


def test_buckets_are_five_percent_apart_from_half_a_millisecond_to_five_seconds():
    b = np.array(DECODE_STEP_BUCKETS)
    assert b[0] == 0.0005 and b[-1] >= 5.0 and b[-2] < 5.0
    assert np.allclose(b[1:] / b[:-1], 1.05, rtol=1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bucket_quantiles_are_within_a_bucket_of_the_exact_ones(seed):
    """Random step times (a log-normal body around 20-40 ms plus a slow tail) bucketed like Prometheus: p50, p90
    and p99 from the buckets are within 5% (one bucket) of numpy's."""
    rng = np.random.default_rng(seed)
    body = rng.lognormal(np.log(rng.uniform(0.02, 0.04)), 0.2, size=4000)
    samples = np.concatenate([body, rng.uniform(0.08, 0.3, size=80)])
    bounds = DECODE_STEP_BUCKETS + (float("inf"),)
    cumulative = [float(np.count_nonzero(samples <= b)) for b in bounds]
    for q in (0.5, 0.9, 0.99):
        exact = float(np.quantile(samples, q))
        assert histogram_quantile(q, bounds, cumulative) == pytest.approx(exact, rel=0.05)


def test_quantile_edge_cases():
    bounds = (0.01, 0.02, float("inf"))
    assert histogram_quantile(0.5, bounds, [0.0, 0.0, 0.0]) is None
    assert histogram_quantile(0.5, bounds, [0.0, 4.0, 4.0]) == pytest.approx(0.015)
    assert histogram_quantile(0.99, bounds, [0.0, 4.0, 8.0]) == 0.02  # in the +Inf bucket: its lower bound
    with pytest.raises(ValueError, match="q: expected a quantile in"):
        histogram_quantile(1.5, bounds, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="counts: expected 3 cumulative counts, got 2"):
        histogram_quantile(0.5, bounds, [1.0, 1.0])


def _simulated_loop(kinds, durations, overlap, host_s, timer_overlapped, seed):
    """A model of SGLang's scheduler loop on one GPU queue: each iteration marks the step's start on the timer (the
    clock is the loop's time), launches it (queued behind the GPU's work), then waits for a result: the last
    batch's under the overlap loop, its own otherwise; host work jitters by up to 10%."""
    rng = np.random.default_rng(seed)
    now, gpu_free, last_end = 0.0, 0.0, None
    clock = [0.0]
    timer = DecodeStepTimer(clock=lambda: clock[0])
    for kind in kinds:
        now += host_s * rng.uniform(0.9, 1.1)
        clock[0] = now
        timer.step(kind == "decode", overlapped=timer_overlapped)
        end = max(gpu_free, now) + durations[kind] * rng.uniform(0.98, 1.02)
        gpu_free = end
        if overlap:
            now = max(now, last_end) if last_end is not None else now
            last_end = end
        else:
            now = end
    return timer


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_under_the_overlap_loop_the_period_after_a_prefill_is_kept_apart(seed):
    """In the overlap loop the period from the first decode after a prefill to the next decode holds the prefill's
    GPU time: counted as a decode step, each run of prefills makes a step of about a prefill's time (here 1.7x-5x a
    decode's); kept apart, every decode step counted is one decode's GPU time, and the periods behind a prefill are
    about a prefill's."""
    rng = np.random.default_rng(100 + seed)
    decode_s, prefill_s = rng.uniform(0.010, 0.015), rng.uniform(0.025, 0.050)
    kinds = []
    for _ in range(6):
        kinds += ["prefill"] * int(rng.integers(1, 4)) + ["decode"] * int(rng.integers(5, 30))
    kinds += ["decode"] * 10
    durations = {"decode": decode_s, "prefill": prefill_s}
    runs = sum(1 for a, b in zip(kinds, kinds[1:]) if a == "prefill" and b == "decode")

    naive = _simulated_loop(kinds, durations, overlap=True, host_s=0.001, timer_overlapped=False, seed=seed)
    assert max(naive.drain()) > 1.5 * decode_s and naive.drain_behind_prefill() == []

    timer = _simulated_loop(kinds, durations, overlap=True, host_s=0.001, timer_overlapped=True, seed=seed)
    steps, behind = timer.drain(), timer.drain_behind_prefill()
    assert len(behind) == runs and len(steps) == kinds.count("decode") - 2 * runs
    assert max(steps) < 1.05 * decode_s and min(steps) > 0.95 * decode_s
    assert min(behind) > 0.9 * prefill_s

    plain = _simulated_loop(kinds, durations, overlap=False, host_s=0.001, timer_overlapped=False, seed=seed)
    steps = plain.drain()
    assert len(steps) == kinds.count("decode") - runs and max(steps) < 1.05 * (decode_s + 0.0011)


def test_overlapped_periods_behind_a_prefill_are_bounded_too():
    timer = DecodeStepTimer(clock=SteppedClock([float(i) for i in range(60)]), max_pending=4)
    for _ in range(20):
        for kind in (False, True, True):
            timer.step(kind, overlapped=True)
    assert len(timer.drain_behind_prefill()) <= 4 and len(timer.drain()) == 0 and timer.dropped >= 16
