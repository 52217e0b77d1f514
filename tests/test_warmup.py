# SPDX-License-Identifier: Apache-2.0
"""Warmup enumeration (mosaickv_sglang.warmup): it covers the split counts and factor ranks serving produces, and its
runner launches every spec (Triton interpreter on the CPU, fp16 / fp32 queries; bf16 is broken there)."""

from __future__ import annotations

import itertools

import pytest
import torch
import triton

from mosaickv_sglang.kernels.sparse_decode import suggest_num_splits
from mosaickv_sglang.strategies import default_menu
from mosaickv_sglang.warmup import (
    VariantSpec,
    WarmupShape,
    enumerate_variants,
    menu_ranks,
    rank_reps,
    run_warmup,
    table_widths,
)

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def shape(**kw) -> WarmupShape:
    base = dict(num_kv_heads=8, group=4, head_dim=128, seg_size=64, dtype=torch.bfloat16, q_dtype=torch.bfloat16,
                num_layers=32, num_sms=132, read_budget_segments=64)  # fmt: skip
    base.update(kw)
    return WarmupShape(**base)


def _key(v: int) -> str:
    return "1" if v == 1 else ("D" if v % 16 == 0 else "")


@pytest.mark.parametrize("h_kv,num_sms", [(1, 132), (3, 132), (8, 132), (32, 132), (8, 78)])
def test_every_suggested_split_count_is_warmed(h_kv, num_sms):
    specs = enumerate_variants(shape(num_kv_heads=h_kv, num_sms=num_sms))
    warmed = {s.num_splits for s in specs if s.kernel == "sparse_decode_split"}
    merged = {s.num_splits for s in specs if s.kernel == "sparse_decode_merge"}
    served = {suggest_num_splits(b, h_kv, w, num_sms) for b in range(1, 257) for w in range(1, 600, 7)}
    assert served <= warmed and merged == warmed - {1}


@pytest.mark.parametrize("h_kv,budget", [(8, 64), (8, 0), (3, 5), (2, 1), (1, 300)])
def test_sel_and_segment_table_widths_cover_every_key(h_kv, budget):
    """Every sel_ids width 1..budget (or any MAX_SEGS) has the Triton keys of a warmed width."""
    specs = enumerate_variants(shape(num_kv_heads=h_kv, read_budget_segments=budget))
    key = lambda w: (_key(h_kv * w), _key(w))  # noqa: E731
    sel = {key(s.width) for s in specs if s.kernel == "sparse_decode_split"}
    hi = budget if budget > 0 else 500
    assert {key(w) for w in range(1, hi + 1)} <= sel
    assert max(s.width for s in specs if s.kernel == "sparse_decode_split") <= hi
    for kernel in ("segment_scores", "extend"):
        assert {key(w) for w in range(1, 500)} <= {key(s.width) for s in specs if s.kernel == kernel}
    assert table_widths(8, 64) == [1, 2, 3, 16]


@pytest.mark.parametrize("seg_size,head_dim", list(itertools.product((16, 32, 64, 128, 256), (64, 128))))
def test_every_sidecar_menu_rank_pair_maps_to_a_warmed_pack_variant(seg_size, head_dim):
    menu = default_menu(seg_size, head_dim, lowrank=True)
    ranks = menu_ranks(menu)
    assert ranks and menu_ranks(default_menu(seg_size, head_dim, lowrank=False)) == ()
    specs = enumerate_variants(shape(seg_size=seg_size, head_dim=head_dim, sidecar_ranks=ranks))
    side = lambda r: (triton.next_power_of_2(r), _key(r)) if r else None  # noqa: E731
    warmed = {(side(s.k_rank), side(s.v_rank)) for s in specs if s.kernel == "pack" and not s.misaligned}
    # a plan's factor width per side is its largest rank there: any menu rank, or no factors
    assert {(side(k), side(v)) for k in (0, *ranks) for v in (0, *ranks)} <= warmed
    assert len(warmed) == len([s for s in specs if s.kernel == "pack" and not s.misaligned])


def test_without_sidecar_pack_has_no_factor_variants_and_misalignment_follows_heads():
    packs = [s for s in enumerate_variants(shape()) if s.kernel == "pack"]
    assert packs == [VariantSpec("pack")]
    packs = [s for s in enumerate_variants(shape(num_kv_heads=2)) if s.kernel == "pack"]
    assert packs == [VariantSpec("pack"), VariantSpec("pack", misaligned=True)]
    assert [s for s in enumerate_variants(shape(num_kv_heads=2, num_layers=1)) if s.kernel == "pack"] == packs[:1]
    assert rank_reps([8, 16, 32, 12]) == [8, 12, 16, 32]


def test_specs_are_distinct_and_llama8b_count():
    specs = enumerate_variants(shape())
    assert len(set(specs)) == len(specs)
    # pack 1, unpack 1, extend 4, segment_scores 4, split 7 x 4, merge 6
    assert len(specs) == 44
    assert len(enumerate_variants(shape(sidecar_ranks=(8, 16, 32)))) == 44 + 15


def _tiny(q_dtype: torch.dtype, **kw) -> WarmupShape:
    base = dict(num_kv_heads=3, group=2, head_dim=64, seg_size=16, dtype=torch.float16, q_dtype=q_dtype,
                num_layers=2, num_sms=132, read_budget_segments=0, sidecar_ranks=(8,))  # fmt: skip
    base.update(kw)
    return WarmupShape(**base)


def test_runner_launches_every_spec_fp16():
    sh = _tiny(torch.float16)
    specs = enumerate_variants(sh)
    assert {s.kernel for s in specs} == {"pack", "unpack", "extend", "segment_scores", "sparse_decode_split",
                                         "sparse_decode_merge"} and any(s.misaligned for s in specs)  # fmt: skip
    count, seconds = run_warmup(specs, sh, "cpu")
    assert count == len(specs) and seconds > 0


def test_runner_subset_fp32_queries():
    sh = _tiny(torch.float32, sidecar_ranks=(8, 16))
    specs = [s for s in enumerate_variants(sh) if s.num_splits <= 2 or s.kernel == "pack"]
    assert any(s.k_rank == 16 for s in specs)
    assert run_warmup(specs, sh, "cpu")[0] == len(specs)


def test_runner_rejects_unknown_kernel():
    with pytest.raises(ValueError, match="spec.kernel: expected one of"):
        run_warmup([VariantSpec("nope")], _tiny(torch.float16), "cpu")
