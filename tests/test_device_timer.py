# SPDX-License-Identifier: Apache-2.0
"""seconds_per_call: the mean time of back-to-back calls (the wall clock on the CPU); best_seconds_in_rounds: the
best of rounds that time every candidate once."""

from __future__ import annotations

import time

import pytest
import torch

from mosaickv_sglang.device_timer import best_seconds_in_rounds, seconds_per_call


def test_mean_seconds_of_the_calls_on_the_cpu():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.01)

    t = seconds_per_call(fn, torch.device("cpu"), calls=3)
    assert len(calls) == 3 and 0.009 <= t < 0.5


def test_rounds_time_every_candidate_once_a_round_so_a_burst_slows_no_candidate_throughout():
    """A burst of other work during the first five timings (as a second server starting beside this one) would have
    slowed all five timings of the first candidate had each been timed alone; in rounds every candidate keeps its
    own best time, and a candidate that raises is dropped and reported."""
    order, errors = [], []

    def timed(name):
        def fn():
            order.append(name)
            time.sleep(0.02 if len(order) <= 5 else 0.002)

        return fn

    def broken():
        raise RuntimeError("cannot compile")

    calls = {"a": timed("a"), "b": timed("b"), "broken": broken, "c": timed("c")}
    best = best_seconds_in_rounds(calls, torch.device("cpu"), repeats=5, on_error=errors.append)
    assert order[:6] == ["a", "b", "c", "a", "b", "c"] and len(order) == 15
    assert set(best) == {"a", "b", "c"} and all(0.0019 <= t < 0.015 for t in best.values())
    assert errors == ["broken"]
    with pytest.raises(ValueError, match="repeats: expected >= 1, got 0"):
        best_seconds_in_rounds(calls, torch.device("cpu"), repeats=0)
