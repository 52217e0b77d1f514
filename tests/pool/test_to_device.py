# SPDX-License-Identifier: Apache-2.0
"""Host-to-device moves of the pool's re-packing path: every tensor of a plan moves, values intact."""

from __future__ import annotations

import dataclasses

import torch

from mosaickv_sglang.kernels.format import SegmentPlan
from mosaickv_sglang.pool import to_device
from mosaickv_sglang.pool.store import _plan_to


def test_a_plan_moves_whole_and_a_plan_already_there_is_not_copied():
    plan = SegmentPlan.uniform(3, 16, 64)
    plan.k_factors = (torch.randn(3, 16, 4), torch.randn(3, 4, 64))  # a tuple field, not checked again
    assert _plan_to(plan, torch.device("cpu")) is plan
    moved = _plan_to(plan, torch.device("meta"))
    for f in dataclasses.fields(plan):
        old, new = getattr(plan, f.name), getattr(moved, f.name)
        parts = list(old) if isinstance(old, tuple) else [old]
        got = list(new) if isinstance(new, tuple) else [new]
        assert len(parts) == len(got), f.name
        for a, b in zip(parts, got):
            assert (a is None) == (b is None), f.name
            if a is not None:
                assert b.device.type == "meta" and b.shape == a.shape and b.dtype == a.dtype, f.name


def test_to_device_on_the_host_is_a_plain_move():
    x = torch.arange(6).view(2, 3)
    assert to_device(x, "cpu") is x
    torch.testing.assert_close(to_device(x, torch.device("cpu")), x, atol=0, rtol=0)
