# SPDX-License-Identifier: Apache-2.0
"""Triton kernels of the per-row descending rank of channel scores (the chan form's top-k order).

For a float32 row ``s`` of ``HEAD_DIM`` scores, ``rank_i = #{j : s_j > s_i} + #{j < i : s_j == s_i}``: 0 for the
largest score, ties broken towards the lower channel index, so ``rank < k`` is the top-``k`` mask. Scores are compared
as order-preserving int32 keys of their bits (:func:`_order_key`): the same order as the floats, ``-0.0 == +0.0``,
and NaNs ordered by their bits (a positive NaN above ``+inf``), as the planner's int64-key ``torch.topk`` orders them.

Two algorithms, same output (uint8 ranks; ``HEAD_DIM`` a power of two, 16 to 256). Both: grid
``(cdiv(n_rows, BLOCK_R),)``, each program loads ``BLOCK_R`` rows once (coalesced ``[BLOCK_R, HEAD_DIM]``).

* ``_chan_rank_sort_kernel``: each score becomes the distinct int64 ``key << 8 | (255 - i)``; a bitonic
  ``tl.sort`` of the row (descending, ``log2(d) (log2(d) + 1) / 2`` compare-swap stages) puts channel ``i`` at
  position ``rank_i``, and the position is stored at ``i``'s byte (a scatter within the row).
* ``_chan_rank_count_kernel``: counts, block by block of ``BLOCK_J`` channels ``j`` (reloaded from L1/L2), the ``j``
  ranked ahead of each ``i`` in a ``[BLOCK_R, BLOCK_J, HEAD_DIM]`` compare tile reduced over ``j``:
  ``HEAD_DIM`` compares per score.
"""

import triton
import triton.language as tl


@triton.jit
def _order_key(s):
    """float32 -> int32 with the same order: the sign-magnitude bits read as an integer (``-m`` for a negative float
    of magnitude bits ``m``), so ``-0.0`` and ``+0.0`` are both 0."""
    b = s.to(tl.int32, bitcast=True)
    neg = b >> 31  # arithmetic: -1 for a set sign bit, else 0
    return (b ^ (neg & 0x7FFFFFFF)) - neg


@triton.jit
def _load_row_keys(score_ptr, stride_s_r, stride_s_d, n_rows, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr):
    """This program's ``BLOCK_R`` rows: their indices, which exist, the column indices, the rows' start pointers and
    their order keys ``[BLOCK_R, HEAD_DIM]``."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_row = rows < n_rows
    cols = tl.arange(0, HEAD_DIM)
    # int64 row offsets: n_rows * HEAD_DIM passes 2**31 for a large seal (e.g. 32768 segments x 64 tokens x 128)
    row_ptrs = score_ptr + rows.to(tl.int64)[:, None] * stride_s_r
    key = _order_key(tl.load(row_ptrs + cols[None, :] * stride_s_d, mask=in_row[:, None], other=0.0))
    return rows, in_row, cols, row_ptrs, key


@triton.jit
def _count_ahead(rank, key_i, row_ptrs, in_row, cols, j0, stride_s_d, BLOCK_J: tl.constexpr):
    """``rank`` plus, for each ``i``, the channels ``j0 <= j < j0 + BLOCK_J`` ranked ahead of it."""
    jj = j0 + tl.arange(0, BLOCK_J)
    key_j = _order_key(tl.load(row_ptrs + jj[None, :] * stride_s_d, mask=in_row[:, None], other=0.0))
    before = jj[:, None] < cols[None, :]  # [BLOCK_J, HEAD_DIM], the same for every row
    kj = key_j[:, :, None]
    ki = key_i[:, None, :]
    ahead = (kj > ki) | ((kj == ki) & before[None, :, :])
    return rank + tl.sum(ahead.to(tl.int32), axis=1)


@triton.jit
def _chan_rank_count_kernel(
    score_ptr,
    stride_s_r,
    stride_s_d,
    rank_ptr,
    stride_o_r,
    stride_o_d,
    n_rows,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_J: tl.constexpr,
    UNROLL: tl.constexpr,
):
    tl.static_assert(HEAD_DIM <= 256)  # ranks are stored as uint8
    tl.static_assert(BLOCK_J <= HEAD_DIM)
    rows, in_row, cols, row_ptrs, key_i = _load_row_keys(score_ptr, stride_s_r, stride_s_d, n_rows, HEAD_DIM, BLOCK_R)
    rank = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.int32)
    if UNROLL:
        for j0 in tl.static_range(0, HEAD_DIM, BLOCK_J):
            rank = _count_ahead(rank, key_i, row_ptrs, in_row, cols, j0, stride_s_d, BLOCK_J)
    else:
        for j0 in range(0, HEAD_DIM, BLOCK_J):
            rank = _count_ahead(rank, key_i, row_ptrs, in_row, cols, j0, stride_s_d, BLOCK_J)
    out = rank_ptr + rows.to(tl.int64)[:, None] * stride_o_r + cols[None, :] * stride_o_d
    tl.store(out, rank.to(tl.uint8), mask=in_row[:, None])


@triton.jit
def _chan_rank_sort_kernel(
    score_ptr,
    stride_s_r,
    stride_s_d,
    rank_ptr,
    stride_o_r,
    stride_o_d,
    n_rows,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    tl.static_assert(HEAD_DIM <= 256)  # the channel index fits the composite's low 8 bits; ranks fit uint8
    rows, in_row, cols, _, key = _load_row_keys(score_ptr, stride_s_r, stride_s_d, n_rows, HEAD_DIM, BLOCK_R)
    # distinct composites, larger = ranked first: the key, then the lower channel index
    comp = (key.to(tl.int64) << 8) | (255 - cols[None, :]).to(tl.int64)
    ordered = tl.sort(comp, dim=1, descending=True)  # [BLOCK_R, HEAD_DIM]: position p holds the rank-p channel
    chan = 255 - (ordered & 255)
    out = rank_ptr + rows.to(tl.int64)[:, None] * stride_o_r + chan * stride_o_d
    tl.store(out, tl.broadcast_to(cols[None, :], [BLOCK_R, HEAD_DIM]).to(tl.uint8), mask=in_row[:, None])
