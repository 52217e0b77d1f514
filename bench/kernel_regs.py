# SPDX-License-Identifier: Apache-2.0
"""Registers, spills and shared memory of our Triton kernels compiled for Hopper, on any machine (no GPU needed).

Each kernel variant is compiled ahead of time for ``sm_90a`` (``triton.compile`` with a ``GPUTarget``), specialized as
Triton's launcher would specialize a launch with the strides of the 8B shape's buffers (:func:`specialize`), and the
PTX is assembled by the ``ptxas`` that ships in Triton's wheel with ``-v``: registers per thread, spill bytes, stack
frame, plus Triton's shared memory and the PTX's 16-byte (``v4``) global loads. From those, the resident blocks per
SM (65,536 registers, 228 KB of shared memory, 64 warps per SM on an H100/H200). A decode kernel whose loads wait on
each other needs many warps in flight to reach HBM bandwidth; a variant at 255 registers keeps very few. The numbers
come from the compiler, not a GPU: time a variant on one before taking it (``python -m bench.decode_speed --tune``).

    python -m bench.kernel_regs                       # every kernel, default launches
    python -m bench.kernel_regs --kernel sparse_decode --head-dim 128 --block-n 32 64 --warps 4 8 --json
    python -m bench.kernel_regs --kernel sparse_decode --maxnreg 128 168   # register caps: what spills
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import mosaickv_sglang.kernels  # noqa: F401  (maps the kernels package, as the other benches do)
from mosaickv_sglang.kernels._triton._common import CHAN_MODE_NAMES
from mosaickv_sglang.kernels._triton.chan_rank import _chan_rank_count_kernel, _chan_rank_sort_kernel
from mosaickv_sglang.kernels._triton.estimate_terms import _chan_terms_kernel
from mosaickv_sglang.kernels._triton.lagrange_bracket import _bracket_end_kernel, _bracket_round_kernel
from mosaickv_sglang.kernels._triton.lagrange_fixup import _fixup_kernel
from mosaickv_sglang.kernels._triton.lagrange_start import _start_kernel
from mosaickv_sglang.kernels._triton.pack import _pack_segments_main_kernel
from mosaickv_sglang.kernels._triton.segment_scores import _segment_scores_main_kernel, _segment_select_kernel
from mosaickv_sglang.kernels._triton.sparse_decode import _sparse_decode_split_kernel

KERNELS = ("sparse_decode", "segment_scores", "segment_select", "chan_rank", "estimate_terms", "pack",
           "lagrange_bracket")
SM_REGISTERS = 65536
SM_SHARED_BYTES = 228 * 1024
SM_MAX_WARPS = 64
REG_ALLOC_UNIT = 8  # registers per thread are allocated in steps of 8 (per warp: 256 registers)


@dataclass(frozen=True)
class Variant:
    """One compiled variant and what ``ptxas -v`` said of it."""

    kernel: str
    config: Dict[str, object]
    num_warps: int
    num_stages: int
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int
    shared_bytes: int
    blocks_per_sm: int
    warps_per_sm: int
    v4_loads: int = 0  # ld.global of 4 words (v4) in the PTX, a static count: the loads Triton made widest


def ptxas_path() -> str:
    """The ``ptxas`` in Triton's wheel (``triton/backends/nvidia/bin``)."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(path):
        raise FileNotFoundError(f"ptxas: expected Triton's copy at {path}, got none")
    return path


def parse_ptxas(text: str) -> Dict[str, int]:
    """Registers, spill stores / loads and stack frame bytes from ``ptxas -v`` output (one kernel)."""
    out = {"registers": -1, "spill_store_bytes": 0, "spill_load_bytes": 0, "stack_bytes": 0}
    for line in text.splitlines():
        words = line.replace(",", " ").split()
        for i, w in enumerate(words[:-1]):
            if w == "Used" and words[i + 2] == "registers":
                out["registers"] = int(words[i + 1])
        if "spill stores" in line:
            nums = [int(w) for w in words if w.isdigit()]
            out["stack_bytes"], out["spill_store_bytes"], out["spill_load_bytes"] = nums[0], nums[1], nums[2]
    if out["registers"] < 0:
        raise ValueError(f"ptxas output: expected a 'Used N registers' line, got {text[:300]!r}")
    return out


def occupancy(registers: int, num_warps: int, shared_bytes: int) -> int:
    """Blocks of ``num_warps`` warps one SM holds at once, by registers, shared memory and warps."""
    per_warp = -(-registers * 32 // (REG_ALLOC_UNIT * 32)) * REG_ALLOC_UNIT * 32
    by_regs = SM_REGISTERS // (per_warp * num_warps)
    by_shared = SM_SHARED_BYTES // shared_bytes if shared_bytes else by_regs
    return max(0, min(by_regs, by_shared, SM_MAX_WARPS // num_warps))


Attrs = Dict[Tuple[int, ...], list]


def specialize(fn, pointers: Dict[str, str], floats: Sequence[str], values: Dict[str, int],
               constexprs: Dict[str, object]) -> Tuple[Dict[str, str], Dict[str, object], Attrs]:  # fmt: skip
    """Signature, constexprs and attributes of ``fn`` as Triton's launcher specializes a real launch: every pointer
    16-byte aligned (``tt.divisibility`` 16) unless the kernel lists it in ``do_not_specialize_on_alignment``, an
    integer argument equal to 1 a constant and one divisible by 16 marked so, unless the kernel lists it in
    ``do_not_specialize``; ``values`` are the integers of a representative launch (strides decide vectorization, so
    they matter)."""
    sig: Dict[str, str] = {}
    consts = dict(constexprs)
    attrs: Attrs = {}
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr or name in consts:
            sig[name] = "constexpr"
            if name not in consts:
                raise ValueError(f"{fn.__name__}: expected a value for constexpr {name}, got none")
        elif name in pointers:
            sig[name] = pointers[name]
            if not getattr(p, "do_not_specialize_on_alignment", False):
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            sig[name] = "fp32"
        else:
            if name not in values:
                raise ValueError(f"{fn.__name__}: expected a representative value for {name}, got none")
            v = int(values[name])
            if not p.do_not_specialize and v == 1:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32"
                if not p.do_not_specialize and v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def compile_variant(name: str, fn, pointers: Dict[str, str], floats: Sequence[str], values: Dict[str, int],
                    constexprs: Dict[str, object], num_warps: int, num_stages: int,
                    config: Dict[str, object], maxnreg: Optional[int] = None,
                    enable_fp_fusion: bool = True) -> Variant:  # fmt: skip
    """Compile ``fn`` for sm_90a, specialized as a launch with ``values`` would be, and read its resources.
    ``maxnreg``, ``enable_fp_fusion``: the launch options of those names (a register cap per thread, ptxas spilling
    what does not fit; whether a multiply and an add may become one fused multiply-add)."""
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError(f"{name}: expected a compiled Triton kernel, got {type(fn).__name__} (TRITON_INTERPRET is "
                           "set: run without it)")
    sig, consts, attrs = specialize(fn, pointers, floats, values, constexprs)
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages, "maxnreg": maxnreg,
                                       "enable_fp_fusion": enable_fp_fusion})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        res = subprocess.run([ptxas_path(), "--gpu-name", "sm_90a", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)  # fmt: skip
    info = parse_ptxas(res.stdout + res.stderr)
    shared = int(compiled.metadata.shared)
    blocks = occupancy(info["registers"], num_warps, shared)
    v4_loads = len(re.findall(r"\bld\.global[\w:.]*\.v4\.", compiled.asm["ptx"]))
    return Variant(name, config, num_warps, num_stages, shared_bytes=shared, blocks_per_sm=blocks,
                   warps_per_sm=blocks * num_warps, v4_loads=v4_loads, **info)  # fmt: skip


# Representative launches: the Llama-3.1-8B shape (32 q / 8 KV heads), batch 32, 16 splits, contiguous tensors
# (the strides SGLang's buffers and the backend's scratch have); widths of tables are not specialized anyway.
def _decode_values(d: int, h_q: int = 32, h_kv: int = 8, splits: int = 16, budget: int = 64) -> Dict[str, int]:
    return dict(stride_q_b=h_q * d, stride_q_h=d, stride_q_d=1, stride_desc_n=8, stride_sel_b=h_kv * budget,
                stride_sel_h=budget, stride_sel_i=1, nsel=budget, num_splits=splits, stride_kt_t=h_kv * d,
                stride_kt_h=d, stride_kt_d=1, stride_vt_t=h_kv * d, stride_vt_h=d, stride_vt_d=1,
                stride_po_b=h_q * splits * d, stride_po_h=splits * d, stride_po_s=d, stride_po_d=1,
                stride_pl_b=h_q * splits, stride_pl_h=splits, stride_pl_s=1, stride_o_b=h_q * d, stride_o_h=d,
                stride_o_d=1, stride_lse_b=0, stride_lse_h=0, stride_bd_n=2 * d, stride_bd_2=d, stride_bd_d=1,
                stride_ids_b=h_kv * 256, stride_ids_h=256, stride_ids_i=1, stride_out_b=h_kv * 256,
                stride_out_h=256, stride_out_i=1, max_segs=256, skip_upto=budget)  # fmt: skip


def sparse_decode_variants(head_dims, block_ns, chan_modes, warps, stages, group: int = 4,
                           maxnregs: Sequence[Optional[int]] = (None,)) -> List[Variant]:
    """The split kernel of the sparse decode (bf16 arena and queries, GQA group ``group``)."""
    pointers = {"q_ptr": "*bf16", "arena_ptr": "*bf16", "arena_i32_ptr": "*i32", "desc_ptr": "*i32", "sel_ptr": "*i32",
                "kt_ptr": "*bf16", "vt_ptr": "*bf16", "tail_indptr_ptr": "*i32", "tail_idx_ptr": "*i64",
                "po_ptr": "*fp32", "plse_ptr": "*fp32", "out_ptr": "*bf16", "lse_ptr": "*fp32"}  # fmt: skip
    out = []
    for d, bn, chan, w, s, cap in itertools.product(head_dims, block_ns, chan_modes, warps, stages, maxnregs):
        consts = dict(GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=d, BLOCK_N=bn, R_BLOCK=16,
                      COMPUTE_DTYPE=tl.bfloat16, DOT_PRECISION="tf32", CHAN_MODE=chan, DIRECT_OUT=False,
                      HAS_LSE=False)  # fmt: skip
        config = {"head_dim": d, "block_n": bn, "chan_mode": chan, "group": group}
        if cap is not None:
            config["maxnreg"] = cap
        out.append(compile_variant("sparse_decode_split", _sparse_decode_split_kernel, pointers, ("qk_scale",),
                                   _decode_values(d), consts, w, s, config, cap))  # fmt: skip
    return out


def segment_scores_variants(head_dims, group: int = 4, block_s: int = 16) -> List[Variant]:
    pointers = {"q_ptr": "*bf16", "desc_ptr": "*i32", "bounds_ptr": "*bf16", "ids_ptr": "*i32", "counts_ptr": "*i32",
                "out_ptr": "*fp32"}  # fmt: skip
    out = []
    for d in head_dims:
        consts = dict(GROUP=group, HEAD_DIM=d, BLOCK_S=block_s)
        out.append(compile_variant("segment_scores_main", _segment_scores_main_kernel, pointers, ("sm_scale",),
                                   _decode_values(d), consts, 4, 3,
                                   {"head_dim": d, "block_s": block_s, "group": group}))  # fmt: skip
    return out


def segment_select_variants(tiles: Sequence[int] = (64, 128, 1024), budget: int = 64) -> List[Variant]:
    """The selection's top-k kernel (``select_top_segments``) with each sort tile, launched as that function would."""
    from mosaickv_sglang.kernels.segment_scores import SELECT_NUM_WARPS, select_block

    pointers = {"scores_ptr": "*fp32", "ids_ptr": "*i32", "counts_ptr": "*i32", "out_ptr": "*i32"}
    values = dict(stride_sc_b=8 * 256, stride_sc_h=256, stride_sc_i=1, stride_ids_b=8 * 256, stride_ids_h=256,
                  stride_ids_i=1, stride_out_b=8 * budget, stride_out_h=budget, stride_out_i=1, max_segs=256,
                  budget=budget)  # fmt: skip
    out = []
    for t in tiles:
        consts = dict(TILE=t, BLOCK=select_block(t))
        out.append(compile_variant("segment_select", _segment_select_kernel, pointers, (), values, consts,
                                   SELECT_NUM_WARPS, 3, {"tile": t, "block": consts["BLOCK"]}))  # fmt: skip
    return out


def chan_rank_variants(head_dims) -> List[Variant]:
    from mosaickv_sglang.kernels.chan_rank import default_block_r

    pointers = {"score_ptr": "*fp32", "rank_ptr": "*u8"}
    out = []
    for d in head_dims:
        br = default_block_r(d)
        values = dict(stride_s_r=d, stride_s_d=1, stride_o_r=d, stride_o_d=1, n_rows=32768 * 64)
        for name, fn, consts in (("chan_rank_sort", _chan_rank_sort_kernel, dict(HEAD_DIM=d, BLOCK_R=br)),
                                 ("chan_rank_count", _chan_rank_count_kernel,
                                  dict(HEAD_DIM=d, BLOCK_R=br, BLOCK_J=1, UNROLL=True))):  # fmt: skip
            out.append(compile_variant(name, fn, pointers, (), values, consts, 4, 3, {"head_dim": d, "block_r": br}))
    return out


def estimate_terms_variants(head_dims, seg_size: int = 64, token_options: int = 6) -> List[Variant]:
    """The fast estimator's channel terms (``kernels.estimate_terms``) with its launcher's defaults."""
    from mosaickv_sglang.kernels.estimate_terms import BLOCK_S, NUM_WARPS

    pointers = {name: "*fp32" for name in ("K", "V", "P", "QBAR", "VARQ", "RESID", "KEPT", "COH", "LOST_K",
                                           "LOST_V", "KVAR", "VVEC")}  # fmt: skip
    pointers.update(KDROP="*u8", VDROP="*u8")
    block_m = max(16, triton.next_power_of_2(token_options))
    return [compile_variant("estimate_terms", _chan_terms_kernel, pointers, ("scale",),
                            dict(S=seg_size, M=token_options), dict(HEAD_DIM=d, BLOCK_S=BLOCK_S, BLOCK_M=block_m),
                            NUM_WARPS, 3, {"head_dim": d, "seg_size": seg_size, "block_m": block_m})
            for d in head_dims]  # fmt: skip


def pack_variants(head_dims, layer_aligns: Sequence[int] = (16,), seg_size: int = 64, h_kv: int = 8) -> List[Variant]:
    """The pack kernel as a seal launches it (bf16 pool and arena, int64 token slots and offsets, no factors), with
    each ``LAYER_ALIGN`` (the layers' offsets' common alignment in elements: 16 for separately allocated tensors)."""
    pointers = {name: "*bf16" for name in ("k_src_ptr", "v_src_ptr", "ka_ptr", "kb_ptr", "va_ptr", "vb_ptr",
                                           "arena_ptr", "bounds_ptr")}  # fmt: skip
    pointers.update({name: "*i32" for name in ("head_ptr", "k_form_ptr", "k_param_ptr", "v_form_ptr", "v_param_ptr",
                                                "flags_ptr", "arena_i32_ptr", "desc_ptr", "seg_ids_ptr")})
    pointers.update(tok_ptr="*i64", keep_ptr="*u8", kw_ptr="*fp32", vw_ptr="*fp32", off_ptr="*i64",
                    layer_offs_ptr="*i64")
    out = []
    for d, align in itertools.product(head_dims, layer_aligns):
        values = dict(stride_ks_t=h_kv * d, stride_ks_h=d, stride_ks_d=1, stride_vs_t=h_kv * d, stride_vs_h=d,
                      stride_vs_d=1, stride_tok_n=seg_size, stride_tok_s=1, stride_keep_n=seg_size, stride_keep_s=1,
                      stride_kw_n=d, stride_kw_d=1, stride_vw_n=d, stride_vw_d=1, stride_desc_n=8,
                      stride_bd_n=2 * d, stride_bd_2=d, stride_bd_d=1, stride_off_l=2 * 1024, stride_off_n=2)
        values.update({f"stride_{side}{m}_{dim}": 0 for side in "kv" for m, dims in (("a", "nsr"), ("b", "nrd"))
                       for dim in dims})  # fmt: skip
        consts = dict(SEG_SIZE=seg_size, HEAD_DIM=d, BLOCK_M=min(seg_size, 64 if d <= 64 else 32),
                      R_PAD=min(seg_size, d), HAS_FACTORS=False, LAYER_ALIGN=align)
        out.append(compile_variant("pack", _pack_segments_main_kernel, pointers, (), values, consts, 4, 3,
                                   {"head_dim": d, "seg_size": seg_size, "layer_align": align}))  # fmt: skip
    return out


def lagrange_bracket_variants(segments: int = 1024, candidates: int = 80) -> List[Variant]:
    """The planner's Lagrangian kernels (``kernels.lagrange_bracket``) as the batched choice launches them: fp64
    errors of a 128-page seal's 1,024 segments of 8 KV heads, the fast menu's 80 candidates, no multiply-add fusion;
    the start (``kernels.lagrange_start``, fp32 errors), a round of the bracket search, its end, and the choice's fix-up
    (``kernels.lagrange_fixup``)."""
    from mosaickv_sglang.kernels.lagrange_bracket import BLOCK_B, BLOCK_C, BLOCK_N, NUM_WARPS
    from mosaickv_sglang.kernels.lagrange_start import NUM_WARPS as start_warps
    from mosaickv_sglang.lagrange import _GRID

    blocks = dict(BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C)
    config = {"segments": segments, "candidates": candidates, "block_n": BLOCK_N, "block_c": BLOCK_C}
    counts = dict(L=4, NB=segments // BLOCK_N, R=3)
    pointers = {name: "*fp64" for name in ("ET", "B", "LO", "HI", "T", "REL1", "BOUNDS")}
    pointers.update(BL="*i64", BUDGET="*i64", PART="*i64")
    out = [compile_variant("lagrange_bracket", _bracket_round_kernel, pointers, (),
                           dict(N=segments, C=candidates, **counts), dict(GRID=_GRID, BLOCK_B=BLOCK_B, **blocks),
                           NUM_WARPS, 3, config, enable_fp_fusion=False)]  # fmt: skip
    pointers = {name: "*fp64" for name in ("T", "REL1", "BOUNDS", "OUT_LO", "OUT_HI")}
    pointers.update(BUDGET="*i64", PART="*i64")
    out.append(compile_variant("lagrange_bracket_end", _bracket_end_kernel, pointers, (), counts,
                               dict(GRID=_GRID, BLOCK_B=BLOCK_B), 1, 3, config, enable_fp_fusion=False))  # fmt: skip
    from mosaickv_sglang.lagrange import _GROWTH, _GROWTH_STEPS

    pointers = {"ERR": "*fp32", "ET": "*fp64", "B": "*fp64", "LO_FACTOR": "*fp64", "LO": "*fp64", "HI": "*fp64",
                "BL": "*i64", "BUDGET": "*i64", "FITS0": "*i1"}
    out.append(compile_variant("lagrange_start", _start_kernel, pointers, (),
                               dict(N=segments, C=candidates, stride_l=segments * candidates, stride_n=candidates,
                                    stride_c=1),
                               dict(GROWTH=_GROWTH, GROWTH_STEPS=_GROWTH_STEPS,
                                    BLOCK_K=triton.next_power_of_2(_GROWTH_STEPS + 1), **blocks),
                               start_warps, 3, config, enable_fp_fusion=False))  # fmt: skip
    from mosaickv_sglang.kernels import lagrange_fixup as fixup

    pointers = {"ET": "*fp64", "B": "*fp64", "LO": "*fp64", "HI": "*fp64", "LAM": "*fp64", "SLOPE": "*fp64",
                "BL": "*i64", "BUDGET": "*i64", "FITS0": "*i1", "CHOICE": "*i64", "ALT": "*i64",
                "EXTRA": "*i64", "RUNNING": "*i64"}
    out.append(compile_variant("lagrange_fixup", _fixup_kernel, pointers, (), dict(N=segments, C=candidates),
                               dict(BLOCK_N=fixup.BLOCK_N, BLOCK_C=fixup.BLOCK_C, BLOCK_J=fixup.BLOCK_J),
                               fixup.NUM_WARPS, 3, {**config, "block_n": fixup.BLOCK_N, "block_j": fixup.BLOCK_J},
                               enable_fp_fusion=False))  # fmt: skip
    return out


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.kernel_regs", description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", nargs="+", choices=KERNELS, default=list(KERNELS))
    p.add_argument("--head-dim", nargs="+", type=int, default=[64, 128])
    p.add_argument("--block-n", nargs="+", type=int, default=[64], help="sparse decode: rows per step")
    p.add_argument("--chan-mode", nargs="+", type=int, default=[0], choices=sorted(CHAN_MODE_NAMES),
                   help="sparse decode: chan rebuild modes (" + ", ".join(f"{k} {v}" for k, v in
                                                                   sorted(CHAN_MODE_NAMES.items())) + ")")  # fmt: skip
    p.add_argument("--warps", nargs="+", type=int, default=[4], help="sparse decode: warps per program")
    p.add_argument("--stages", nargs="+", type=int, default=[2], help="sparse decode: pipeline stages")
    p.add_argument("--maxnreg", nargs="+", type=int, default=[None],
                   help="sparse decode: register caps per thread (launch option maxnreg; default none)")
    p.add_argument("--layer-align", nargs="+", type=int, default=[16],
                   help="pack: the layers' offsets' common alignment in elements (constexpr LAYER_ALIGN)")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    rows: List[Variant] = []
    if "sparse_decode" in args.kernel:
        rows += sparse_decode_variants(args.head_dim, args.block_n, args.chan_mode, args.warps, args.stages,
                                       maxnregs=args.maxnreg)
    if "segment_scores" in args.kernel:
        rows += segment_scores_variants(args.head_dim)
    if "segment_select" in args.kernel:
        rows += segment_select_variants()
    if "chan_rank" in args.kernel:
        rows += chan_rank_variants(args.head_dim)
    if "estimate_terms" in args.kernel:
        rows += estimate_terms_variants(args.head_dim)
    if "pack" in args.kernel:
        rows += pack_variants(args.head_dim, args.layer_align)
    if "lagrange_bracket" in args.kernel:
        rows += lagrange_bracket_variants()
    if args.json:
        print(json.dumps([asdict(v) for v in rows]))
        return 0
    print(f"{'kernel':22} {'config':52} {'warps':>5} {'stages':>6} {'regs':>4} {'spill st/ld':>11} {'shared':>7} "
          f"{'blocks/SM':>9} {'warps/SM':>8} {'v4 loads':>9}")  # fmt: skip
    for v in rows:
        cfg = " ".join(f"{k}={val}" for k, val in v.config.items())
        print(f"{v.kernel:22} {cfg:52} {v.num_warps:>5} {v.num_stages:>6} {v.registers:>4} "
              f"{v.spill_store_bytes:>5}/{v.spill_load_bytes:<5} {v.shared_bytes:>7} {v.blocks_per_sm:>9} "
              f"{v.warps_per_sm:>8} {v.v4_loads:>9}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
