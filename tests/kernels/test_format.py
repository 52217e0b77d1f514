# SPDX-License-Identifier: Apache-2.0
"""Tests of the packed-format constants, size helpers and SegmentPlan validation (pure PyTorch)."""

import pytest
import torch
from mkv_kernel_cases import random_plan

from bench.host_syncs import HostSyncCounter
from mosaickv_sglang.kernels import format as fmt
from mosaickv_sglang.kernels.format import (
    FORM_CHAN,
    FORM_DENSE,
    FORM_LOWRANK,
    GRANULE_ELEMS,
    SegmentPlan,
    assign_offsets,
    payload_elems,
    payload_granules,
    plans_granules,
)


def test_descriptor_layout_constants():
    """The descriptor fields are the documented, distinct columns of an 8-wide int32 row."""
    fields = [fmt.N_ROWS, fmt.K_FORM, fmt.K_PARAM, fmt.V_FORM, fmt.V_PARAM, fmt.K_OFF, fmt.V_OFF, fmt.FLAGS]
    assert fields == list(range(8)) and fmt.DESC_WIDTH == 8
    assert (fmt.FORM_DENSE, fmt.FORM_CHAN, fmt.FORM_LOWRANK) == (0, 1, 2)
    assert fmt.GRANULE_ELEMS == 64 and fmt.GRANULE_BYTES == 128 and fmt.FLAG_ALWAYS_READ == 1


@pytest.mark.parametrize("d", [64, 128])
def test_payload_sizes_scalar_and_tensor_agree(d):
    """payload_elems follows the layout (dense m*d; chan m*d/16 + m*k; lowrank m*r + r*d) for ints and tensors."""
    cases = [(FORM_DENSE, 0, 64), (FORM_DENSE, 5, 1), (FORM_CHAN, 1, 7), (FORM_CHAN, d - 1, 64), (FORM_LOWRANK, 1, 1),
             (FORM_LOWRANK, 16, 33)]  # fmt: skip
    expect = {FORM_DENSE: lambda k, m: m * d, FORM_CHAN: lambda k, m: m * d // 16 + m * k,
              FORM_LOWRANK: lambda k, m: m * k + k * d}  # fmt: skip
    for form, p, m in cases:
        e = payload_elems(form, p, m, d)
        assert e == expect[form](p, m)
        assert payload_granules(form, p, m, d) == -(-e // GRANULE_ELEMS)
    f, p, m = (torch.tensor(x, dtype=torch.int32) for x in zip(*cases))
    assert payload_elems(f, p, m, d).tolist() == [payload_elems(*c, d) for c in cases]
    assert payload_granules(f, p, m, d).tolist() == [payload_granules(*c, d) for c in cases]


def test_payload_elems_rejects_bad_input():
    with pytest.raises(ValueError, match="head_dim: expected a positive multiple of 32"):
        payload_elems(FORM_DENSE, 0, 4, 48)
    with pytest.raises(ValueError, match="form: expected one of"):
        payload_elems(7, 0, 4, 64)


def test_assign_offsets_is_exclusive_prefix_sum():
    """Payload i occupies [out[i], out[i] + g[i]) and payloads are consecutive from base."""
    g = torch.tensor([3, 0, 1, 5], dtype=torch.int32)
    assert assign_offsets(g, 10).tolist() == [10, 13, 13, 14]
    assert assign_offsets(g).dtype == torch.int64
    with pytest.raises(ValueError, match="granules: expected a 1-D"):
        assign_offsets(g.float())
    with pytest.raises(ValueError, match="base: expected a non-negative"):
        assign_offsets(g, -1)
    with pytest.raises(TypeError, match="granules: expected torch.Tensor"):
        assign_offsets([1, 2])


def _plan(**over):
    n, s, d = 3, 16, 64
    i32 = dict(dtype=torch.int32)
    kw = dict(
        token_keep=torch.ones(n, s, dtype=torch.bool),
        k_form=torch.tensor([0, 1, 2], **i32), k_param=torch.tensor([0, 5, 4], **i32),
        v_form=torch.tensor([1, 0, 0], **i32), v_param=torch.tensor([63, 0, 0], **i32),
        k_chan_weight=torch.ones(n, d), v_chan_weight=torch.ones(n, d),
        k_factors=(torch.randn(n, s, 8), torch.randn(n, 8, d)), v_factors=None,
        flags=torch.zeros(n, **i32),
    )  # fmt: skip
    kw.update(over)
    return SegmentPlan(**kw)


def test_plan_valid_and_derived_sizes():
    """A valid plan reports its sizes; bump_offsets places K then V of each segment contiguously."""
    p = _plan()
    assert (p.num_segments, p.seg_size, p.head_dim) == (3, 16, 64)
    kg, vg = p.granules()
    assert kg.tolist() == [16, payload_granules(FORM_CHAN, 5, 16, 64), payload_granules(FORM_LOWRANK, 4, 16, 64)]
    ko, vo, end = p.bump_offsets(2)
    assert ko[0] == 2 and vo[0] == 2 + kg[0] and ko[1] == vo[0] + vg[0]
    assert end == 2 + int(kg.sum() + vg.sum())


@pytest.mark.parametrize(
    "over, match",
    [
        (dict(token_keep=torch.ones(3, 24, dtype=torch.bool)), "token_keep: expected S"),
        (dict(token_keep=torch.zeros(3, 16, dtype=torch.bool)), "token_keep: expected at least one kept token"),
        (dict(token_keep=torch.ones(3, 16)), "token_keep: expected dtype torch.bool"),
        (dict(k_param=torch.tensor([0, 64, 4], dtype=torch.int32)), r"k_param: expected chan k in \[1, 63\]"),
        (dict(k_param=torch.tensor([0, 5, 9], dtype=torch.int32)), r"k_param: expected lowrank r in \[1, 8\]"),
        (dict(k_factors=None), "k_factors: expected \\(A, B\\)"),
        (dict(v_form=torch.tensor([1, 3, 0], dtype=torch.int32)), "v_form: expected codes"),
        (dict(k_form=torch.tensor([0, 1], dtype=torch.int32)), r"k_form: expected shape \[3\]"),
        (dict(k_chan_weight=torch.ones(3, 48), v_chan_weight=torch.ones(3, 48)), "k_chan_weight: expected head_dim"),
        (dict(v_chan_weight=-torch.ones(3, 64)), "v_chan_weight: expected finite weights >= 0"),
        (dict(k_factors=(torch.randn(3, 16, 8), torch.randn(3, 8, 32))), r"k_factors\[1\]: expected shape"),
    ],
)
def test_plan_rejects_invalid(over, match):
    """Invalid plans fail at construction with a message naming the field."""
    with pytest.raises(ValueError, match=match):
        _plan(**over)


def test_unchecked_plan_checks_shapes_and_reads_no_value(monkeypatch):
    """``check_values=False``: shapes and dtypes are still checked, values are not (nothing read), unless
    MOSAICKV_DEBUG_CHECKS=1."""
    monkeypatch.delenv("MOSAICKV_DEBUG_CHECKS", raising=False)
    bad_values = dict(k_param=torch.tensor([0, 64, 4], dtype=torch.int32), check_values=False)
    with HostSyncCounter() as count:
        p = _plan(**bad_values)
    assert count.reads == 0 and p.num_segments == 3
    with pytest.raises(ValueError, match=r"k_form: expected shape \[3\]"):
        _plan(k_form=torch.tensor([0, 1], dtype=torch.int32), check_values=False)
    monkeypatch.setenv("MOSAICKV_DEBUG_CHECKS", "1")
    with pytest.raises(ValueError, match=r"k_param: expected chan k in \[1, 63\]"):
        _plan(**bad_values)


def test_plan_uniform_helper():
    p = SegmentPlan.uniform(4, 32, 128, k_form=FORM_CHAN, k_param=16)
    assert p.k_form.tolist() == [FORM_CHAN] * 4 and p.rows().tolist() == [32] * 4
    with pytest.raises(ValueError, match="lowrank needs factors"):
        SegmentPlan.uniform(4, 32, 128, v_form=FORM_LOWRANK, v_param=2)


@pytest.mark.parametrize("d", [64, 128])
def test_plans_granules_equals_each_plans_own(d):
    """One pass over a seal's per-layer plans (mixed forms, ragged kept rows) gives every plan's own granules."""
    gen = torch.Generator().manual_seed(d)
    for n in (1, 7, 40):
        plans = [random_plan(gen, n, 64, d) for _ in range(5)]
        got = plans_granules(plans)
        assert got.shape == (5, n, 2) and got.dtype == torch.int64
        for layer, plan in enumerate(plans):
            kg, vg = plan.granules()
            assert torch.equal(got[layer, :, 0], kg) and torch.equal(got[layer, :, 1], vg)
    with pytest.raises(ValueError, match="expected plans of 3 segments of head_dim"):
        plans_granules([random_plan(gen, 3, 64, d), random_plan(gen, 4, 64, d)])
    with pytest.raises(ValueError, match="expected at least one plan"):
        plans_granules([])
