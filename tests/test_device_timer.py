# SPDX-License-Identifier: Apache-2.0
"""seconds_per_call: the mean time of back-to-back calls (the wall clock on the CPU)."""

from __future__ import annotations

import time

import torch

from mosaickv_sglang.device_timer import seconds_per_call


def test_mean_seconds_of_the_calls_on_the_cpu():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.01)

    t = seconds_per_call(fn, torch.device("cpu"), calls=3)
    assert len(calls) == 3 and 0.009 <= t < 0.5
