# SPDX-License-Identifier: Apache-2.0
"""Triton kernel that decompresses packed segments into dense per-segment slots (the extend scratch).

Grid ``(N, S / BLOCK_M)``: program ``(i, blk)`` rebuilds rows ``[blk * BLOCK_M, (blk + 1) * BLOCK_M)`` of segment
``seg_ids[i]`` (K and V, any form) into slot ``i`` of ``k_out``/``v_out`` ``[N, S, d]``; rows ``>= m`` are written
as zeros, slots with id ``-1`` are not touched. Low-rank products accumulate in fp32 and round once to the output
dtype. Head dims 64 and 128.
"""

import triton
import triton.language as tl

from ._common import (
    DESC_K_FORM,
    DESC_K_OFF,
    DESC_K_PARAM,
    DESC_N_ROWS,
    DESC_V_FORM,
    DESC_V_OFF,
    DESC_V_PARAM,
    GRANULE_ELEMS,
    _reconstruct_rows,
)


@triton.jit
def _unpack_segments_main_kernel(
    arena_ptr,
    arena_i32_ptr,
    desc_ptr,
    stride_desc_n,
    ids_ptr,
    ko_ptr,
    stride_ko_n,
    stride_ko_s,
    stride_ko_d,
    vo_ptr,
    stride_vo_n,
    stride_vo_s,
    stride_vo_d,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    R_BLOCK: tl.constexpr,
    CHAN_MODE: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    sid = tl.load(ids_ptr + i)
    if sid >= 0:
        drow = desc_ptr + sid.to(tl.int64) * stride_desc_n
        m = tl.load(drow + DESC_N_ROWS)
        k_off = tl.load(drow + DESC_K_OFF).to(tl.int64) * GRANULE_ELEMS
        v_off = tl.load(drow + DESC_V_OFF).to(tl.int64) * GRANULE_ELEMS
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < m
        cols = tl.arange(0, HEAD_DIM)
        k = _reconstruct_rows(arena_ptr, arena_i32_ptr, tl.load(drow + DESC_K_FORM), tl.load(drow + DESC_K_PARAM), m,
                              k_off, rows, rmask, HEAD_DIM, BLOCK_M, R_BLOCK, ko_ptr.dtype.element_ty, CHAN_MODE)
        v = _reconstruct_rows(arena_ptr, arena_i32_ptr, tl.load(drow + DESC_V_FORM), tl.load(drow + DESC_V_PARAM), m,
                              v_off, rows, rmask, HEAD_DIM, BLOCK_M, R_BLOCK, vo_ptr.dtype.element_ty, CHAN_MODE)
        tl.store(ko_ptr + i * stride_ko_n + rows[:, None] * stride_ko_s + cols[None, :] * stride_ko_d, k)
        tl.store(vo_ptr + i * stride_vo_n + rows[:, None] * stride_vo_s + cols[None, :] * stride_vo_d, v)
