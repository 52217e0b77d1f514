# SPDX-License-Identifier: Apache-2.0
"""Compile every Triton kernel variant the server can hit, once, before it takes traffic.

Triton compiles a kernel per distinct set of ``tl.constexpr`` values and per specialization of its other arguments:
an integer equal to 1 becomes a constant, one divisible by 16 is marked so, and a pointer is marked 16-byte aligned
or not. Each compile takes seconds; left to the first batches that need them, they stall the scheduler mid-serving.

:func:`enumerate_variants` lists, for one model shape, the variants the serving paths launch (a pure function; the
comments name the launch sites it mirrors); :func:`run_warmup` launches each once on tiny synthetic inputs. The
attention backend calls both at construction on CUDA devices (``MOSAICKV_WARMUP=0`` skips).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch

from mosaickv_sglang.kernels.format import FORM_DENSE, FORM_LOWRANK, SegmentPlan
from mosaickv_sglang.lagrange import bracket_method
from mosaickv_sglang.strategies.menu import Candidate

logger = logging.getLogger(__name__)

__all__ = ["VariantSpec", "WarmupShape", "backend_shape", "enumerate_variants", "menu_ranks", "run_warmup",
           "warmup_enabled"]

ENV_VAR = "MOSAICKV_WARMUP"


@dataclass(frozen=True)
class WarmupShape:
    """What decides the kernel variants of one server (one TP rank).

    ``read_budget_segments``: ``decode_read_budget // S`` (``<= 0``: every sealed segment is read, no bound).
    ``sidecar_ranks``: the low-rank ranks of the sidecar's menu (empty without a sidecar: the inline sealer's fast
    planner has no low-rank forms). ``causal_modes``: extend masks the layers use. ``lagrange_bracket``: the seal
    planner's bracket search runs as a Triton kernel (``MOSAICKV_LAGRANGE_BRACKET=kernel``).
    """

    num_kv_heads: int
    group: int
    head_dim: int
    seg_size: int
    dtype: torch.dtype  # KV pool / arena dtype
    q_dtype: torch.dtype  # model (query) dtype
    num_layers: int
    num_sms: int
    read_budget_segments: int
    sidecar_ranks: Tuple[int, ...] = ()
    causal_modes: Tuple[bool, ...] = (True,)
    lagrange_bracket: bool = False


@dataclass(frozen=True)
class VariantSpec:
    """One compiled variant of one kernel, with representative launch values.

    ``width``: sel_ids width (``sparse_decode_split``) or MAX_SEGS (``score_and_select``, ``extend``). ``budget``:
    segments selected (``score_and_select``). ``k_rank`` / ``v_rank``: low-rank factor columns of a pack plan (0: no
    factors).
    """

    kernel: str
    num_splits: int = 1
    width: int = 1
    budget: int = 1
    causal: bool = True
    k_rank: int = 0
    v_rank: int = 0


def split_counts(num_kv_heads: int, num_sms: int) -> List[int]:
    """Every ``suggest_num_splits`` value: the powers of two up to its value at batch 1 with unbounded work."""
    # lazy: no @triton.jit on import
    from mosaickv_sglang.kernels.sparse_decode import MAX_NUM_SPLITS, suggest_num_splits

    top = suggest_num_splits(1, num_kv_heads, 2 * MAX_NUM_SPLITS, num_sms)
    return [1 << i for i in range(top.bit_length())]


def menu_ranks(menu: Sequence[Candidate]) -> Tuple[int, ...]:
    """The low-rank ranks of a strategy menu, K and V sides together."""
    sides = [(c.k_form, c.k_param) for c in menu] + [(c.v_form, c.v_param) for c in menu]
    return tuple(sorted({p for f, p in sides if f == FORM_LOWRANK}))


def enumerate_variants(shape: WarmupShape) -> List[VariantSpec]:
    """The kernel variants serving can launch for ``shape``, each once."""
    h = shape.num_kv_heads
    # a seal packs every layer in one launch (store.py seal -> pack_layers_fwd) from the planners' whole plan, whose
    # vectors start 16-byte aligned (plan_layers.py _select_columns, seal_graphs.py _copy_out)
    specs = [VariantSpec("pack")]
    # sidecar plans (planner._factors via shared_buffers.read_plan -> store.reseal): contiguous fp32 factors on K, V
    # or both, as wide as the plan's largest rank on that side; one variant for them all (pack_segments_fwd: the
    # factor strides are not specialized, R_PAD is fixed by the shape, a side without factors gets the other's)
    if shape.sidecar_ranks:
        r = max(shape.sidecar_ranks)
        specs.append(VariantSpec("pack", k_rank=r, v_rank=r))
    # attention_backend.py _plan_extend / _plan_decode: the segment and selection tables' width (MAX_SEGS, the read
    # budget) and the split count are run-time arguments the kernels do not specialize on (do_not_specialize): one
    # variant each, whatever the batch; the split kernel has two (one split writes the output directly).
    specs.append(VariantSpec("unpack"))
    specs += [VariantSpec("extend", causal=c) for c in shape.causal_modes]
    specs += _selection_specs(shape.read_budget_segments)
    splits = split_counts(h, shape.num_sms)
    specs += [VariantSpec("sparse_decode_split", num_splits=s) for s in splits[:2]]
    # the merge kernel's split count is a compile-time constant (its tile); out_lse is never passed (HAS_LSE False)
    specs += [VariantSpec("sparse_decode_merge", num_splits=s) for s in splits if s > 1]
    # lagrange.py choose_candidates_batched -> start_fwd, bracket_fwd (its round and its end) and fixup_fwd, in every
    # seal's planner: four variants (segment, candidate, block and round counts and the errors' strides not
    # specialized; the arguments that can be views of the caller's tensors not on their alignment), launched by one
    # tiny choice
    if shape.lagrange_bracket:
        specs.append(VariantSpec("lagrange_bracket"))
    return specs


def _selection_specs(budget: int) -> List[VariantSpec]:
    """attention_backend.py forward_decode -> score_and_select: one scores variant (table width and budget are run-time
    arguments); the top-k kernel's sort tile is a compile-time constant, 64 when a batch's table is no wider than its
    budget (nothing is sorted), else the configured budget's (a narrower table clamps the budget to its width)."""
    from mosaickv_sglang.kernels.segment_scores import MAX_SELECT_TILE, select_tile

    specs = [VariantSpec("score_and_select")]  # width 1, budget 1: tile 64
    if budget > 0 and select_tile(1, 1) < select_tile(budget, budget + 1) <= MAX_SELECT_TILE:
        specs.append(VariantSpec("score_and_select", width=budget + 1, budget=budget))
    return specs


def backend_shape(backend: Any, q_dtype: Optional[torch.dtype] = None) -> WarmupShape:
    """The :class:`WarmupShape` of a :class:`~mosaickv_sglang.attention_backend.MosaicAttnBackend` (``q_dtype``: the
    model dtype, default the pool's)."""
    pool, sidecar = backend.pool, backend.sealer.sidecar
    return WarmupShape(
        num_kv_heads=backend.num_kv_heads, group=backend.num_q_heads // backend.num_kv_heads,
        head_dim=backend.head_dim, seg_size=backend.page_size, dtype=pool.dtype,
        q_dtype=q_dtype if isinstance(q_dtype, torch.dtype) else pool.dtype, num_layers=int(pool.layer_num),
        num_sms=backend.num_sms, read_budget_segments=int(backend.config.decode_read_budget) // backend.page_size,
        sidecar_ranks=menu_ranks(sidecar.client.menu) if sidecar is not None else (),
        lagrange_bracket=bracket_method() == "kernel",
    )  # fmt: skip


def warmup_enabled() -> bool:
    """``MOSAICKV_WARMUP`` unset or not ``0``."""
    return os.environ.get(ENV_VAR, "1").strip() != "0"


class _Inputs:
    """Tiny valid tensors of one shape: a pool buffer pair and one page (``H_kv`` dense segments) packed."""

    def __init__(self, shape: WarmupShape, device: torch.device) -> None:
        from mosaickv_sglang.kernels.pack import pack_segments_fwd

        self.shape, self.device = shape, device
        s, d, h = shape.seg_size, shape.head_dim, shape.num_kv_heads
        gen = torch.Generator().manual_seed(0)
        self.k_buf = torch.randn(2 * s, h, d, generator=gen).to(device, shape.dtype)
        self.v_buf = torch.randn(2 * s, h, d, generator=gen).to(device, shape.dtype)
        self.tail_indptr = torch.tensor([0, s], dtype=torch.int32, device=device)
        self.tail_indices = torch.arange(s, 2 * s, dtype=torch.int64, device=device)
        self._pack = pack_segments_fwd
        self.arena, self.desc, self.bounds = self.pack(SegmentPlan.uniform(h, s, d, device=device))

    def pack(self, plan: SegmentPlan) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pack page 0's ``H_kv`` segments (slots ``0..S-1``) with ``plan`` into fresh tables."""
        s, h, d, dev = self.shape.seg_size, self.shape.num_kv_heads, self.shape.head_dim, self.device
        k_off, v_off, end = plan.bump_offsets(0)
        arena = torch.zeros(max(end, 1) * 64, dtype=self.shape.dtype, device=dev)
        desc = torch.zeros(h, 8, dtype=torch.int32, device=dev)
        bounds = torch.zeros(h, 2, d, dtype=self.shape.dtype, device=dev)
        tok = torch.arange(s, dtype=torch.int64, device=dev).repeat(h, 1)
        heads = torch.arange(h, dtype=torch.int32, device=dev)
        self._pack(self.k_buf, self.v_buf, tok, heads, plan, arena, desc, bounds, heads.clone(),
                   k_off.to(dev, torch.int64), v_off.to(dev, torch.int64))  # fmt: skip
        return arena, desc, bounds

    def q(self, tokens: int) -> torch.Tensor:
        sh = self.shape
        return torch.randn(tokens, sh.num_kv_heads * sh.group, sh.head_dim, device=self.device).to(sh.q_dtype)

    def seg_table(self, width: int) -> torch.Tensor:
        """``[1, H_kv, width]`` int32: head ``h`` lists segment ``h`` first, ``-1`` after."""
        h = self.shape.num_kv_heads
        t = torch.full((1, h, width), -1, dtype=torch.int32, device=self.device)
        t[0, :, 0] = torch.arange(h, dtype=torch.int32, device=self.device)
        return t


def _lowrank_plan(inp: _Inputs, k_rank: int, v_rank: int) -> SegmentPlan:
    s, d, n, dev = inp.shape.seg_size, inp.shape.head_dim, inp.shape.num_kv_heads, inp.device

    def vec(value: int) -> torch.Tensor:
        return torch.full((n,), value, dtype=torch.int32, device=dev)

    def side(rank: int):
        if not rank:
            return vec(FORM_DENSE), vec(0), None
        a = torch.randn(n, s, rank, device=dev)
        b = torch.randn(n, rank, d, device=dev) / rank**0.5
        return vec(FORM_LOWRANK), vec(min(rank, s, d)), (a, b)

    kf, kp, ka = side(k_rank)
    vf, vp, va = side(v_rank)
    ones = torch.ones(n, d, dtype=torch.float32, device=dev)
    return SegmentPlan(token_keep=torch.ones(n, s, dtype=torch.bool, device=dev), k_form=kf, k_param=kp, v_form=vf,
                       v_param=vp, k_chan_weight=ones, v_chan_weight=ones.clone(), k_factors=ka, v_factors=va,
                       flags=vec(0))  # fmt: skip


def _run_one(inp: _Inputs, spec: VariantSpec) -> None:
    from mosaickv_sglang.kernels.extend import extend_fwd
    from mosaickv_sglang.kernels.segment_scores import score_and_select
    from mosaickv_sglang.kernels.sparse_decode import sparse_decode_fwd
    from mosaickv_sglang.kernels.unpack import unpack_segments_fwd

    sh, dev = inp.shape, inp.device
    h, d, s = sh.num_kv_heads, sh.head_dim, sh.seg_size
    f32 = dict(dtype=torch.float32, device=dev)
    if spec.kernel == "pack":
        inp.pack(_lowrank_plan(inp, spec.k_rank, spec.v_rank))
    elif spec.kernel == "unpack":
        k_out = torch.empty(1, h, 1, s, d, dtype=sh.dtype, device=dev)
        unpack_segments_fwd(inp.arena, inp.desc, inp.seg_table(1), k_out, torch.empty_like(k_out))
    elif spec.kernel == "score_and_select":
        scores = torch.empty(1, h, spec.width, **f32)
        counts = torch.ones(1, dtype=torch.int32, device=dev)
        score_and_select(inp.q(1), inp.desc, inp.bounds, inp.seg_table(spec.width), counts, scores, spec.budget,
                         torch.empty(1, h, spec.budget, dtype=torch.int32, device=dev))  # fmt: skip
    elif spec.kernel == "extend":
        t, h_q = 2, h * sh.group
        q = inp.q(t)
        k, v = (torch.randn(t, h, d, device=dev).to(sh.q_dtype) for _ in range(2))
        scratch = [torch.empty(1, h, spec.width, s, d, dtype=sh.dtype, device=dev) for _ in range(2)]
        qo = torch.tensor([0, t], dtype=torch.int32, device=dev)
        extend_fwd(q, k, v, torch.empty(t, h_q, d, dtype=sh.q_dtype, device=dev), qo, t, inp.arena, inp.desc,
                   inp.seg_table(spec.width), inp.k_buf, inp.v_buf, inp.tail_indptr, inp.tail_indices, *scratch,
                   causal=spec.causal)  # fmt: skip
    elif spec.kernel == "lagrange_bracket":
        from mosaickv_sglang.lagrange import choose_candidates_batched

        err = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]], dtype=torch.float32, device=dev)
        choose_candidates_batched(err, torch.tensor([2, 1], device=dev), torch.tensor([3], device=dev), method="kernel")
    elif spec.kernel in ("sparse_decode_split", "sparse_decode_merge"):
        q, ns = inp.q(1), spec.num_splits
        h_q = h * sh.group
        sparse_decode_fwd(q, inp.arena, inp.desc, inp.seg_table(spec.width), inp.k_buf, inp.v_buf, inp.tail_indptr,
                          inp.tail_indices, torch.empty_like(q), torch.empty(1, h_q, ns, d, **f32),
                          torch.empty(1, h_q, ns, **f32), num_splits=ns)  # fmt: skip
    else:
        raise ValueError(f"spec.kernel: expected one of pack, unpack, score_and_select, extend, sparse_decode_split, "
                         f"sparse_decode_merge, lagrange_bracket, got {spec.kernel!r}")  # fmt: skip


def run_warmup(
    specs: Sequence[VariantSpec], shape: WarmupShape, device: torch.device | str
) -> Tuple[int, float]:
    """Launch every spec once on tiny synthetic inputs on ``device`` (outputs discarded); returns ``(specs run,
    seconds)``, synchronized."""
    device = torch.device(device)
    t0 = time.perf_counter()
    inp = _Inputs(shape, device)
    for spec in specs:
        _run_one(inp, spec)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(specs), time.perf_counter() - t0
