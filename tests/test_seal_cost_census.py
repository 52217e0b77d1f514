# SPDX-License-Identifier: Apache-2.0
"""bench.op_census and bench.seal_cost's op census: ops are classified by kind, counted per call (non-zero, the same
in two runs), grow with the layers where the estimator's chunks split, and ``--profile`` writes its tables."""

from __future__ import annotations

import gzip
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import seal_cost
from bench.op_census import OpCensus, by_function
from mosaickv_sglang.plan_layers import plan_fast_layers

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # --import-mode=importlib puts no test folder on sys.path
    sys.path.insert(0, str(TESTS))

from test_plan_layers import budget_for, layer_case  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = "--kv-heads 2 --pages 3 --page-size 16 --head-dim 64 --threads 1 --repeats 1 --warmup 0 --json"


def _run(argv: str, capsys) -> dict:
    report = seal_cost.main(argv.split())
    printed = json.loads(capsys.readouterr().out)
    assert printed["one_call"].get("ops") == report["one_call"].get("ops")
    return report


def test_census_classifies_kernels_views_allocs_and_transfers():
    """Views (``view``, slices, ``t``, the ``_unsafe_view`` after a reshape's copy) and allocations launch nothing;
    arithmetic, ``clone``, a reshape that copies and dtype casts are kernels; ``item`` is a transfer."""
    x = torch.randn(4, 8)
    with OpCensus() as census:
        x.view(8, 4)
        x[1:]
        x + 1
        torch.empty(3)
        s = x.sum()
        x.t().reshape(-1)  # clone + _unsafe_view
        x.double()
        x.float()  # already fp32: dispatches nothing
        s.item()
    assert dict(census.counts) == {"kernel": 4, "view": 4, "alloc": 1, "transfer": 1, "triton": 0}
    assert census.by_name["kernel:clone"] == 1 and census.by_name["view:_unsafe_view"] == 1
    assert census.by_name["kernel:_to_copy"] == 1 and census.by_name["transfer:_local_scalar_dense"] == 1
    assert census.total == 10


def test_census_counts_a_triton_launch_once_not_the_ops_inside_it():
    """A Triton launch is one ``triton`` op at its caller's site, whatever the interpreter dispatches to run it on the
    CPU; the launchers are given back afterwards."""
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    runs = (JITFunction.run, InterpretedFunction.run)

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)

    x = torch.zeros(5)
    with OpCensus(site_roots=("test_seal_cost_census",)) as census:
        add_one[(1,)](x, 5, BLOCK=8)
        add_one[(1,)](x, 5, BLOCK=8)
        x + 1
    assert torch.equal(x, torch.full((5,), 2.0))
    assert census.counts["triton"] == 2 and census.counts["kernel"] == 1, dict(census.counts)
    assert census.by_name["triton:add_one"] == 2
    assert sum(v for k, v in census.by_site.items() if "test_census_counts_a_triton_launch" in k) == 3
    assert (JITFunction.run, InterpretedFunction.run) == runs


def test_census_counts_each_kernels_traffic_and_the_products_flops():
    """A kernel op's bytes are its arguments' and results' distinct elements (a broadcast input once, an in-place
    result that is its argument once); views move nothing; matrix products count 2*M*N*K multiply-add flops."""
    x, y = torch.randn(100, 8), torch.randn(100, 8, dtype=torch.float16)
    row = torch.randn(1, 8).expand(100, 8)
    a, b = torch.randn(3, 5, 7), torch.randn(3, 7, 2)
    with OpCensus() as census:
        x.view(800)
        x + y  # fp32 + fp16 -> fp32: 3200 + 1600 + 3200
        x * row  # 3200 + 32 + 3200
        x.add_(1.0)  # 3200
        torch.bmm(a, b)
        torch.addmm(torch.zeros(5, 2), a[0], b[0])
    assert census.bytes_by_name["add"] == 3200 + 1600 + 3200 and census.bytes_by_name["add_"] == 3200
    assert census.bytes_by_name["mul"] == 3200 + 32 + 3200
    assert census.bytes_by_name["bmm"] == (105 + 42 + 30) * 4
    assert census.flops == 2 * 3 * 5 * 2 * 7 + 2 * 5 * 2 * 7
    assert census.total_bytes == sum(census.bytes_by_site.values()) == sum(census.bytes_by_name.values())
    report = census.report()
    assert report["total_bytes"] == census.total_bytes and report["flops"] == census.flops
    assert list(report["bytes_by_name"])[0] == "add"
    assert sum(report["bytes_by_function"].values()) == census.total_bytes
    assert report["kernel_ops_by_function"] == {"<other>": 6}  # no site under the default root


def test_by_function_sums_the_sites_of_each_function():
    sites = Counter({"planner.py:10 (f)": 3, "planner.py:12 (f)": 4, "planner.py:30 (g)": 5, "<other>": 1})
    assert by_function(sites) == {"planner.py (f)": 7, "planner.py (g)": 5, "<other>": 1}


def test_seal_cost_reports_a_stable_census_of_each_path(capsys):
    """One call dispatches a non-zero number of ops, split by kind; the top-20 tables are consistent with the totals;
    a second run counts exactly the same ops; the one-call path dispatches fewer kernels than the per-layer one."""
    first = _run(f"--layers 3 {TINY}", capsys)
    second = _run(f"--layers 3 {TINY}", capsys)
    assert first["identical_plans"]
    for path in ("per_layer", "one_call"):
        r = first[path]
        assert r["ops"] == sum(r["ops_by_kind"].values()) and r["ops_by_kind"]["kernel"] > 0
        assert 0 < len(r["ops_by_name"]) <= 20 and 0 < len(r["kernel_ops_by_name"]) <= 20
        assert sum(r["kernel_ops_by_name"].values()) <= r["ops_by_kind"]["kernel"]
        assert all(name.split(":", 1)[0] in r["ops_by_kind"] for name in r["ops_by_name"])
        assert sum(r["kernel_ops_by_site"].values()) <= r["ops_by_kind"]["kernel"]
        assert all(site.split(":", 1)[0].endswith(".py") for site in r["kernel_ops_by_site"] if site != "<other>")
        for key in ("ops", "ops_by_kind", "ops_by_name", "kernel_ops_by_name", "kernel_ops_by_site"):
            assert r[key] == second[path][key], (path, key)
    assert first["one_call"]["ops_by_kind"]["kernel"] < first["per_layer"]["ops_by_kind"]["kernel"]


def test_seal_cost_census_grows_with_layers(capsys):
    """More layers, more ops in one call (per-layer gathers at least), and many more in the per-layer path."""
    small = _run(f"--layers 2 {TINY}", capsys)
    large = _run(f"--layers 4 {TINY}", capsys)
    for path in ("per_layer", "one_call"):
        assert large[path]["ops_by_kind"]["kernel"] > small[path]["ops_by_kind"]["kernel"], path
    per_layer = (large["per_layer"]["ops_by_kind"]["kernel"] - small["per_layer"]["ops_by_kind"]["kernel"]) / 2
    one_call = (large["one_call"]["ops_by_kind"]["kernel"] - small["one_call"]["ops_by_kind"]["kernel"]) / 2
    assert one_call < per_layer


def _kernel_ops(layers: int, max_segments: int) -> int:
    keys, values, queries, heads = layer_case(5, layers, 2, 2, 16, 64, 2)
    n = 4
    ad = np.zeros(n, dtype=bool)
    budgets = [budget_for(n, 16, 64, ad, 3.0)] * layers
    with OpCensus() as census:
        plan_fast_layers(keys, values, budget_bytes=budgets, queries=queries, group_ids=heads, always_dense=ad,
                         max_segments=max_segments)  # fmt: skip
    return census.counts["kernel"]


def test_kernel_ops_grow_with_the_chunks_of_the_estimator():
    """With one layer per chunk (``max_segments`` = one layer's segments) every added layer adds an estimator run, so
    the census grows by far more per layer than with all layers in one chunk."""
    one_chunk = _kernel_ops(4, 1 << 20) - _kernel_ops(2, 1 << 20)
    per_layer_chunks = _kernel_ops(4, 4) - _kernel_ops(2, 4)
    assert _kernel_ops(2, 4) > _kernel_ops(2, 1 << 20) > 0
    assert per_layer_chunks > one_chunk + 2 * 50  # an estimator run is well over 50 kernel ops


def test_seal_cost_chunk_options_reach_the_sealers_planner(capsys):
    """``--max-segments`` bounds the one-call planner's chunks through the sealer: one layer a chunk dispatches more
    kernels than the default (all layers in one chunk here), with the same plans and no peak memory report off CUDA."""
    default = _run(f"--layers 3 {TINY}", capsys)
    layered = _run(f"--layers 3 {TINY} --max-segments 6", capsys)  # 3 pages x 2 heads: one layer a chunk
    assert layered["identical_plans"] and layered["config"]["max_segments"] == 6
    assert layered["one_call"]["ops_by_kind"]["kernel"] > default["one_call"]["ops_by_kind"]["kernel"] + 50
    assert layered["per_layer"]["ops_by_kind"] == default["per_layer"]["ops_by_kind"]
    assert "peak_transient_bytes" not in default["one_call"]
    with pytest.raises(ValueError, match="max_chunk_bytes: expected >= 1, got 0"):
        _run(f"--layers 3 {TINY} --max-chunk-bytes 0", capsys)


def test_profile_writes_tables_and_traces(tmp_path, capsys):
    """``--profile DIR`` writes, on the CPU, the self-CPU table and a trace of each path, listed in the report."""
    report = _run(f"--layers 2 {TINY} --no-count --profile {tmp_path}", capsys)
    assert "ops" not in report["one_call"]
    names = sorted(Path(p).name for p in report["profile"])
    assert names == ["one_call_by_self_cpu.txt", "one_call_trace.json.gz", "per_layer_by_self_cpu.txt",
                     "per_layer_trace.json.gz"]  # fmt: skip
    table = (tmp_path / "one_call_by_self_cpu.txt").read_text()
    assert "aten::bmm" in table and "Self CPU" in table
    with gzip.open(tmp_path / "one_call_trace.json.gz", "rt") as f:
        assert json.load(f)["traceEvents"]


def test_profile_with_graph_pages_adds_one_graphed_plan(tmp_path, capsys):
    """With ``--graph-pages``, ``--profile`` also profiles the graphed one call (off CUDA its padded planner runs
    eagerly), once, after the run that would capture the graphs."""
    report = _run(f"--layers 2 {TINY} --no-count --graph-pages 4 --profile {tmp_path}", capsys)
    names = sorted(Path(p).name for p in report["profile"])
    assert names[:2] == ["graphed_by_self_cpu.txt", "graphed_trace.json.gz"] and len(names) == 6
    with gzip.open(tmp_path / "graphed_trace.json.gz", "rt") as f:
        ops = [e for e in json.load(f)["traceEvents"] if e.get("name") == "aten::bmm"]
    with gzip.open(tmp_path / "one_call_trace.json.gz", "rt") as f:
        assert len(ops) == len([e for e in json.load(f)["traceEvents"] if e.get("name") == "aten::bmm"]) > 0


def test_profile_with_graph_pages_and_the_other_bracket_adds_its_graphed_plan(tmp_path, capsys):
    """With ``--graph-pages`` and ``--also-lagrange-bracket kernel``, ``--profile`` also profiles the graphed one call
    with the kernel bracket: its trace lacks the torch rounds' ``exp`` of each round's points (the kernels run in the
    interpreter on the CPU, their math in numpy)."""
    from mosaickv_sglang import lagrange

    report = _run(f"--layers 2 {TINY} --no-count --graph-pages 4 --also-lagrange-bracket kernel --profile {tmp_path}",
                  capsys)  # fmt: skip
    names = sorted(Path(p).name for p in report["profile"])
    assert names[:4] == ["graphed_bracket_by_self_cpu.txt", "graphed_bracket_trace.json.gz", "graphed_by_self_cpu.txt",
                         "graphed_trace.json.gz"] and len(names) == 8  # fmt: skip

    def exps(name: str) -> int:
        with gzip.open(tmp_path / f"{name}_trace.json.gz", "rt") as f:
            return sum(e.get("name") == "aten::exp" for e in json.load(f)["traceEvents"])

    assert exps("graphed") - exps("graphed_bracket") == lagrange._ROUNDS
    assert lagrange.bracket_method() == "torch"


def test_seal_cost_times_the_other_estimate_terms_method_and_compares_plans(capsys):
    report = seal_cost.main("--layers 2 --kv-heads 2 --pages 3 --head-dim 64 --no-count --also-estimate-terms "
                            "kernel".split())
    assert report["one_call_also"]["seconds"] > 0 and report["also_differing_segments"] == 0
    assert "not on CUDA: both took the torch ops" in capsys.readouterr().out
    from mosaickv_sglang import planner

    assert planner.ESTIMATE_TERMS_ON_CUDA == "torch"  # restored after the second timing


def test_seal_cost_counts_the_bracket_kernel_against_the_torch_rounds(capsys, monkeypatch):
    """--also-lagrange-bracket kernel: the same plans, Triton launches (the start, one a round of the bracket, its end
    and the choice's fix-up) instead of a few hundred kernel ops; the environment as it was afterwards."""
    from mosaickv_sglang import lagrange

    monkeypatch.delenv(lagrange.BRACKET_ENV_VAR, raising=False)
    report = seal_cost.main(f"--layers 2 {TINY} --also-lagrange-bracket kernel".split())
    torch_ops, kernel_ops = report["one_call"]["ops_by_kind"], report["one_call_bracket"]["ops_by_kind"]
    assert report["bracket_differing_segments"] == 0
    assert torch_ops["triton"] == 0 and kernel_ops["triton"] == 1 + lagrange._ROUNDS + 1 + 1
    assert torch_ops["kernel"] - kernel_ops["kernel"] - kernel_ops["triton"] >= 200, (torch_ops, kernel_ops)
    assert lagrange.bracket_method() == "torch"
    capsys.readouterr()


def test_seal_cost_plans_through_seal_graphs_with_each_bracket(capsys):
    """--graph-pages with --also-lagrange-bracket: the graphed planner once with each bracket search, the same plans."""
    report = seal_cost.main("--layers 2 --kv-heads 2 --pages 3 --page-size 16 --head-dim 64 --no-count --warmup 0 "
                            "--graph-pages 4 --also-lagrange-bracket kernel".split())
    assert report["graphed_differing_segments"] == 0 and report["graphed_bracket_differing_segments"] == 0
    assert report["graphed_bracket"]["replays"] == 1 and report["bracket_differing_segments"] == 0
    assert "seal graphs, bracket torch:" in capsys.readouterr().out


def test_seal_cost_times_seal_graphs_and_compares_plans(capsys):
    """--graph-pages: the padded planner of a 4-page bucket for a 3-page seal (off CUDA, eagerly), its plans the one
    call's, the host time of each path reported."""
    report = seal_cost.main("--layers 2 --kv-heads 2 --pages 3 --page-size 16 --head-dim 64 --no-count --warmup 0 "
                            "--graph-pages 4,8".split())
    graphed = report["graphed"]
    assert graphed["replays"] == 1 and graphed["captures"] == 0 and graphed["failed"] is None
    assert report["graphed_differing_segments"] == 0 and 0 < graphed["host_seconds"] <= graphed["seconds"]
    out = capsys.readouterr().out
    assert "seal graphs 4,8" in out and "seal graphs: 1 replays, 0 captured" in out


def test_differing_segments_counts_rows_that_differ_in_any_field():
    from types import SimpleNamespace

    import torch

    def plan(keep, kf):
        z = torch.zeros(len(kf), dtype=torch.int64)
        return SimpleNamespace(token_keep=torch.tensor(keep), k_form=torch.tensor(kf), k_param=z, v_form=z, v_param=z)

    a = [plan([[1, 1], [1, 0], [0, 1]], [0, 1, 1])]
    b = [plan([[1, 1], [1, 1], [0, 1]], [0, 1, 2])]
    assert seal_cost.differing_segments(a, a) == 0
    assert seal_cost.differing_segments(a, b) == 2


def test_cuda_methods_on_cpu_counts_the_served_kernels_instead_of_their_torch_ops(capsys, monkeypatch):
    """--cuda-methods-on-cpu with the kernel methods: the chan drop and estimate terms kernels launch on the CPU (in
    the interpreter), replacing their torch ops, with the same plans; the planner's module is as it was afterwards."""
    from mosaickv_sglang import planner

    for name in ("CHAN_DROP_METHOD_ON_CUDA", "ESTIMATE_TERMS_ON_CUDA"):  # seal_cost.main sets them
        monkeypatch.setattr(planner, name, getattr(planner, name))
    patched = planner._channel_kernels_take
    shape = "--layers 2 --kv-heads 1 --pages 2 --page-size 16 --head-dim 64 --threads 1 --repeats 1 --warmup 0"
    torch_report = seal_cost.main(f"{shape} --json".split())
    served = seal_cost.main(f"{shape} --json --chan-drop kernel --estimate-terms kernel --cuda-methods-on-cpu".split())
    capsys.readouterr()
    torch_ops, served_ops = torch_report["one_call"]["ops_by_kind"], served["one_call"]["ops_by_kind"]
    assert torch_ops["triton"] == 0 and served_ops["triton"] > 0, (torch_ops, served_ops)
    assert torch_ops["kernel"] - served_ops["kernel"] >= 20, (torch_ops, served_ops)
    assert not any("_chan_terms_torch" in site for site in served["one_call"]["kernel_ops_by_site"])
    assert served["identical_plans"]
    assert planner._channel_kernels_take is patched


def test_cuda_methods_on_cpu_refuses_another_device_or_no_interpreter(monkeypatch):
    with pytest.raises(SystemExit, match="expected --device cpu"):
        seal_cost.main("--cuda-methods-on-cpu --device cuda".split())
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit, match="expected TRITON_INTERPRET=1"):
        seal_cost.main(["--cuda-methods-on-cpu"])
