# SPDX-License-Identifier: Apache-2.0
"""Warmup enumeration (mosaickv_sglang.warmup): it covers the split counts and factor ranks serving produces, and its
runner launches every spec (Triton interpreter on the CPU, fp16 / fp32 queries; bf16 is broken there)."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mosaickv_sglang import warmup
from mosaickv_sglang.kernels import pack
from mosaickv_sglang.kernels.sparse_decode import suggest_num_splits
from mosaickv_sglang.strategies import default_menu
from mosaickv_sglang.warmup import (
    VariantSpec,
    WarmupShape,
    enumerate_variants,
    menu_ranks,
    run_warmup,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # --import-mode=importlib: the helper lives beside this file
from mkv_compile_keys import Recorder  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def shape(**kw) -> WarmupShape:
    base = dict(num_kv_heads=8, group=4, head_dim=128, seg_size=64, dtype=torch.bfloat16, q_dtype=torch.bfloat16,
                num_layers=32, num_sms=132, read_budget_segments=64)  # fmt: skip
    base.update(kw)
    return WarmupShape(**base)


@pytest.mark.parametrize("h_kv,num_sms", [(1, 132), (3, 132), (8, 132), (32, 132), (8, 78)])
def test_every_suggested_split_count_is_warmed(h_kv, num_sms):
    specs = enumerate_variants(shape(num_kv_heads=h_kv, num_sms=num_sms))
    merged = {s.num_splits for s in specs if s.kernel == "sparse_decode_merge"}
    served = {suggest_num_splits(b, h_kv, w, num_sms) for b in range(1, 257) for w in range(1, 600, 7)}
    assert served - {1} <= merged
    # the split kernel takes the count at run time: one variant writing the output directly, one writing partials
    assert [s.num_splits for s in specs if s.kernel == "sparse_decode_split"] == [1, 2]


def test_table_width_kernels_have_one_variant_and_the_split_kernel_two():
    """Table widths and split counts are run-time arguments (the kernels' do_not_specialize; the backend test checks
    the keys): one extend / score_and_select variant, split kernel with one split (direct output) and with several."""
    specs = enumerate_variants(shape(read_budget_segments=5))
    by_kernel = {k: [s for s in specs if s.kernel == k] for k in ("extend", "score_and_select", "sparse_decode_split")}
    assert [len(v) for v in by_kernel.values()] == [1, 1, 2]
    assert [s.num_splits for s in by_kernel["sparse_decode_split"]] == [1, 2]


@pytest.mark.parametrize("budget, tiles", [(0, [64]), (5, [64]), (64, [64]), (65, [64, 128]), (1000, [64, 1024]),
                                           (1025, [64])])  # fmt: skip
def test_selection_specs_cover_the_sort_tiles_serving_uses(budget, tiles):
    """The top-k kernel's sort tile is its one compile-time constant: 64 when the table is no wider than the budget
    (a read-all budget, or a batch narrower than it), else the configured budget's; none above MAX_SELECT_TILE
    (torch.topk sorts those)."""
    from mosaickv_sglang.kernels.segment_scores import select_tile

    specs = [s for s in enumerate_variants(shape(read_budget_segments=budget)) if s.kernel == "score_and_select"]
    assert [select_tile(s.budget, s.width) for s in specs] == tiles
    served = {select_tile(min(budget, w) if budget > 0 else w, w) for w in range(1, 1200, 7)}
    assert {t for t in served if t <= 1024} == set(tiles)


@pytest.mark.parametrize("seg_size,head_dim", list(itertools.product((16, 32, 64, 128, 256), (64, 128))))
def test_every_sidecar_menu_rank_pair_maps_to_a_warmed_pack_variant(seg_size, head_dim, monkeypatch):
    """The pack compile keys (recorded, not launched) of sidecar-like plans with every pair of menu ranks are keys of
    the warmup's pack specs, and each spec has its own key."""
    menu = default_menu(seg_size, head_dim, lowrank=True)
    ranks = menu_ranks(menu)
    assert ranks and menu_ranks(default_menu(seg_size, head_dim, lowrank=False)) == ()
    sh = shape(seg_size=seg_size, head_dim=head_dim, sidecar_ranks=ranks)
    keys = set()
    monkeypatch.setattr(pack, "_pack_segments_main_kernel", Recorder("pack", pack._pack_segments_main_kernel, keys,
                                                                     launch=False))  # fmt: skip
    inp = warmup._Inputs(sh, torch.device("cpu"))
    packs = [s for s in enumerate_variants(sh) if s.kernel == "pack"]
    assert len(packs) == 2
    for spec in packs:
        warmup._run_one(inp, spec)
    warmed = set(keys)
    assert len(warmed) == len(packs)
    # a plan's factor width per side is its largest rank there: any menu rank, or no factors
    for k_rank, v_rank in itertools.product((0, *ranks), repeat=2):
        inp.pack(warmup._lowrank_plan(inp, k_rank, v_rank))
    assert keys == warmed


def test_without_sidecar_pack_has_one_variant_whatever_the_heads():
    """A seal packs every layer from one whole plan (aligned), so the KV head count adds no variant."""
    for heads, layers in ((8, 32), (2, 32), (3, 1)):
        packs = [s for s in enumerate_variants(shape(num_kv_heads=heads, num_layers=layers)) if s.kernel == "pack"]
        assert packs == [VariantSpec("pack")]


def test_sidecar_adds_one_pack_variant_whatever_its_ranks():
    for ranks in ((8,), (8, 16, 32), (1, 12, 48, 64)):
        packs = [s for s in enumerate_variants(shape(num_kv_heads=2, sidecar_ranks=ranks)) if s.kernel == "pack"]
        r = max(ranks)
        assert packs == [VariantSpec("pack"), VariantSpec("pack", k_rank=r, v_rank=r)]


def test_specs_are_distinct_and_llama8b_count():
    specs = enumerate_variants(shape())
    assert len(set(specs)) == len(specs)
    # pack 1, unpack 1, extend 1, score_and_select 1, split 2, merge 6
    assert len(specs) == 12
    assert len(enumerate_variants(shape(sidecar_ranks=(8, 16, 32)))) == 12 + 1


def _tiny(q_dtype: torch.dtype, **kw) -> WarmupShape:
    base = dict(num_kv_heads=3, group=2, head_dim=64, seg_size=16, dtype=torch.float16, q_dtype=q_dtype,
                num_layers=2, num_sms=132, read_budget_segments=0, sidecar_ranks=(8,))  # fmt: skip
    base.update(kw)
    return WarmupShape(**base)


def test_runner_launches_every_spec_fp16():
    sh = _tiny(torch.float16)
    specs = enumerate_variants(sh)
    assert {s.kernel for s in specs} == {"pack", "unpack", "extend", "score_and_select", "sparse_decode_split",
                                         "sparse_decode_merge"}  # fmt: skip
    count, seconds = run_warmup(specs, sh, "cpu")
    assert count == len(specs) and seconds > 0


def test_runner_subset_fp32_queries():
    sh = _tiny(torch.float32, sidecar_ranks=(8, 16))
    specs = [s for s in enumerate_variants(sh) if s.num_splits <= 2 or s.kernel == "pack"]
    assert any(s.k_rank == 16 for s in specs)
    assert run_warmup(specs, sh, "cpu")[0] == len(specs)


def test_bracket_kernel_is_warmed_only_when_the_planner_takes_it(monkeypatch):
    """``MOSAICKV_LAGRANGE_BRACKET=kernel`` adds one bracket spec (the backend's shape says so), and the runner
    launches it; the default adds none."""
    from mosaickv_sglang.lagrange import BRACKET_ENV_VAR

    assert not any(s.kernel == "lagrange_bracket" for s in enumerate_variants(shape()))
    specs = enumerate_variants(shape(lagrange_bracket=True))
    assert specs[-1] == VariantSpec("lagrange_bracket") and len(specs) == 12 + 1
    assert run_warmup([VariantSpec("lagrange_bracket")], _tiny(torch.float16), "cpu")[0] == 1
    backend = _stand_in_backend()
    monkeypatch.delenv(BRACKET_ENV_VAR, raising=False)
    assert not warmup.backend_shape(backend).lagrange_bracket
    monkeypatch.setenv(BRACKET_ENV_VAR, "kernel")
    assert warmup.backend_shape(backend).lagrange_bracket


@pytest.mark.parametrize("graph_pages", [None, 3, 4])
def test_the_planners_lagrange_launches_compile_no_variant_the_warmup_missed(monkeypatch, graph_pages):
    """The Lagrangian kernels' compile keys of a seal's planner, in one call and through a seal graph's bucket (exact
    or padded), are the warmup spec's keys: the budgets are a view into the planner's metadata, 8 bytes past a
    16-byte boundary when its segment count is odd (3 pages of 3 KV heads), unlike the warmup's."""
    from mosaickv_sglang.kernels import lagrange_bracket, lagrange_fixup, lagrange_start
    from mosaickv_sglang.lagrange import BRACKET_ENV_VAR
    from mosaickv_sglang.strategies import axes_menu
    from test_seal_graphs import PoolCase, budget

    monkeypatch.setenv(BRACKET_ENV_VAR, "kernel")
    keys = set()
    for module, name in ((lagrange_start, "_start_kernel"), (lagrange_bracket, "_bracket_round_kernel"),
                         (lagrange_bracket, "_bracket_end_kernel"), (lagrange_fixup, "_fixup_kernel")):
        monkeypatch.setattr(module, name, Recorder(name, getattr(module, name), keys))
    sh = _tiny(torch.float16, lagrange_bracket=True)
    monkeypatch.delenv(BRACKET_ENV_VAR)  # the warmup launches the kernels whatever the environment says
    warmup._run_one(warmup._Inputs(sh, torch.device("cpu")), VariantSpec("lagrange_bracket"))
    monkeypatch.setenv(BRACKET_ENV_VAR, "kernel")
    warmed = set(keys)
    assert sorted(k[0] for k in warmed) == ["_bracket_end_kernel", "_bracket_round_kernel", "_fixup_kernel",
                                            "_start_kernel"]
    h, s, d, pages = 3, 16, 64, 3
    case = PoolCase(3, 2, h, s, d, 4, 4, 8, torch.float16)
    menu = axes_menu("both", s, d, lowrank=False)
    phys, sinks = np.array([5, 1, 6], dtype=np.int64), np.array([True, False, False])
    if graph_pages is None:
        case.one_call(phys, sinks, budget(pages, h, s, d, sinks, 3.0), menu)
    else:
        graphs = case.graphs([graph_pages], menu)
        assert graphs.plan(phys, case.window, np.repeat(sinks, h), budget(pages, h, s, d, sinks, 3.0)) is not None
    assert len(keys) > 0 and keys == warmed


def _stand_in_backend():
    from types import SimpleNamespace

    pool = SimpleNamespace(dtype=torch.float16, layer_num=2)
    return SimpleNamespace(pool=pool, sealer=SimpleNamespace(sidecar=None), num_kv_heads=2, num_q_heads=4,
                           head_dim=64, page_size=16, num_sms=132,
                           config=SimpleNamespace(decode_read_budget=0))  # fmt: skip


def test_runner_rejects_unknown_kernel():
    with pytest.raises(ValueError, match="spec.kernel: expected one of"):
        run_warmup([VariantSpec("nope")], _tiny(torch.float16), "cpu")
