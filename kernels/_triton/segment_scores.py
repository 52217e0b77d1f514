# SPDX-License-Identifier: Apache-2.0
"""Triton kernel of Quest-style segment upper-bound scores for the 2-D sparse decode.

For query ``q`` and a segment's per-channel K bounds ``kmin``/``kmax`` (``bounds[sid, 0/1]``), the score is
``ub(q) = sum_c max(q_c * kmin_c, q_c * kmax_c)`` (an upper bound of ``q . k`` over the segment's original rows),
maximized over the GQA group of the KV head and scaled by ``sm_scale``. Segments with ``FLAG_ALWAYS_READ`` score
``+inf``; padding (``-1`` or beyond the request's count) scores ``-inf``.

Grid ``(B, H_kv, cdiv(MAX_SEGS, BLOCK_S))``; q heads of KV head ``h`` are ``h * GROUP .. h * GROUP + GROUP - 1``.
Accumulates in fp32. Head dims 64 and 128.
"""

import triton
import triton.language as tl

from ._common import DESC_FLAGS, FLAG_ALWAYS_READ


# The table width (max_segs) and the strides it sets are not specialized: one compiled variant serves every batch.
@triton.jit(do_not_specialize=["stride_ids_b", "stride_ids_h", "stride_out_b", "stride_out_h", "max_segs"])
def _segment_scores_main_kernel(
    q_ptr,
    stride_q_b,
    stride_q_h,
    stride_q_d,
    desc_ptr,
    stride_desc_n,
    bounds_ptr,
    stride_bd_n,
    stride_bd_2,
    stride_bd_d,
    ids_ptr,
    stride_ids_b,
    stride_ids_h,
    stride_ids_i,
    counts_ptr,
    out_ptr,
    stride_out_b,
    stride_out_h,
    stride_out_i,
    max_segs,
    sm_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    blk = tl.program_id(2)
    cols = tl.arange(0, HEAD_DIM)
    i = blk * BLOCK_S + tl.arange(0, BLOCK_S)
    in_row = i < max_segs
    count = tl.load(counts_ptr + b)
    sid = tl.load(ids_ptr + b * stride_ids_b + h * stride_ids_h + i * stride_ids_i, mask=in_row, other=-1)
    valid = in_row & (i < count) & (sid >= 0)
    sid64 = tl.where(valid, sid, 0).to(tl.int64)
    bptr = bounds_ptr + sid64[:, None] * stride_bd_n + cols[None, :] * stride_bd_d
    kmin = tl.load(bptr, mask=valid[:, None], other=0.0).to(tl.float32)
    kmax = tl.load(bptr + stride_bd_2, mask=valid[:, None], other=0.0).to(tl.float32)
    best = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for g in tl.static_range(GROUP):
        qg = tl.load(q_ptr + b * stride_q_b + (h * GROUP + g) * stride_q_h + cols * stride_q_d).to(tl.float32)
        ub = tl.sum(tl.maximum(qg[None, :] * kmin, qg[None, :] * kmax), axis=1)
        best = tl.maximum(best, ub)
    score = best * sm_scale
    flags = tl.load(desc_ptr + sid64 * stride_desc_n + DESC_FLAGS, mask=valid, other=0)
    score = tl.where((flags & FLAG_ALWAYS_READ) != 0, float("inf"), score)
    score = tl.where(valid, score, float("-inf"))
    tl.store(out_ptr + b * stride_out_b + h * stride_out_h + i * stride_out_i, score, mask=in_row)
