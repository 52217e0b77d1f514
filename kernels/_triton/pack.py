# SPDX-License-Identifier: Apache-2.0
"""Triton kernel that compresses segments from an SGLang KV pool buffer into the packed arena.

One program per segment and layer. It gathers the segment's ``S`` token rows of one KV head from the layer's pool
buffers ``[pool_size, H_kv, d]`` (fp16/bf16, the arena dtype), keeps the plan's tokens (compacted in order), writes the
K and V payloads in their planned forms, the descriptor row and the K min/max bounds over all ``S`` original rows.

The layers of one launch share the segments' token slots, heads and descriptor rows, and read the plan's rows
layer-major (layer ``j``'s segment ``n`` is plan row ``j * N + n``). Each layer's pool buffers, arena, descriptor and
bounds tables are its own tensors: the kernel gets layer 0's and a table of each layer's element offsets from them
(``[L, LAYER_COLS]`` int64, columns ``LAYER_*``), so one launch packs every layer of a seal.

Per-vector top-k (:data:`FORM_CHAN`) is selected here: the k-th largest score ``|x_c| * w_c`` (fp32) of each row is
found by a 31-step bitwise binary search on the score bits (non-negative floats order like their int32 bit
patterns), then ties at the threshold are resolved towards the lower channel index with a cumulative sum, so exactly
``k`` channels are kept, matching ``torch.sort(..., stable=True)`` in the reference.

Supports head_dim 64 and 128 (any power of two that is a multiple of 32 compiles) and segment sizes 16..256.
"""

import triton
import triton.language as tl

from ._common import (
    DESC_FLAGS,
    DESC_K_FORM,
    DESC_K_OFF,
    DESC_K_PARAM,
    DESC_N_ROWS,
    DESC_V_FORM,
    DESC_V_OFF,
    DESC_V_PARAM,
    FORM_CHAN,
    FORM_DENSE,
    FORM_LOWRANK,
    GRANULE_ELEMS,
    MASK_BITS,
)

LAYER_K_SRC: tl.constexpr = tl.constexpr(0)
LAYER_V_SRC: tl.constexpr = tl.constexpr(1)
LAYER_ARENA: tl.constexpr = tl.constexpr(2)
LAYER_DESC: tl.constexpr = tl.constexpr(3)
LAYER_BOUNDS: tl.constexpr = tl.constexpr(4)
LAYER_COLS: tl.constexpr = tl.constexpr(5)


@triton.jit
def _select_chan_topk(x, w, k, BLOCK_M: tl.constexpr):
    """Boolean ``[BLOCK_M, D]``: the ``k`` channels of each row with the largest ``|x| * w`` (ties: lower index)."""
    score = tl.abs(x.to(tl.float32)) * w[None, :]
    bits = score.to(tl.int32, bitcast=True)  # score >= 0: int order == float order
    thr = tl.zeros([BLOCK_M], dtype=tl.int32)
    for b in tl.static_range(30, -1, -1):
        cand = thr | (1 << b)
        cnt = tl.sum((bits >= cand[:, None]).to(tl.int32), axis=1)
        thr = tl.where(cnt >= k, cand, thr)
    # thr is the k-th largest score: fewer than k scores are above it, at least k at or above it
    above = bits > thr[:, None]
    n_above = tl.sum(above.to(tl.int32), axis=1)
    tie = bits == thr[:, None]
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=1)
    return above | (tie & (tie_rank <= (k - n_above)[:, None]))


@triton.jit
def _pack_rows(
    x,
    keep,
    out_row,
    form,
    param,
    m,
    off,
    w_ptr,
    stride_w_d,
    arena_ptr,
    arena_i32_ptr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Store the kept rows of one ``[BLOCK_M, HEAD_DIM]`` block of a dense or chan payload at compact rows
    ``out_row`` (low-rank payloads are copied from the plan's factors by :func:`_pack_factors`)."""
    cols = tl.arange(0, HEAD_DIM)
    elem_ty = arena_ptr.dtype.element_ty
    if form == FORM_CHAN:
        WORDS: tl.constexpr = HEAD_DIM // MASK_BITS
        w = tl.load(w_ptr + cols * stride_w_d)
        sel = _select_chan_topk(x, w, param, BLOCK_M)
        bits = sel.to(tl.int32) << (cols % MASK_BITS)[None, :]
        words = tl.sum(tl.reshape(bits, [BLOCK_M, WORDS, MASK_BITS]), axis=2)  # distinct bits: sum == or
        wcols = tl.arange(0, WORDS)
        tl.store(arena_i32_ptr + (off // 2) + out_row[:, None] * WORDS + wcols[None, :], words, mask=keep[:, None])
        pos = tl.cumsum(sel.to(tl.int32), axis=1) - 1
        vbase = off + m * (2 * WORDS)
        tl.store(arena_ptr + vbase + out_row[:, None] * param + pos, x.to(elem_ty), mask=keep[:, None] & sel)
    elif form == FORM_DENSE:
        tl.store(arena_ptr + off + out_row[:, None] * HEAD_DIM + cols[None, :], x.to(elem_ty), mask=keep[:, None])


@triton.jit
def _pack_factors(
    a_ptr,
    stride_a_s,
    stride_a_r,
    b_ptr,
    stride_b_r,
    stride_b_d,
    param,
    m,
    off,
    arena_ptr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    R_PAD: tl.constexpr,
):
    """Copy ``A[:m, :r]`` then ``B[:r, :]`` (any float dtype, cast to the arena dtype) into a low-rank payload;
    ``r = param <= R_PAD`` and no wider than the factors (columns past ``r`` are never read)."""
    elem_ty = arena_ptr.dtype.element_ty
    cols = tl.arange(0, HEAD_DIM)
    rr = tl.arange(0, R_PAD)
    rmask = rr < param
    for j0 in range(0, m, BLOCK_M):
        j = j0 + tl.arange(0, BLOCK_M)
        msk = (j < m)[:, None] & rmask[None, :]
        a = tl.load(a_ptr + j[:, None] * stride_a_s + rr[None, :] * stride_a_r, mask=msk, other=0.0)
        tl.store(arena_ptr + off + j[:, None] * param + rr[None, :], a.to(elem_ty), mask=msk)
    bbase = off + m * param
    for i0 in range(0, param, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M)
        im = (i < param)[:, None]
        bt = tl.load(b_ptr + i[:, None] * stride_b_r + cols[None, :] * stride_b_d, mask=im, other=0.0)
        tl.store(arena_ptr + bbase + i[:, None] * HEAD_DIM + cols[None, :], bt.to(elem_ty), mask=im)


# The factor strides change with the plan's factor widths (its largest rank per side) and are not specialized: with
# R_PAD fixed by the shape, one compiled variant packs factors of any rank. The offsets' strides change with the
# segment count and are not specialized either.
@triton.jit(
    do_not_specialize=[
        "stride_ka_n", "stride_ka_s", "stride_ka_r", "stride_kb_n", "stride_kb_r", "stride_kb_d",
        "stride_va_n", "stride_va_s", "stride_va_r", "stride_vb_n", "stride_vb_r", "stride_vb_d",
        "stride_off_l", "stride_off_n",
    ]
)  # fmt: skip
def _pack_segments_main_kernel(
    k_src_ptr,
    v_src_ptr,
    stride_ks_t,
    stride_ks_h,
    stride_ks_d,
    stride_vs_t,
    stride_vs_h,
    stride_vs_d,
    tok_ptr,
    stride_tok_n,
    stride_tok_s,
    head_ptr,
    keep_ptr,
    stride_keep_n,
    stride_keep_s,
    k_form_ptr,
    k_param_ptr,
    v_form_ptr,
    v_param_ptr,
    flags_ptr,
    kw_ptr,
    stride_kw_n,
    stride_kw_d,
    vw_ptr,
    stride_vw_n,
    stride_vw_d,
    ka_ptr,
    stride_ka_n,
    stride_ka_s,
    stride_ka_r,
    kb_ptr,
    stride_kb_n,
    stride_kb_r,
    stride_kb_d,
    va_ptr,
    stride_va_n,
    stride_va_s,
    stride_va_r,
    vb_ptr,
    stride_vb_n,
    stride_vb_r,
    stride_vb_d,
    arena_ptr,
    arena_i32_ptr,
    desc_ptr,
    stride_desc_n,
    bounds_ptr,
    stride_bd_n,
    stride_bd_2,
    stride_bd_d,
    seg_ids_ptr,
    off_ptr,
    stride_off_l,
    stride_off_n,
    layer_offs_ptr,
    SEG_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    R_PAD: tl.constexpr,
    HAS_FACTORS: tl.constexpr,
    LAYER_ALIGN: tl.constexpr,
):
    tl.static_assert(HEAD_DIM % 32 == 0)
    tl.static_assert(SEG_SIZE % BLOCK_M == 0)
    n = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(1).to(tl.int64)
    g = layer * tl.num_programs(0) + n  # the segment's row in the plan (layer-major)
    # this layer's tensors: element offsets from layer 0's, each a multiple of LAYER_ALIGN (the arena's folded into
    # the payload offsets, the tables' read where they are written: fewer registers held through the row loop)
    lo = layer_offs_ptr + layer * LAYER_COLS
    k_src_ptr += tl.multiple_of(tl.load(lo + LAYER_K_SRC), LAYER_ALIGN)
    v_src_ptr += tl.multiple_of(tl.load(lo + LAYER_V_SRC), LAYER_ALIGN)
    arena_lo = tl.multiple_of(tl.load(lo + LAYER_ARENA), LAYER_ALIGN)  # even: the int32 view's index is off // 2

    cols = tl.arange(0, HEAD_DIM)
    sid = tl.load(seg_ids_ptr + n).to(tl.int64)
    head = tl.load(head_ptr + n).to(tl.int64)
    k_form = tl.load(k_form_ptr + g)
    k_param = tl.where(k_form == FORM_DENSE, 0, tl.load(k_param_ptr + g))
    v_form = tl.load(v_form_ptr + g)
    v_param = tl.where(v_form == FORM_DENSE, 0, tl.load(v_param_ptr + g))
    flags = tl.load(flags_ptr + g)
    k_goff = tl.load(off_ptr + layer * stride_off_l + n * stride_off_n).to(tl.int64)
    v_goff = tl.load(off_ptr + layer * stride_off_l + n * stride_off_n + 1).to(tl.int64)
    k_off = arena_lo + k_goff * GRANULE_ELEMS  # int64: arenas may exceed 2**31 elements
    v_off = arena_lo + v_goff * GRANULE_ELEMS

    keep_all = tl.load(keep_ptr + g * stride_keep_n + tl.arange(0, SEG_SIZE) * stride_keep_s) != 0
    m = tl.sum(keep_all.to(tl.int32), axis=0)

    kmin = tl.full([HEAD_DIM], float("inf"), dtype=tl.float32)
    kmax = tl.full([HEAD_DIM], float("-inf"), dtype=tl.float32)
    base = m * 0
    for s0 in range(0, SEG_SIZE, BLOCK_M):
        srow = s0 + tl.arange(0, BLOCK_M)
        keep = tl.load(keep_ptr + g * stride_keep_n + srow * stride_keep_s) != 0
        out_row = base + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tok = tl.load(tok_ptr + n * stride_tok_n + srow * stride_tok_s).to(tl.int64)
        kx = tl.load(k_src_ptr + tok[:, None] * stride_ks_t + head * stride_ks_h + cols[None, :] * stride_ks_d)
        vx = tl.load(v_src_ptr + tok[:, None] * stride_vs_t + head * stride_vs_h + cols[None, :] * stride_vs_d)
        kf = kx.to(tl.float32)
        kmin = tl.minimum(kmin, tl.min(kf, axis=0))
        kmax = tl.maximum(kmax, tl.max(kf, axis=0))
        _pack_rows(kx, keep, out_row, k_form, k_param, m, k_off, kw_ptr + g * stride_kw_n, stride_kw_d,
                   arena_ptr, arena_i32_ptr, HEAD_DIM, BLOCK_M)
        _pack_rows(vx, keep, out_row, v_form, v_param, m, v_off, vw_ptr + g * stride_vw_n, stride_vw_d,
                   arena_ptr, arena_i32_ptr, HEAD_DIM, BLOCK_M)
        base += tl.sum(keep.to(tl.int32), axis=0)

    if HAS_FACTORS:
        if k_form == FORM_LOWRANK:
            _pack_factors(ka_ptr + g * stride_ka_n, stride_ka_s, stride_ka_r, kb_ptr + g * stride_kb_n, stride_kb_r,
                          stride_kb_d, k_param, m, k_off, arena_ptr, HEAD_DIM, BLOCK_M, R_PAD)
        if v_form == FORM_LOWRANK:
            _pack_factors(va_ptr + g * stride_va_n, stride_va_s, stride_va_r, vb_ptr + g * stride_vb_n, stride_vb_r,
                          stride_vb_d, v_param, m, v_off, arena_ptr, HEAD_DIM, BLOCK_M, R_PAD)

    bounds_ptr += tl.multiple_of(tl.load(lo + LAYER_BOUNDS), LAYER_ALIGN)
    desc_ptr += tl.multiple_of(tl.load(lo + LAYER_DESC), LAYER_ALIGN)
    bt = bounds_ptr.dtype.element_ty
    tl.store(bounds_ptr + sid * stride_bd_n + cols * stride_bd_d, kmin.to(bt))
    tl.store(bounds_ptr + sid * stride_bd_n + stride_bd_2 + cols * stride_bd_d, kmax.to(bt))

    f = tl.arange(0, 8)
    row = tl.where(f == DESC_N_ROWS, m, 0)
    row = tl.where(f == DESC_K_FORM, k_form, row)
    row = tl.where(f == DESC_K_PARAM, k_param, row)
    row = tl.where(f == DESC_V_FORM, v_form, row)
    row = tl.where(f == DESC_V_PARAM, v_param, row)
    row = tl.where(f == DESC_K_OFF, k_goff.to(tl.int32), row)
    row = tl.where(f == DESC_V_OFF, v_goff.to(tl.int32), row)
    row = tl.where(f == DESC_FLAGS, flags, row)
    tl.store(desc_ptr + sid * stride_desc_n + f, row)
