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


def test_tune_variants_cover_warps_stages_and_split_counts():
    """--tune times every warp x stage pair at the suggested split count and its halves and multiples, within 1..64."""
    from bench.decode_speed import TUNE_STAGES, TUNE_WARPS, tune_variants

    v = tune_variants(8)
    assert len(v) == len(set(v)) == len(TUNE_WARPS) * len(TUNE_STAGES) * 4
    assert {n for _, _, n in v} == {4, 8, 16, 32} and (4, 2, 8) in v
    assert {n for _, _, n in tune_variants(1)} == {1, 2, 4}
    assert {n for _, _, n in tune_variants(32)} == {16, 32, 64}
    with pytest.raises(ValueError, match="splits: expected an integer >= 1, got 0"):
        tune_variants(0)
