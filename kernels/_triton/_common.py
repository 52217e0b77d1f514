# SPDX-License-Identifier: Apache-2.0
"""Triton helpers shared by the MosaicKV kernels: packed-segment row reconstruction and the online-softmax step.

Packed layout (see ``docs/packed-format.md`` and ``mosaickv_sglang.kernels.format``): a payload starts at element
``off = granule_offset * 64`` of a 1-D fp16/bf16 arena; ``arena_i32_ptr`` is the same storage viewed as int32.

* dense:   ``rows[m, d]`` at ``off``.
* chan:    int32 words ``[m, d / 32]`` at int32 index ``off / 2``; values ``[m, k]`` at ``off + m * d / 16``.
* lowrank: ``A[m, r]`` at ``off``; ``B[r, d]`` at ``off + m * r``.
"""

import triton
import triton.language as tl

from .. import format as _fmt

FORM_DENSE: tl.constexpr = tl.constexpr(_fmt.FORM_DENSE)
FORM_CHAN: tl.constexpr = tl.constexpr(_fmt.FORM_CHAN)
FORM_LOWRANK: tl.constexpr = tl.constexpr(_fmt.FORM_LOWRANK)
MASK_BITS: tl.constexpr = tl.constexpr(_fmt.MASK_BITS)
GRANULE_ELEMS: tl.constexpr = tl.constexpr(_fmt.GRANULE_ELEMS)
DESC_N_ROWS: tl.constexpr = tl.constexpr(_fmt.N_ROWS)
DESC_K_FORM: tl.constexpr = tl.constexpr(_fmt.K_FORM)
DESC_K_PARAM: tl.constexpr = tl.constexpr(_fmt.K_PARAM)
DESC_V_FORM: tl.constexpr = tl.constexpr(_fmt.V_FORM)
DESC_V_PARAM: tl.constexpr = tl.constexpr(_fmt.V_PARAM)
DESC_K_OFF: tl.constexpr = tl.constexpr(_fmt.K_OFF)
DESC_V_OFF: tl.constexpr = tl.constexpr(_fmt.V_OFF)
DESC_FLAGS: tl.constexpr = tl.constexpr(_fmt.FLAGS)
FLAG_ALWAYS_READ: tl.constexpr = tl.constexpr(_fmt.FLAG_ALWAYS_READ)


@triton.jit
def _get_desc_field(row, f8, FIELD: tl.constexpr):
    """Field ``FIELD`` of a descriptor row held in registers (``row``: int32 ``[8]``, ``f8 = tl.arange(0, 8)``)."""
    return tl.sum(tl.where(f8 == FIELD, row, 0), axis=0)


@triton.jit
def _reconstruct_rows(
    arena_ptr,
    arena_i32_ptr,
    form,
    param,
    m,
    off,
    rows,
    row_mask,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    R_BLOCK: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
    USE_TL_GATHER: tl.constexpr,
):
    """Rows ``rows`` (``[BLOCK_N]`` segment-local indices, masked by ``row_mask``) of one payload as a
    ``[BLOCK_N, HEAD_DIM]`` tile of ``OUT_DTYPE``; masked rows are 0. ``off`` is the payload's int64 element offset,
    ``m`` the segment's kept rows, ``form``/``param`` its descriptor fields."""
    cols = tl.arange(0, HEAD_DIM)
    mask2 = row_mask[:, None]
    if form == FORM_CHAN:
        WORDS: tl.constexpr = HEAD_DIM // MASK_BITS
        # each element reads its own mask word (32 lanes share one address: an L1 broadcast, no extra HBM bytes)
        words = tl.load(
            arena_i32_ptr + (off // 2) + rows[:, None] * WORDS + (cols // MASK_BITS)[None, :], mask=mask2, other=0
        )
        bit = (words >> (cols % MASK_BITS)[None, :]) & 1
        pos = tl.cumsum(bit, axis=1) - 1  # position of a kept channel among the row's k values
        vbase = off + m * (2 * WORDS)
        if USE_TL_GATHER:
            packed = tl.load(
                arena_ptr + vbase + rows[:, None] * param + cols[None, :],
                mask=mask2 & (cols[None, :] < param),
                other=0.0,
            )
            x = tl.gather(packed, tl.maximum(pos, 0), axis=1)
            x = tl.where(bit != 0, x, 0.0).to(OUT_DTYPE)
        else:
            x = tl.load(arena_ptr + vbase + rows[:, None] * param + pos, mask=mask2 & (bit != 0), other=0.0)
            x = x.to(OUT_DTYPE)
    elif form == FORM_LOWRANK:
        rr = tl.arange(0, R_BLOCK)
        acc = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        bbase = off + m * param
        for r0 in range(0, param, R_BLOCK):
            rk = r0 + rr
            a = tl.load(
                arena_ptr + off + rows[:, None] * param + rk[None, :], mask=mask2 & (rk[None, :] < param), other=0.0
            )
            b = tl.load(arena_ptr + bbase + rk[:, None] * HEAD_DIM + cols[None, :], mask=rk[:, None] < param, other=0.0)
            acc = tl.dot(a, b, acc)
        x = acc.to(OUT_DTYPE)
    else:
        x = tl.load(arena_ptr + off + rows[:, None] * HEAD_DIM + cols[None, :], mask=mask2, other=0.0)
        x = x.to(OUT_DTYPE)
    return x


@triton.jit
def _update_online_softmax(q, k, v, qk_mask, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """One flash-attention step in the base-2 domain. ``q [M, D]``, ``k``/``v [N, D]`` (same dtype),
    ``qk_mask`` broadcastable to ``[M, N]``; ``qk_scale = sm_scale * log2(e)``. Fully masked rows stay neutral."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    qk = tl.where(qk_mask, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc
