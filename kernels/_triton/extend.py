# SPDX-License-Identifier: Apache-2.0
"""Triton kernel of extend (prefill) attention over a compressed prefix.

Grid ``(cdiv(max_extend_len, BLOCK_M), B, H_q)``: program ``(mb, b, hq)`` takes ``BLOCK_M`` new tokens of request
``b`` for query head ``hq`` (KV head ``hq // GROUP``) and runs a flash-attention loop over three key ranges, all in
one online softmax:

1. the request's prefix segments, already decompressed by ``_unpack_segments_main_kernel`` into the dense scratch
   ``[B, H_kv, MAX_SEGS, S, d]`` (slot ``i`` holds segment ``seg_ids[b, h, i]``; its row count ``m`` is read from
   the descriptor; ``-1`` slots are skipped) - all of them, no skipping;
2. the dense prefix tail, pool slots ``tail_indices[tail_indptr[b]:tail_indptr[b + 1]]`` of ``[pool, H_kv, d]``;
3. the new tokens ``k_extend[qo_indptr[b]:qo_indptr[b + 1]]``, causal (``j <= i``) when ``CAUSAL``.

Products run on tensor cores in the q dtype (fp16/bf16) or in fp32 ``ieee`` for fp32 q, accumulating in fp32.
Head dims 64 and 128; segment sizes 16..256. The structure follows Triton's fused-attention tutorial
(``python/tutorials/06-fused-attention.py``) and SGLang's ``extend_attention.py`` (prefix stage + causal stage).
"""

import triton
import triton.language as tl

from ._common import DESC_N_ROWS, _update_online_softmax


# The segment table width (max_segs) and the strides it sets are not specialized: one compiled variant serves every
# batch. (The scratch strides are multiples of S * d, so their Triton key never changes.)
@triton.jit(do_not_specialize=["stride_ids_b", "stride_ids_h", "max_segs"])
def _extend_attn_main_kernel(
    q_ptr,
    stride_q_t,
    stride_q_h,
    stride_q_d,
    kn_ptr,
    stride_kn_t,
    stride_kn_h,
    stride_kn_d,
    vn_ptr,
    stride_vn_t,
    stride_vn_h,
    stride_vn_d,
    o_ptr,
    stride_o_t,
    stride_o_h,
    stride_o_d,
    qo_indptr_ptr,
    desc_ptr,
    stride_desc_n,
    ids_ptr,
    stride_ids_b,
    stride_ids_h,
    stride_ids_i,
    max_segs,
    ks_ptr,
    stride_ks_b,
    stride_ks_h,
    stride_ks_i,
    stride_ks_s,
    stride_ks_d,
    vs_ptr,
    stride_vs_b,
    stride_vs_h,
    stride_vs_i,
    stride_vs_s,
    stride_vs_d,
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
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    mb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    hq = tl.program_id(2).to(tl.int64)
    h = hq // GROUP
    q_start = tl.load(qo_indptr_ptr + b).to(tl.int64)
    q_len = (tl.load(qo_indptr_ptr + b + 1) - tl.load(qo_indptr_ptr + b)).to(tl.int32)
    if mb * BLOCK_M < q_len:
        cols = tl.arange(0, HEAD_DIM)
        qi = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        qmask = qi < q_len
        q = tl.load(q_ptr + (q_start + qi)[:, None] * stride_q_t + hq * stride_q_h + cols[None, :] * stride_q_d,
                    mask=qmask[:, None], other=0.0).to(COMPUTE_DTYPE)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        nrow = tl.arange(0, BLOCK_N)

        # 1. decompressed prefix segments
        for slot in range(0, max_segs):
            sid = tl.load(ids_ptr + b * stride_ids_b + h * stride_ids_h + slot * stride_ids_i)
            if sid >= 0:
                m = tl.load(desc_ptr + sid.to(tl.int64) * stride_desc_n + DESC_N_ROWS)
                kbase = ks_ptr + b * stride_ks_b + h * stride_ks_h + slot * stride_ks_i
                vbase = vs_ptr + b * stride_vs_b + h * stride_vs_h + slot * stride_vs_i
                for r0 in range(0, m, BLOCK_N):
                    rows = r0 + nrow
                    rmask = rows < m
                    k = tl.load(kbase + rows[:, None] * stride_ks_s + cols[None, :] * stride_ks_d,
                                mask=rmask[:, None], other=0.0).to(COMPUTE_DTYPE)
                    v = tl.load(vbase + rows[:, None] * stride_vs_s + cols[None, :] * stride_vs_d,
                                mask=rmask[:, None], other=0.0).to(COMPUTE_DTYPE)
                    m_i, l_i, acc = _update_online_softmax(q, k, v, rmask[None, :], m_i, l_i, acc, qk_scale,
                                                         DOT_PRECISION)

        # 2. dense prefix tail
        t_start = tl.load(tail_indptr_ptr + b).to(tl.int64)
        t_len = (tl.load(tail_indptr_ptr + b + 1) - tl.load(tail_indptr_ptr + b)).to(tl.int32)
        for j0 in range(0, t_len, BLOCK_N):
            j = j0 + nrow
            jmask = j < t_len
            slot_t = tl.load(tail_idx_ptr + t_start + j, mask=jmask, other=0).to(tl.int64)
            k = tl.load(kt_ptr + slot_t[:, None] * stride_kt_t + h * stride_kt_h + cols[None, :] * stride_kt_d,
                        mask=jmask[:, None], other=0.0).to(COMPUTE_DTYPE)
            v = tl.load(vt_ptr + slot_t[:, None] * stride_vt_t + h * stride_vt_h + cols[None, :] * stride_vt_d,
                        mask=jmask[:, None], other=0.0).to(COMPUTE_DTYPE)
            m_i, l_i, acc = _update_online_softmax(q, k, v, jmask[None, :], m_i, l_i, acc, qk_scale, DOT_PRECISION)

        # 3. new tokens (causal)
        if CAUSAL:
            n_end = tl.minimum(q_len, (mb + 1) * BLOCK_M)
        else:
            n_end = q_len
        for j0 in range(0, n_end, BLOCK_N):
            j = j0 + nrow
            jmask = j < n_end
            k = tl.load(kn_ptr + (q_start + j)[:, None] * stride_kn_t + h * stride_kn_h + cols[None, :] * stride_kn_d,
                        mask=jmask[:, None], other=0.0).to(COMPUTE_DTYPE)
            v = tl.load(vn_ptr + (q_start + j)[:, None] * stride_vn_t + h * stride_vn_h + cols[None, :] * stride_vn_d,
                        mask=jmask[:, None], other=0.0).to(COMPUTE_DTYPE)
            if CAUSAL:
                qk_mask = jmask[None, :] & (j[None, :] <= qi[:, None])
            else:
                qk_mask = jmask[None, :]
            m_i, l_i, acc = _update_online_softmax(q, k, v, qk_mask, m_i, l_i, acc, qk_scale, DOT_PRECISION)

        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(o_ptr + (q_start + qi)[:, None] * stride_o_t + hq * stride_o_h + cols[None, :] * stride_o_d,
                 o.to(o_ptr.dtype.element_ty), mask=qmask[:, None])
