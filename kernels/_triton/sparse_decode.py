# SPDX-License-Identifier: Apache-2.0
"""Triton kernels of the MosaicKV 2-D sparse decode (split-K flash-decoding over packed segments + dense tail).

Stage 1, ``_sparse_decode_split_kernel``, grid ``(B, H_kv, num_splits)``: program ``(b, h, s)`` loads the
``GROUP = H_q / H_kv`` query heads of KV head ``h`` as one ``[G_PAD, d]`` tile (``G_PAD = max(16, next_pow2(G))``
rows, for ``tl.dot``), so every segment is read once for the whole GQA group. It walks the selected segments
``sel_ids[b, h, s::num_splits]`` (``-1`` skipped) and reads each segment from its packed form: dense rows are loaded,
chan rows rebuilt in registers (mask bits, value slots and a gather, in one of the ways ``CHAN_MODE`` selects, see
``_common.py``), low-rank sides never rebuilt: K scored as ``(q @ B^T) @ A^T`` and V applied as ``(p @ A) @ B``,
``R_BLOCK`` ranks at a time. K is scored before V is read, so one rebuilt tile is live at a time. Then the split's contiguous
share of the request's dense tail (pool slots ``tail_indices[tail_indptr[b]:tail_indptr[b+1]]`` in the SGLang
buffers ``[pool, H_kv, d]``), with an online softmax in base 2. It writes the normalized partial output and its
natural-log LSE, or, when ``DIRECT_OUT`` (one split), the final output directly.

Stage 2, ``_sparse_decode_merge_kernel``, grid ``(B, H_q)``: log-sum-exp merge of the splits.

Dtypes: arena fp16/bf16; q/out fp16/bf16/fp32; tail buffers fp16/bf16/fp32. Products run in the arena dtype on
tensor cores (fp32 accumulate), or in fp32 (``input_precision="ieee"``) when q is fp32. Head dims 64 and 128.
Offsets into the arena and the pool are int64. The split-K structure follows SGLang's grouped decode kernel
(``sglang/kernels/ops/attention/decode_attention.py``, itself adapted from lightllm).
"""

import triton
import triton.language as tl

from ._common import (
    CHAN_WORD_BLOCKS,
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
    _chan_scores_by_word,
    _chan_weighted_sum_by_word,
    _get_desc_field,
    _lowrank_scores,
    _lowrank_weighted_sum,
    _online_softmax_probs,
    _reconstruct_rows,
    _update_online_softmax,
)


# Arguments that change with the batch (table widths, split count) are not specialized: one compiled variant serves
# every batch (Triton would otherwise compile again for each value class: 1, multiple of 16, other).
@triton.jit(do_not_specialize=["stride_sel_b", "stride_sel_h", "nsel", "num_splits", "stride_pl_b", "stride_pl_h"])
def _sparse_decode_split_kernel(
    q_ptr,
    stride_q_b,
    stride_q_h,
    stride_q_d,
    arena_ptr,
    arena_i32_ptr,
    desc_ptr,
    stride_desc_n,
    sel_ptr,
    stride_sel_b,
    stride_sel_h,
    stride_sel_i,
    nsel,
    num_splits,
    kt_ptr,
    stride_kt_t,
    stride_kt_h,
    stride_kt_d,
    vt_ptr,
    stride_vt_t,
    stride_vt_h,
    stride_vt_d,
    tail_indptr_ptr,
    tail_idx_ptr,
    po_ptr,
    stride_po_b,
    stride_po_h,
    stride_po_s,
    stride_po_d,
    plse_ptr,
    stride_pl_b,
    stride_pl_h,
    stride_pl_s,
    out_ptr,
    stride_o_b,
    stride_o_h,
    stride_o_d,
    lse_ptr,
    stride_lse_b,
    stride_lse_h,
    qk_scale,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    R_BLOCK: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    CHAN_MODE: tl.constexpr,
    DIRECT_OUT: tl.constexpr,
    HAS_LSE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    g = tl.arange(0, G_PAD)
    cols = tl.arange(0, HEAD_DIM)
    gmask = g < GROUP
    qh = h * GROUP + g
    q_rows = q_ptr + b * stride_q_b + qh * stride_q_h
    q = tl.load(q_rows[:, None] + cols[None, :] * stride_q_d, mask=gmask[:, None])
    BY_WORD: tl.constexpr = CHAN_MODE == CHAN_WORD_BLOCKS
    q = q.to(COMPUTE_DTYPE)

    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, HEAD_DIM], dtype=tl.float32)
    nrow = tl.arange(0, BLOCK_N)

    # ---- packed segments: this split takes every num_splits-th selected segment (balances -1 padding) ----------
    # The id and descriptor row of the next segment are loaded one iteration ahead, so the sel -> desc -> payload
    # chain of dependent loads overlaps the current segment's work.
    sel_row = sel_ptr + b * stride_sel_b + h * stride_sel_h
    f8 = tl.arange(0, 8)
    sid_nx = tl.load(sel_row + split * stride_sel_i, mask=split < nsel, other=-1)
    desc_nx = tl.load(desc_ptr + tl.maximum(sid_nx, 0).to(tl.int64) * stride_desc_n + f8, mask=sid_nx >= 0, other=0)
    for i in range(split, nsel, num_splits):
        sid = sid_nx
        drow = desc_nx
        nxt = i + num_splits
        sid_nx = tl.load(sel_row + nxt * stride_sel_i, mask=nxt < nsel, other=-1)
        desc_nx = tl.load(desc_ptr + tl.maximum(sid_nx, 0).to(tl.int64) * stride_desc_n + f8, mask=sid_nx >= 0,
                          other=0)
        if sid >= 0:
            m = _get_desc_field(drow, f8, DESC_N_ROWS)
            k_form = _get_desc_field(drow, f8, DESC_K_FORM)
            v_form = _get_desc_field(drow, f8, DESC_V_FORM)
            k_off = _get_desc_field(drow, f8, DESC_K_OFF).to(tl.int64) * GRANULE_ELEMS
            v_off = _get_desc_field(drow, f8, DESC_V_OFF).to(tl.int64) * GRANULE_ELEMS
            if (k_form == FORM_DENSE) & (v_form == FORM_DENSE):
                # fast path: K and V loads issued together (the generic path loads them in separate branches)
                for r0 in range(0, m, BLOCK_N):
                    rows = r0 + nrow
                    rmask = rows < m
                    k = tl.load(arena_ptr + k_off + rows[:, None] * HEAD_DIM + cols[None, :], mask=rmask[:, None],
                                other=0.0).to(COMPUTE_DTYPE)
                    v = tl.load(arena_ptr + v_off + rows[:, None] * HEAD_DIM + cols[None, :], mask=rmask[:, None],
                                other=0.0).to(COMPUTE_DTYPE)
                    m_i, l_i, acc = _update_online_softmax(q, k, v, rmask[None, :], m_i, l_i, acc, qk_scale,
                                                         DOT_PRECISION)
            else:
                k_param = _get_desc_field(drow, f8, DESC_K_PARAM)
                v_param = _get_desc_field(drow, f8, DESC_V_PARAM)
                for r0 in range(0, m, BLOCK_N):
                    rows = r0 + nrow
                    rmask = rows < m
                    # K scored, then V applied: one rebuilt [BLOCK_N, d] tile at a time; low-rank never rebuilt,
                    # nor chan with CHAN_WORD_BLOCKS (32 channels at a time)
                    if k_form == FORM_LOWRANK:
                        qk = _lowrank_scores(q, arena_ptr, k_off, k_param, m, rows, rmask, HEAD_DIM, BLOCK_N,
                                             R_BLOCK, COMPUTE_DTYPE, DOT_PRECISION)
                    elif BY_WORD and (k_form == FORM_CHAN):
                        qk = _chan_scores_by_word(q_rows, stride_q_d, gmask, arena_ptr, arena_i32_ptr, k_off, m,
                                                  k_param, rows, rmask, G_PAD, HEAD_DIM, BLOCK_N, COMPUTE_DTYPE,
                                                  DOT_PRECISION)
                    else:
                        k = _reconstruct_rows(arena_ptr, arena_i32_ptr, k_form, k_param, m, k_off, rows, rmask,
                                              HEAD_DIM, BLOCK_N, R_BLOCK, COMPUTE_DTYPE, CHAN_MODE, False,
                                              not BY_WORD)
                        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
                    p, alpha, m_i, l_i = _online_softmax_probs(qk, rmask[None, :], m_i, l_i, qk_scale)
                    if v_form == FORM_LOWRANK:
                        pv = _lowrank_weighted_sum(p.to(COMPUTE_DTYPE), arena_ptr, v_off, v_param, m, rows, rmask,
                                                   HEAD_DIM, R_BLOCK, COMPUTE_DTYPE, DOT_PRECISION)
                    elif BY_WORD and (v_form == FORM_CHAN):
                        pv = _chan_weighted_sum_by_word(p.to(COMPUTE_DTYPE), arena_ptr, arena_i32_ptr, v_off, m,
                                                        v_param, rows, rmask, G_PAD, HEAD_DIM, BLOCK_N,
                                                        DOT_PRECISION)
                    else:
                        v = _reconstruct_rows(arena_ptr, arena_i32_ptr, v_form, v_param, m, v_off, rows, rmask,
                                              HEAD_DIM, BLOCK_N, R_BLOCK, COMPUTE_DTYPE, CHAN_MODE, False,
                                              not BY_WORD)
                        pv = tl.dot(p.to(COMPUTE_DTYPE), v, input_precision=DOT_PRECISION)
                    acc = acc * alpha[:, None] + pv

    # ---- dense tail: split s takes tokens [s * chunk, (s + 1) * chunk) ------------------------------------------
    t_start = tl.load(tail_indptr_ptr + b).to(tl.int64)
    t_len = (tl.load(tail_indptr_ptr + b + 1) - tl.load(tail_indptr_ptr + b)).to(tl.int32)
    chunk = tl.cdiv(tl.cdiv(t_len, num_splits), BLOCK_N) * BLOCK_N
    j_begin = split * chunk
    j_end = tl.minimum(j_begin + chunk, t_len)
    for j0 in range(j_begin, j_end, BLOCK_N):
        j = j0 + nrow
        jmask = j < j_end
        slot = tl.load(tail_idx_ptr + t_start + j, mask=jmask, other=0).to(tl.int64)
        k = tl.load(kt_ptr + slot[:, None] * stride_kt_t + h * stride_kt_h + cols[None, :] * stride_kt_d,
                    mask=jmask[:, None], other=0.0).to(COMPUTE_DTYPE)
        v = tl.load(vt_ptr + slot[:, None] * stride_vt_t + h * stride_vt_h + cols[None, :] * stride_vt_d,
                    mask=jmask[:, None], other=0.0).to(COMPUTE_DTYPE)
        m_i, l_i, acc = _update_online_softmax(q, k, v, jmask[None, :], m_i, l_i, acc, qk_scale, DOT_PRECISION)

    # ---- write -----------------------------------------------------------------------------------------------------
    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    if DIRECT_OUT:
        tl.store(out_ptr + b * stride_o_b + qh[:, None] * stride_o_h + cols[None, :] * stride_o_d,
                 o.to(out_ptr.dtype.element_ty), mask=gmask[:, None])
        if HAS_LSE:
            tl.store(lse_ptr + b * stride_lse_b + qh * stride_lse_h, lse, mask=gmask)
    else:
        tl.store(po_ptr + b * stride_po_b + qh[:, None] * stride_po_h + split * stride_po_s
                 + cols[None, :] * stride_po_d, o, mask=gmask[:, None])
        tl.store(plse_ptr + b * stride_pl_b + qh * stride_pl_h + split * stride_pl_s, lse, mask=gmask)


@triton.jit
def _sparse_decode_merge_kernel(
    po_ptr,
    stride_po_b,
    stride_po_h,
    stride_po_s,
    stride_po_d,
    plse_ptr,
    stride_pl_b,
    stride_pl_h,
    stride_pl_s,
    out_ptr,
    stride_o_b,
    stride_o_h,
    stride_o_d,
    lse_ptr,
    stride_lse_b,
    stride_lse_h,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HAS_LSE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1).to(tl.int64)
    s = tl.arange(0, SPLITS_PAD)
    smask = s < NUM_SPLITS
    cols = tl.arange(0, HEAD_DIM)
    lse = tl.load(plse_ptr + b * stride_pl_b + hq * stride_pl_h + s * stride_pl_s, mask=smask, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp(lse - mx_safe)  # 0 for empty splits
    po = tl.load(po_ptr + b * stride_po_b + hq * stride_po_h + s[:, None] * stride_po_s + cols[None, :] * stride_po_d,
                 mask=smask[:, None], other=0.0)
    po = tl.where((w > 0.0)[:, None], po, 0.0)
    den = tl.sum(w, axis=0)
    o = tl.sum(w[:, None] * po, axis=0) / tl.where(den > 0.0, den, 1.0)
    tl.store(out_ptr + b * stride_o_b + hq * stride_o_h + cols * stride_o_d, o.to(out_ptr.dtype.element_ty))
    if HAS_LSE:
        tot = tl.where(den > 0.0, mx_safe + tl.log(tl.where(den > 0.0, den, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * stride_lse_b + hq * stride_lse_h, tot)
