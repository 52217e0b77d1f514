# SPDX-License-Identifier: Apache-2.0
"""Triton kernels of the 2-D sparse decode's segment selection: Quest-style upper-bound scores, then the top-k.

For query ``q`` and a segment's per-channel K bounds ``kmin``/``kmax`` (``bounds[sid, 0/1]``), the score is
``ub(q) = sum_c max(q_c * kmin_c, q_c * kmax_c)`` (an upper bound of ``q . k`` over the segment's original rows),
maximized over the GQA group of the KV head and scaled by ``sm_scale``. Segments with ``FLAG_ALWAYS_READ`` score
``+inf``; padding (``-1`` or beyond the request's count) scores ``-inf``.

Scores: grid ``(B, H_kv, cdiv(MAX_SEGS, BLOCK_S))``; q heads of KV head ``h`` are ``h * GROUP .. h * GROUP + GROUP -
1``. Accumulates in fp32. Head dims 64 and 128. A request with at most ``skip_upto`` candidates is not scored (its
selection keeps them all). Top-k: ``_segment_select_kernel``, one program per request and KV head.
"""

import triton
import triton.language as tl

from ._common import DESC_FLAGS, FLAG_ALWAYS_READ


# The table width (max_segs) and the strides it sets are not specialized: one compiled variant serves every batch.
@triton.jit(
    do_not_specialize=["stride_ids_b", "stride_ids_h", "stride_out_b", "stride_out_h", "max_segs", "skip_upto"]
)
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
    skip_upto,
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
    count = tl.load(counts_ptr + b)
    scored = count > skip_upto
    in_row = (i < max_segs) & scored
    sid = tl.load(ids_ptr + b * stride_ids_b + h * stride_ids_h + i * stride_ids_i, mask=in_row, other=-1)
    valid = in_row & (i < count) & (sid >= 0)
    sid64 = tl.where(valid, sid, 0).to(tl.int64)
    bptr = bounds_ptr + sid64[:, None] * stride_bd_n + cols[None, :] * stride_bd_d
    kmin = tl.load(bptr, mask=valid[:, None], other=0.0).to(tl.float32)
    kmax = tl.load(bptr + stride_bd_2, mask=valid[:, None], other=0.0).to(tl.float32)
    best = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    for g in tl.static_range(GROUP):
        qg = tl.load(q_ptr + b * stride_q_b + (h * GROUP + g) * stride_q_h + cols * stride_q_d, mask=scored,
                     other=0.0).to(tl.float32)
        ub = tl.sum(tl.maximum(qg[None, :] * kmin, qg[None, :] * kmax), axis=1)
        best = tl.maximum(best, ub)
    score = best * sm_scale
    flags = tl.load(desc_ptr + sid64 * stride_desc_n + DESC_FLAGS, mask=valid, other=0)
    score = tl.where((flags & FLAG_ALWAYS_READ) != 0, float("inf"), score)
    score = tl.where(valid, score, float("-inf"))
    tl.store(out_ptr + b * stride_out_b + h * stride_out_h + i * stride_out_i, score, mask=in_row)


# A score and its column as one int64 key that sorts like (score, -column): the float's bits made to order as signed
# integers in the high word, ``column ^ _COL_MASK`` (31 bits) in the low word. Sorting keys needs no index tensor.
_COL_MASK: tl.constexpr = tl.constexpr(0x7FFFFFFF)
# the high word of -inf's key (bits 0xFF800000, low 31 bits flipped): keys at or below it select nothing
_NEG_INF_HIGH: tl.constexpr = tl.constexpr(-2139095041)


@triton.jit
def _score_keys(score, col):
    bits = tl.where(score == 0.0, 0.0, score).to(tl.int32, bitcast=True)  # -0.0 ties with 0.0
    ordered = bits ^ ((bits >> 31) & _COL_MASK)
    return (ordered.to(tl.int64) << 32) | (col.to(tl.int64) ^ _COL_MASK)


@triton.jit(
    do_not_specialize=["stride_sc_b", "stride_sc_h", "stride_ids_b", "stride_ids_h", "stride_out_b", "stride_out_h",
                       "max_segs", "budget"]
)  # fmt: skip
def _segment_select_kernel(
    scores_ptr,
    stride_sc_b,
    stride_sc_h,
    stride_sc_i,
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
    budget,
    TILE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Grid ``(B, H_kv)``. A request with at most ``budget`` candidates keeps them all, in table order, without
    reading its scores. Otherwise its ``budget`` best (``budget <= TILE``) are kept in descending score order (ties:
    the earlier column first), ``-1`` for a ``-inf`` score. Scores are read ``BLOCK`` (a multiple of ``TILE``) at a
    time and sorted ascending: the columns' maxima of the sorted block as ``[BLOCK / TILE, TILE]`` are its last row,
    its best ``TILE`` in ascending order. Those and the best ``TILE`` so far, sorted descending, have the best ``TILE``
    of both as their element-wise maximum."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    count = tl.minimum(tl.load(counts_ptr + b), max_segs)
    t = tl.arange(0, TILE)
    ids_row = ids_ptr + b * stride_ids_b + h * stride_ids_h
    out_row = out_ptr + b * stride_out_b + h * stride_out_h
    if count <= budget:
        for p0 in range(0, budget, TILE):
            p = p0 + t
            sid = tl.load(ids_row + p * stride_ids_i, mask=p < count, other=-1)
            tl.store(out_row + p * stride_out_i, sid, mask=p < budget)
    else:
        sc_row = scores_ptr + b * stride_sc_b + h * stride_sc_h
        best = tl.full([TILE], -9223372036854775808, dtype=tl.int64)
        for c0 in range(0, count, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            score = tl.load(sc_row + c * stride_sc_i, mask=c < count, other=float("-inf"))
            keys = tl.sort(_score_keys(score, c))
            block_best = tl.max(tl.reshape(keys, [BLOCK // TILE, TILE]), axis=0)
            best = tl.sort(tl.maximum(best, block_best), descending=True)
        keep = ((best >> 32) > _NEG_INF_HIGH) & (t < budget)
        col = (best & _COL_MASK) ^ _COL_MASK
        sid = tl.load(ids_row + col * stride_ids_i, mask=keep, other=-1)
        tl.store(out_row + t * stride_out_i, sid, mask=t < budget)
