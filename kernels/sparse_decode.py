# SPDX-License-Identifier: Apache-2.0
"""Launcher of the MosaicKV 2-D sparse decode: attention over selected packed segments plus a dense tail.

The Triton code is in ``mosaickv_sglang.kernels._triton.sparse_decode``; the float64 oracle is
:func:`mosaickv_sglang.kernels.reference.ref_sparse_decode`. The launcher is CUDA-graph safe: it reads only tensor
metadata (no ``.item()``), allocates nothing (outputs and split-K scratch are arguments) and launches one kernel,
plus the merge kernel when ``num_splits > 1``.

Fixed heuristics (no autotune, so graph capture replays deterministically): ``BLOCK_N = 64`` rows per step,
``R_BLOCK = 16`` ranks per low-rank product step, query tile ``G_PAD = max(16, next_pow2(G))`` rows,
``num_warps = 4``, ``num_stages = 2``, chan rows rebuilt by :data:`CHAN_MODE` (all three overridable per call).
:func:`suggest_num_splits` gives a split count for a batch shape.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from . import _checks
from ._triton import _common as _tc
from ._triton.sparse_decode import _sparse_decode_merge_kernel, _sparse_decode_split_kernel
from .format import KERNEL_HEAD_DIMS

logger = logging.getLogger(__name__)

__all__ = [
    "sparse_decode_fwd",
    "suggest_num_splits",
    "resolve_chan_mode",
    "MAX_NUM_SPLITS",
    "NUM_WARPS",
    "NUM_STAGES",
    "MAXNREG",
    "DEFAULT",
    "CHAN_MODE",
    "CHAN_MODE_NAMES",
    "CHAN_PTR_GATHER",
    "CHAN_TL_GATHER",
    "CHAN_POPCOUNT",
    "CHAN_ROW_COMPACT",
    "CHAN_WORD_BLOCKS",
]

MAX_NUM_SPLITS = 64
_BLOCK_N = 64
_R_BLOCK = 16
# Launch configuration of the split kernel (``bench.decode_speed --tune`` times the alternatives on a GPU).
NUM_WARPS = 4
NUM_STAGES = 2
# Register cap per thread of the split kernel (Triton's ``maxnreg``; None: ptxas chooses, 215-245 at 4 warps, which
# leaves 2 programs per SM). ``bench.kernel_regs --maxnreg`` shows what a cap spills; ``--tune`` times caps. A server
# sets it and CHAN_MODE at startup to the fastest on its GPU (mosaickv_sglang.decode_tune).
MAXNREG: Optional[int] = None
DEFAULT = "default"
"""``sparse_decode_fwd(maxnreg=DEFAULT)``: :data:`MAXNREG` as it is at the call."""
_WARP_CHOICES = (1, 2, 4, 8, 16)
# How the kernels rebuild chan rows (the CHAN_MODE constexpr; docs/packed-format.md, "Chan reconstruction"). All
# modes give the same rows; ``bench.decode_speed --tune`` times them.
CHAN_PTR_GATHER = int(_tc.CHAN_PTR_GATHER.value)  # per-element mask word + d-wide cumsum + pointer gather
CHAN_TL_GATHER = int(_tc.CHAN_TL_GATHER.value)  # cumsum slots, [rows, d] value tile placed by tl.gather
CHAN_POPCOUNT = int(_tc.CHAN_POPCOUNT.value)  # mask words once per row, popcount slots, pointer gather
CHAN_ROW_COMPACT = int(_tc.CHAN_ROW_COMPACT.value)  # popcount slots, [rows, KMAX] value tile placed by tl.gather
CHAN_WORD_BLOCKS = int(_tc.CHAN_WORD_BLOCKS.value)  # no rebuilt rows: scored / applied 32 channels (a word) at a time
CHAN_MODE_NAMES = dict(_tc.CHAN_MODE_NAMES)
CHAN_MODE = CHAN_PTR_GATHER  # default (untimed alternatives: see the doc)

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def suggest_num_splits(batch: int, num_kv_heads: int, max_work_segments: int, num_sms: int = 132) -> int:
    """Split count giving about 8 resident programs per SM (``batch * num_kv_heads * splits ~ 8 * num_sms``), without
    giving a split fewer than two segments of work, rounded down to a power of two (at most ``log2(MAX_NUM_SPLITS)``
    compiled variants of the merge kernel; the split kernel takes it at run time). Choose it at plan time.

    Measured on one H100 (d=128, GQA 4, bf16, all-dense 64-token segments, one run): at batch 8 x 32k tokens,
    5 splits reached 2.0 TB/s and 16 splits 2.7 TB/s; at batch 1 x 128k, 33 splits 2.4 TB/s and 64 splits 2.6 TB/s.
    The per-segment chain of dependent loads (id -> descriptor -> payload) needs many resident programs to hide.

    Parameters
    ----------
    batch, num_kv_heads : int
        Batch size and KV heads of the layer.
    max_work_segments : int
        Upper bound of segments read per request and head (selection budget plus tail segments).
    num_sms : int
        Streaming multiprocessors of the device (132 on H100/H200).
    """
    progs = max(1, batch * num_kv_heads)
    want = max(1, (8 * num_sms + progs - 1) // progs)
    cap = max(1, max_work_segments // 2)
    splits = int(max(1, min(want, cap, MAX_NUM_SPLITS)))
    # a power of two (rounded down): the split count is a compile-time constant of the merge kernel, so a server
    # whose batch sizes and lengths wander would otherwise compile it again for every new value
    return 1 << (splits.bit_length() - 1)


def resolve_chan_mode(chan_mode: Optional[int], default: Optional[int] = None) -> int:
    """``chan_mode`` checked against :data:`CHAN_MODE_NAMES` (``None``: ``default``, or :data:`CHAN_MODE` as it is
    at the call)."""
    if chan_mode is None:
        return CHAN_MODE if default is None else default
    if isinstance(chan_mode, bool) or not isinstance(chan_mode, int) or chan_mode not in CHAN_MODE_NAMES:
        names = ", ".join(f"{v} ({n})" for v, n in CHAN_MODE_NAMES.items())
        raise ValueError(f"chan_mode: expected one of {names}, got {chan_mode!r}")
    return int(chan_mode)


def sparse_decode_fwd(
    q: torch.Tensor,
    arena: torch.Tensor,
    desc: torch.Tensor,
    sel_ids: torch.Tensor,
    k_tail_buf: torch.Tensor,
    v_tail_buf: torch.Tensor,
    tail_indptr: torch.Tensor,
    tail_indices: torch.Tensor,
    out: torch.Tensor,
    partial_out: torch.Tensor,
    partial_lse: torch.Tensor,
    sm_scale: Optional[float] = None,
    num_splits: int = 1,
    *,
    out_lse: Optional[torch.Tensor] = None,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
    chan_mode: Optional[int] = None,
    maxnreg: Union[int, None, str] = DEFAULT,
) -> torch.Tensor:
    """Decode attention of one layer over (selected packed segments) + (dense tail), split-K.

    Parameters
    ----------
    q : torch.Tensor
        shape ``[B, H_q, d]``, dtype ``torch.float16``, ``torch.bfloat16`` or ``torch.float32``; one query per
        request, RoPE applied. q head ``i`` belongs to KV head ``i // G`` with ``G = H_q / H_kv``.
    arena : torch.Tensor
        shape ``[arena_elems]``, dtype ``torch.float16`` or ``torch.bfloat16``; packed payloads.
    desc : torch.Tensor
        shape ``[num_segments, 8]``, dtype ``torch.int32``; descriptor table.
    sel_ids : torch.Tensor
        shape ``[B, H_kv, NSEL]``, dtype ``torch.int32``; segments to read per request and KV head, ``-1`` = none
        (e.g. from :func:`~mosaickv_sglang.kernels.segment_scores.select_segments`).
    k_tail_buf, v_tail_buf : torch.Tensor
        shape ``[pool_size, H_kv, d]``, dtype ``torch.float16``, ``torch.bfloat16`` or ``torch.float32``; the
        layer's SGLang KV pool buffers holding the uncompressed tail.
    tail_indptr : torch.Tensor
        shape ``[B + 1]``, dtype ``torch.int32`` or ``torch.int64``; request ``b``'s tail is
        ``tail_indices[tail_indptr[b]:tail_indptr[b + 1]]``.
    tail_indices : torch.Tensor
        shape ``[num_tail_tokens]``, dtype ``torch.int32`` or ``torch.int64``; pool slots of tail tokens.
    out : torch.Tensor
        shape ``[B, H_q, d]``, dtype ``torch.float16``, ``torch.bfloat16`` or ``torch.float32``; written.
    partial_out : torch.Tensor
        shape ``[B, H_q, num_splits, d]``, dtype ``torch.float32``; split-K scratch (unused when
        ``num_splits == 1``).
    partial_lse : torch.Tensor
        shape ``[B, H_q, num_splits]``, dtype ``torch.float32``; split-K scratch (natural-log LSE per split).
    sm_scale : float, optional
        Softmax scale, default ``1 / sqrt(d)``.
    num_splits : int
        Splits per (request, KV head), ``1 <= num_splits <= 64``; split ``s`` reads selected segments
        ``s, s + num_splits, ...`` and the ``s``-th contiguous share of the tail.
    out_lse : torch.Tensor, optional
        shape ``[B, H_q]``, dtype ``torch.float32``; when given, receives the natural-log LSE of the attention
        scores (``-inf`` for a request with nothing to attend, whose output is 0).
    num_warps, num_stages : int
        Launch configuration of the split kernel (one of 1, 2, 4, 8, 16 warps; 1 to 6 stages); each new pair is a
        new compiled variant.
    chan_mode : int, optional
        How chan rows are rebuilt: :data:`CHAN_PTR_GATHER`, :data:`CHAN_TL_GATHER`, :data:`CHAN_POPCOUNT`,
        :data:`CHAN_ROW_COMPACT` (the same rows), or not rebuilt whole: :data:`CHAN_WORD_BLOCKS` (the same values,
        products summed 32 channels at a time: equal within rounding). ``None``: :data:`CHAN_MODE`. Each mode is a
        compiled variant.
    maxnreg : int, optional
        Register cap per thread of the split kernel (32 to 255; ptxas spills what does not fit), ``None`` for none,
        :data:`DEFAULT` for :data:`MAXNREG`. Each cap is a compiled variant.

    Returns
    -------
    torch.Tensor
        ``out``.
    """
    _checks.check_tensor(q, "q", ndim=3, dtype=_FLOAT_DTYPES)
    dev = q.device
    bsz, h_q, d = q.shape
    _checks.check_head_dim(d, "q", KERNEL_HEAD_DIMS)
    _checks.check_arena(arena)
    _checks.check_tensor(arena, "arena", device=dev)
    _checks.check_desc(desc, device=dev)
    _checks.check_tensor(sel_ids, "sel_ids", shape=(bsz, None, None), dtype=torch.int32, device=dev)
    h_kv, nsel = sel_ids.shape[1], sel_ids.shape[2]
    if h_kv == 0 or h_q % h_kv != 0:
        raise ValueError(f"sel_ids: expected H_kv (dim 1) dividing H_q={h_q}, got {h_kv}")
    group = h_q // h_kv
    _checks.check_kv_buffer(k_tail_buf, "k_tail_buf", h_kv, d, dev)
    _checks.check_kv_buffer(v_tail_buf, "v_tail_buf", h_kv, d, dev)
    _checks.check_indptr(tail_indptr, "tail_indptr", bsz, dev)
    _checks.check_tensor(tail_indices, "tail_indices", ndim=1, dtype=(torch.int32, torch.int64), device=dev)
    _checks.check_tensor(out, "out", shape=(bsz, h_q, d), dtype=_FLOAT_DTYPES, device=dev)
    _checks.check_int(num_splits, "num_splits", lo=1, hi=MAX_NUM_SPLITS)
    _checks.check_int(num_warps, "num_warps", lo=1, hi=16)
    if num_warps not in _WARP_CHOICES:
        raise ValueError(f"num_warps: expected one of {_WARP_CHOICES}, got {num_warps}")
    _checks.check_int(num_stages, "num_stages", lo=1, hi=6)
    chan = resolve_chan_mode(chan_mode)
    if maxnreg == DEFAULT:
        maxnreg = MAXNREG
    if maxnreg is not None:
        _checks.check_int(maxnreg, "maxnreg", lo=32, hi=255)
    _checks.check_tensor(partial_out, "partial_out", shape=(bsz, h_q, num_splits, d), dtype=torch.float32, device=dev)
    _checks.check_tensor(partial_lse, "partial_lse", shape=(bsz, h_q, num_splits), dtype=torch.float32, device=dev)
    if out_lse is not None:
        _checks.check_tensor(out_lse, "out_lse", shape=(bsz, h_q), dtype=torch.float32, device=dev)
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"sm_scale: expected a positive finite float, got {sm_scale}")
    if bsz == 0:
        return out
    if _checks.debug_checks_enabled():
        _checks.debug_check_index_range(sel_ids, "sel_ids", 0, desc.shape[0], allow_minus_one=True)
        _checks.debug_check_indptr(tail_indptr, "tail_indptr", tail_indices.numel())
        _checks.debug_check_index_range(tail_indices, "tail_indices", 0, k_tail_buf.shape[0])

    compute = tl.float32 if q.dtype == torch.float32 else _TL_DTYPES[arena.dtype]
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    direct = num_splits == 1
    lse_t = out_lse if out_lse is not None else partial_lse
    lse_strides = out_lse.stride() if out_lse is not None else (0, 0)
    _sparse_decode_split_kernel[(bsz, h_kv, num_splits)](
        q, *q.stride(), arena, arena.view(torch.int32), desc, desc.stride(0),
        sel_ids, *sel_ids.stride(), nsel, num_splits,
        k_tail_buf, *k_tail_buf.stride(), v_tail_buf, *v_tail_buf.stride(), tail_indptr, tail_indices,
        partial_out, *partial_out.stride(), partial_lse, *partial_lse.stride(),
        out, *out.stride(), lse_t, *lse_strides,
        scale * 1.4426950408889634,
        GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=d, BLOCK_N=_BLOCK_N, R_BLOCK=_R_BLOCK,
        COMPUTE_DTYPE=compute, DOT_PRECISION=precision, CHAN_MODE=chan,
        DIRECT_OUT=direct, HAS_LSE=out_lse is not None,
        num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg,
    )  # fmt: skip
    if not direct:
        _sparse_decode_merge_kernel[(bsz, h_q)](
            partial_out, *partial_out.stride(), partial_lse, *partial_lse.stride(),
            out, *out.stride(), lse_t, *lse_strides,
            NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=d,
            HAS_LSE=out_lse is not None, num_warps=4,
        )  # fmt: skip
    return out
