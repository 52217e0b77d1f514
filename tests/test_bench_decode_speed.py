# SPDX-License-Identifier: Apache-2.0
"""The decode-speed benchmark's synthetic plan hits its memory ratio and packs to what it claims."""

from __future__ import annotations

import pytest
import torch

from bench.decode_speed import SEG, build_plan
from mosaickv_sglang.kernels.format import DESC_WIDTH, GRANULE_BYTES


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("ratio", [2.0, 3.0, 4.0])
def test_build_plan_meets_ratio(d, ratio):
    """Stored bytes (payloads + bounds + descriptors) are within 10% of dense / ratio, and sinks stay dense."""
    n = 400
    plan, mix = build_plan(n, d, ratio, torch.Generator().manual_seed(1), torch.device("cpu"))
    kg, vg = plan.granules()
    stored = int((kg + vg).sum()) * GRANULE_BYTES + n * (2 * d * 2 + DESC_WIDTH * 4)
    dense = n * SEG * d * 2 * 2
    assert dense / stored == pytest.approx(ratio, rel=0.05)
    assert int(plan.flags[0]) == 1 and bool(plan.token_keep[0].all())
    assert sum(mix.values()) == n and len([v for v in mix.values() if v]) >= 3
