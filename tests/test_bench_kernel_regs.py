# SPDX-License-Identifier: Apache-2.0
"""bench.kernel_regs: the ptxas report parser, the occupancy arithmetic, and a real ahead-of-time compile for sm_90a
on this CPU-only machine (the chan rank sort kernel: no spills, many warps per SM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import kernel_regs as K

PTXAS = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_k' for 'sm_90a'
ptxas info    : Function properties for _k
    64 bytes stack frame, 60 bytes spill stores, 52 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 64 bytes cumulative stack size
"""


def test_parse_ptxas_reads_registers_and_spills():
    assert K.parse_ptxas(PTXAS) == {"registers": 255, "spill_store_bytes": 60, "spill_load_bytes": 52,
                                    "stack_bytes": 64}  # fmt: skip
    no_spill = PTXAS.replace("64 bytes stack frame, 60 bytes spill stores, 52 bytes spill loads",
                             "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads").replace("255", "48")
    assert K.parse_ptxas(no_spill)["registers"] == 48 and K.parse_ptxas(no_spill)["spill_store_bytes"] == 0
    with pytest.raises(ValueError, match="expected a 'Used N registers' line"):
        K.parse_ptxas("ptxas info    : 0 bytes gmem")


@pytest.mark.parametrize(
    "regs, warps, shared, blocks",
    [(255, 4, 0, 2), (128, 4, 0, 4), (64, 4, 0, 8), (48, 4, 8192, 10), (32, 4, 0, 16), (255, 8, 0, 1),
     (64, 4, 100 * 1024, 2), (33, 4, 0, 12)],
)
def test_occupancy_by_registers_shared_memory_and_warps(regs, warps, shared, blocks):
    """65,536 registers per SM allocated per warp in units of 256 (8 a thread), 228 KB of shared memory, 64 warps."""
    assert K.occupancy(regs, warps, shared) == blocks


def _kernel_regs_json(*args):
    """``python -m bench.kernel_regs ARGS --json`` in a child without TRITON_INTERPRET (which the test session sets),
    so that Triton and the ptxas in its wheel compile for sm_90a: its variants."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "bench.kernel_regs", *args, "--json"], capture_output=True, text=True,
                         env=env, timeout=300, cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_chan_rank_sort_compiles_for_hopper_without_spills():
    """Compiled ahead of time for sm_90a by Triton and the ptxas in its wheel (in a child without TRITON_INTERPRET,
    which the test session sets): the sort kernel (the planner's rank kernel) keeps every value in registers, with
    room for at least 32 warps per SM."""
    variants = {v["kernel"]: v for v in _kernel_regs_json("--kernel", "chan_rank", "--head-dim", "128")}
    sort = variants["chan_rank_sort"]
    assert sort["spill_store_bytes"] == sort["spill_load_bytes"] == 0
    assert 0 < sort["registers"] <= 64 and sort["warps_per_sm"] >= 32
    assert variants["chan_rank_count"]["config"] == {"head_dim": 128, "block_r": 8}


def test_sparse_decode_register_cap_reaches_ptxas():
    """``--maxnreg`` caps the split kernel's registers (ptxas spills the rest, and says so); at head_dim 64 a cap of
    168 holds it at 3 blocks of 4 warps per SM, where uncapped ptxas takes more registers for 2."""
    tight, loose = _kernel_regs_json("--kernel", "sparse_decode", "--head-dim", "64", "--maxnreg", "96", "168")
    assert (tight["config"]["maxnreg"], loose["config"]["maxnreg"]) == (96, 168)
    assert tight["registers"] <= 96 and tight["spill_store_bytes"] > 0 and tight["blocks_per_sm"] >= 5
    assert loose["registers"] <= 168 and loose["blocks_per_sm"] == 3


def test_segment_select_compiles_for_hopper():
    """The selection's top-k kernel (int64 keys through ``tl.sort``, a block folded to its best tile by
    ``tl.reshape`` and ``tl.max``) compiles for sm_90a at every sort tile it serves, each small enough for 16 warps
    per SM."""
    variants = _kernel_regs_json("--kernel", "segment_select")
    assert [v["config"] for v in variants] == [{"tile": 64, "block": 1024}, {"tile": 128, "block": 1024},
                                               {"tile": 1024, "block": 1024}]  # fmt: skip
    for v in variants:
        assert v["kernel"] == "segment_select" and 0 < v["registers"] <= 128 and v["warps_per_sm"] >= 16


def test_an_interpreted_kernel_is_refused_with_the_reason():
    """Under TRITON_INTERPRET (this session) the kernels are not compilable: one error naming the variable."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("kernels are compiled in this session")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET is set"):
        K.chan_rank_variants([64])


def test_specialize_follows_the_launchers_rules():
    """As Triton specializes a launch: pointers aligned, an int equal to 1 a constant, an int divisible by 16 marked,
    neither for an argument in do_not_specialize; a missing value is an error naming it."""
    from types import SimpleNamespace as P

    fn = P(__name__="k", params=[P(name="x_ptr", is_constexpr=False, do_not_specialize=False),
                                 P(name="stride_a", is_constexpr=False, do_not_specialize=False),
                                 P(name="stride_b", is_constexpr=False, do_not_specialize=False),
                                 P(name="width", is_constexpr=False, do_not_specialize=True),
                                 P(name="odd", is_constexpr=False, do_not_specialize=False),
                                 P(name="scale", is_constexpr=False, do_not_specialize=False),
                                 P(name="BLOCK", is_constexpr=True, do_not_specialize=False)])  # fmt: skip
    values = {"stride_a": 1, "stride_b": 128, "width": 64, "odd": 7}
    sig, consts, attrs = K.specialize(fn, {"x_ptr": "*bf16"}, ("scale",), values, {"BLOCK": 32})
    assert sig == {"x_ptr": "*bf16", "stride_a": "constexpr", "stride_b": "i32", "width": "i32", "odd": "i32",
                   "scale": "fp32", "BLOCK": "constexpr"}  # fmt: skip
    assert consts == {"BLOCK": 32, "stride_a": 1}
    assert attrs == {(0,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}
    with pytest.raises(ValueError, match="expected a representative value for odd"):
        K.specialize(fn, {"x_ptr": "*bf16"}, ("scale",), {"stride_a": 1, "stride_b": 128, "width": 64}, {"BLOCK": 32})


def test_estimate_terms_kernel_compiles_for_hopper_without_spills():
    """The fast estimator's channel terms kernel, compiled ahead of time for sm_90a at head_dim 64 and 128 (its IEEE
    fp32 ``tl.dot`` included): no spills, at least 4 warps per SM."""
    variants = _kernel_regs_json("--kernel", "estimate_terms", "--head-dim", "64", "128")
    assert [v["config"]["head_dim"] for v in variants] == [64, 128]
    for v in variants:
        assert v["kernel"] == "estimate_terms" and v["spill_store_bytes"] == v["spill_load_bytes"] == 0
        assert 0 < v["registers"] <= 255 and v["warps_per_sm"] >= 4


def test_pack_keeps_its_wide_loads_only_with_the_layers_alignment():
    """The pack kernel as a seal launches it (one launch, every layer) compiles for sm_90a without spills at head_dim
    64 and reads K/V rows with 16-byte loads when told the layers' offsets are 16-element aligned; told nothing
    (LAYER_ALIGN 1), it loses them."""
    aligned, unaligned = _kernel_regs_json("--kernel", "pack", "--head-dim", "64", "--layer-align", "16", "1")
    assert (aligned["config"]["layer_align"], unaligned["config"]["layer_align"]) == (16, 1)
    assert aligned["spill_store_bytes"] == 0 and aligned["blocks_per_sm"] >= 3
    assert aligned["v4_loads"] > 0 and unaligned["v4_loads"] == 0


def test_an_unknown_chan_mode_is_refused_with_the_known_ones(capsys):
    """A chan mode the kernel does not have is an argument error naming the modes, not a variant compiled under that
    label (the kernel falls back to ptr-gather for any other number)."""
    with pytest.raises(SystemExit) as exc:
        K._parse_args(["--kernel", "sparse_decode", "--chan-mode", "2", "5"])
    assert exc.value.code == 2
    assert "invalid choice: 5 (choose from 0, 1, 2, 3, 4)" in capsys.readouterr().err
    assert K._parse_args(["--chan-mode", "0", "4"]).chan_mode == [0, 4]


def test_lagrange_kernels_compile_for_hopper_without_spills():
    """The planner's Lagrangian kernels (fp64 ``exp``/``log`` from libdevice, no multiply-add fusion, segment,
    candidate, lambda, block and round counts not specialized) compiled ahead of time for sm_90a: a round of the
    bracket search, its end, the start and the choice's fix-up, no spills."""
    variants = _kernel_regs_json("--kernel", "lagrange_bracket")
    assert [v["kernel"] for v in variants] == ["lagrange_bracket", "lagrange_bracket_end", "lagrange_start",
                                               "lagrange_fixup"]
    assert variants[0]["config"] == {"segments": 1024, "candidates": 80, "block_n": 32, "block_c": 16}
    for v in variants:
        assert v["spill_store_bytes"] == v["spill_load_bytes"] == 0 and 0 < v["registers"] <= 255, v
