# SPDX-License-Identifier: Apache-2.0
"""Triton helpers shared by the MosaicKV kernels: packed-segment row reconstruction and the online-softmax step.

Packed layout (see ``docs/packed-format.md`` and ``mosaickv_sglang.kernels.format``): a payload starts at element
``off = granule_offset * 64`` of a 1-D fp16/bf16 arena; ``arena_i32_ptr`` is the same storage viewed as int32.

* dense:   ``rows[m, d]`` at ``off``.
* chan:    int32 words ``[m, d / 32]`` at int32 index ``off / 2``; values ``[m, k]`` at ``off + m * d / 16``.
* lowrank: ``A[m, r]`` at ``off``; ``B[r, d]`` at ``off + m * r``.

Chan rows can be rebuilt four ways, chosen by the kernels' ``CHAN_MODE`` constexpr (one of the ``CHAN_*`` constants
below; docs/packed-format.md, "Chan reconstruction"). All four give the same rows bit for bit.
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

CHAN_PTR_GATHER: tl.constexpr = tl.constexpr(0)
"""Chan mode: each element loads its mask word (an L1 broadcast) and tests its bit, a ``d``-wide ``tl.cumsum`` along
the row gives its slot among the row's ``k`` values, and a masked gathered load reads the value (the default)."""
CHAN_TL_GATHER: tl.constexpr = tl.constexpr(1)
"""Chan mode: bits and slots as :data:`CHAN_PTR_GATHER`; the row's value list is loaded as a ``[BLOCK_N, d]`` tile
(masked to ``k`` columns) and placed with ``tl.gather``."""
CHAN_POPCOUNT: tl.constexpr = tl.constexpr(2)
"""Chan mode: the ``d / 32`` mask words of a row are loaded once per row (not once per element), and the slot of
channel ``c`` is (set bits of the row's words before word ``c // 32``) + popcount(word & ((1 << c % 32) - 1)),
so there is no ``d``-wide cumsum; masked gathered load of the value as :data:`CHAN_PTR_GATHER`."""
CHAN_ROW_COMPACT: tl.constexpr = tl.constexpr(3)
"""Chan mode: bits and slots as :data:`CHAN_POPCOUNT`; the row's value list is loaded as one contiguous
``[BLOCK_N, KMAX]`` tile and placed with ``tl.gather``. ``KMAX`` is chosen per segment at run time among ``d / 4``,
``d / 2`` and ``d`` (the smallest that holds ``k``: three compiled branches, no launcher metadata)."""
CHAN_WORD_BLOCKS: tl.constexpr = tl.constexpr(4)
"""Chan mode of the sparse decode only (elsewhere as :data:`CHAN_PTR_GATHER`): the rows are never rebuilt whole. K is
scored and V applied 32 channels (one mask word) at a time: a ``[BLOCK_N, 32]`` block of values from the word's
bits (slot = set bits of the row's earlier words + popcount of the word below the channel), multiplied with the
query's (or the weights') matching 32 channels; the fewest operations and live registers per element."""
CHAN_MODE_NAMES = {0: "ptr-gather", 1: "tl-gather", 2: "popcount", 3: "row-compact", 4: "word-blocks"}
"""Host side: chan mode value -> short name (bench tables)."""


@triton.jit
def _get_desc_field(row, f8, FIELD: tl.constexpr):
    """Field ``FIELD`` of a descriptor row held in registers (``row``: int32 ``[8]``, ``f8 = tl.arange(0, 8)``)."""
    return tl.sum(tl.where(f8 == FIELD, row, 0), axis=0)


@triton.jit
def _popc32(x):
    """Set bits of each element of a uint32 tensor, as int32. The SWAR form that LLVM's AggressiveInstCombine turns
    into one ``ctpop`` (a ``popc`` instruction); it also runs in the interpreter, which has no libdevice."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _chan_slots(arena_i32_ptr, off, rows, row_mask, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(keep, slot)``, both ``[BLOCK_N, HEAD_DIM]``: whether channel ``c`` of each row is kept, and its slot among
    the row's kept channels (valid where kept; at most ``k`` elsewhere). The ``HEAD_DIM / 32`` mask words are loaded
    as ``[BLOCK_N]`` vectors, one per word, and spread over their 32 channels with selects; the slot is a prefix of
    per-word popcounts plus the popcount of the word's bits below the channel."""
    WORDS: tl.constexpr = HEAD_DIM // MASK_BITS
    cols = tl.arange(0, HEAD_DIM)
    wsel = (cols // MASK_BITS)[None, :]
    lane = (cols % MASK_BITS).to(tl.uint32)
    below = ((tl.full([HEAD_DIM], 1, tl.uint32) << lane) - 1)[None, :]  # lane < 32: no shift by 32
    word = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.uint32)
    before = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.int32)
    pre = tl.zeros([BLOCK_N], dtype=tl.int32)
    wptr = arena_i32_ptr + (off // 2) + rows * WORDS
    for w in tl.static_range(WORDS):
        ww = tl.load(wptr + w, mask=row_mask, other=0).to(tl.uint32, bitcast=True)
        here = wsel == w
        word = tl.where(here, ww[:, None], word)
        before = tl.where(here, pre[:, None], before)
        pre += _popc32(ww)
    keep = ((word >> lane[None, :]) & 1) != 0
    slot = before + _popc32(word & below)
    return keep, slot


@triton.jit
def _chan_row_compact(arena_ptr, vbase, rows, row_mask, param, keep, slot, KMAX: tl.constexpr):
    """Chan rows placed from a contiguous ``[BLOCK_N, KMAX]`` tile of the rows' value lists (``k = param <= KMAX``)
    by ``tl.gather`` at ``slot``; 0 where not ``keep``. Arena dtype."""
    kk = tl.arange(0, KMAX)[None, :]
    packed = tl.load(arena_ptr + vbase + rows[:, None] * param + kk, mask=row_mask[:, None] & (kk < param), other=0.0)
    x = tl.gather(packed, tl.where(keep, slot, 0), axis=1)
    return tl.where(keep, x, 0.0)


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
    CHAN_MODE: tl.constexpr,
    WITH_LOWRANK: tl.constexpr = True,
    WITH_CHAN: tl.constexpr = True,
):
    """Rows ``rows`` (``[BLOCK_N]`` segment-local indices, masked by ``row_mask``) of one payload as a
    ``[BLOCK_N, HEAD_DIM]`` tile of ``OUT_DTYPE``; masked rows are 0. ``off`` is the payload's int64 element offset,
    ``m`` the segment's kept rows, ``form``/``param`` its descriptor fields. ``CHAN_MODE``: how chan rows are rebuilt
    (one of the ``CHAN_*`` constants; same result; :data:`CHAN_WORD_BLOCKS` rebuilds as :data:`CHAN_PTR_GATHER`).
    Without ``WITH_LOWRANK`` / ``WITH_CHAN`` that form's branch is not compiled (for callers that never pass it: it
    sets the register budget of the whole kernel)."""
    cols = tl.arange(0, HEAD_DIM)
    mask2 = row_mask[:, None]
    if WITH_CHAN and form == FORM_CHAN:
        WORDS: tl.constexpr = HEAD_DIM // MASK_BITS
        vbase = off + m * (2 * WORDS)
        if CHAN_MODE == CHAN_POPCOUNT:
            keep, slot = _chan_slots(arena_i32_ptr, off, rows, row_mask, HEAD_DIM, BLOCK_N)
            x = tl.load(arena_ptr + vbase + rows[:, None] * param + slot, mask=mask2 & keep, other=0.0)
        elif CHAN_MODE == CHAN_ROW_COMPACT:
            keep, slot = _chan_slots(arena_i32_ptr, off, rows, row_mask, HEAD_DIM, BLOCK_N)
            if param <= HEAD_DIM // 4:
                x = _chan_row_compact(arena_ptr, vbase, rows, row_mask, param, keep, slot, HEAD_DIM // 4)
            elif param <= HEAD_DIM // 2:
                x = _chan_row_compact(arena_ptr, vbase, rows, row_mask, param, keep, slot, HEAD_DIM // 2)
            else:
                x = _chan_row_compact(arena_ptr, vbase, rows, row_mask, param, keep, slot, HEAD_DIM)
        else:
            # each element reads its own mask word (32 lanes share one address: an L1 broadcast, no extra HBM bytes)
            words = tl.load(
                arena_i32_ptr + (off // 2) + rows[:, None] * WORDS + (cols // MASK_BITS)[None, :], mask=mask2, other=0
            )
            bit = (words >> (cols % MASK_BITS)[None, :]) & 1
            pos = tl.cumsum(bit, axis=1) - 1  # position of a kept channel among the row's k values
            if CHAN_MODE == CHAN_TL_GATHER:
                packed = tl.load(
                    arena_ptr + vbase + rows[:, None] * param + cols[None, :],
                    mask=mask2 & (cols[None, :] < param),
                    other=0.0,
                )
                x = tl.gather(packed, tl.maximum(pos, 0), axis=1)
                x = tl.where(bit != 0, x, 0.0)
            else:
                x = tl.load(arena_ptr + vbase + rows[:, None] * param + pos, mask=mask2 & (bit != 0), other=0.0)
        x = x.to(OUT_DTYPE)
    elif WITH_LOWRANK and form == FORM_LOWRANK:
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
def _chan_word_block(arena_ptr, arena_i32_ptr, off, m, param, rows, row_mask, pre, w: tl.constexpr,
                     HEAD_DIM: tl.constexpr):
    """Channels ``[32 w, 32 w + 32)`` of chan rows ``rows`` as ``[BLOCK_N, 32]`` values (arena dtype, 0 where not
    kept), and ``pre`` (``[BLOCK_N]`` int32: set bits of the rows' words before ``w``) advanced past word ``w``."""
    WORDS: tl.constexpr = HEAD_DIM // MASK_BITS
    lane = tl.arange(0, MASK_BITS).to(tl.uint32)
    below = (tl.full([MASK_BITS], 1, tl.uint32) << lane) - 1  # lane < 32: no shift by 32
    word = tl.load(arena_i32_ptr + (off // 2) + rows * WORDS + w, mask=row_mask, other=0).to(tl.uint32, bitcast=True)
    keep = ((word[:, None] >> lane[None, :]) & 1) != 0
    slot = pre[:, None] + _popc32(word[:, None] & below[None, :])
    vbase = off + m * (2 * WORDS)
    x = tl.load(arena_ptr + vbase + rows[:, None] * param + slot, mask=row_mask[:, None] & keep, other=0.0)
    return x, pre + _popc32(word)


@triton.jit
def _chan_scores_by_word(q_rows, stride_q_d, gmask, arena_ptr, arena_i32_ptr, off, m, param, rows, row_mask,
                         G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                         COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``q @ K[rows]^T`` for a chan payload, one mask word of channels at a time (:data:`CHAN_WORD_BLOCKS`):
    ``[G_PAD, BLOCK_N]`` fp32 (unscaled). ``q_rows``: ``[G_PAD]`` pointers to the group's query rows (masked by ``gmask``),
    read 32 channels at a time in ``COMPUTE_DTYPE``."""
    WORDS: tl.constexpr = HEAD_DIM // MASK_BITS
    c = tl.arange(0, MASK_BITS)
    qk = tl.zeros([G_PAD, BLOCK_N], dtype=tl.float32)
    pre = tl.zeros([BLOCK_N], dtype=tl.int32)
    for w in tl.static_range(WORDS):
        x, pre = _chan_word_block(arena_ptr, arena_i32_ptr, off, m, param, rows, row_mask, pre, w, HEAD_DIM)
        qw = tl.load(q_rows[:, None] + (c + w * MASK_BITS)[None, :] * stride_q_d, mask=gmask[:, None], other=0.0)
        qk = tl.dot(qw.to(COMPUTE_DTYPE), tl.trans(x.to(COMPUTE_DTYPE)), qk, input_precision=DOT_PRECISION)
    return qk


@triton.jit
def _chan_weighted_sum_by_word(p, arena_ptr, arena_i32_ptr, off, m, param, rows, row_mask, G_PAD: tl.constexpr,
                               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``p @ V[rows]`` for a chan payload, one mask word of channels at a time (:data:`CHAN_WORD_BLOCKS`):
    ``[G_PAD, HEAD_DIM]`` fp32. ``p``: ``[G_PAD, BLOCK_N]`` weights (0 on masked rows) in the dtype of the products."""
    WORDS: tl.constexpr = HEAD_DIM // MASK_BITS
    widx = tl.arange(0, WORDS)[None, :, None]
    out = tl.zeros([G_PAD, WORDS, MASK_BITS], dtype=tl.float32)
    pre = tl.zeros([BLOCK_N], dtype=tl.int32)
    for w in tl.static_range(WORDS):
        x, pre = _chan_word_block(arena_ptr, arena_i32_ptr, off, m, param, rows, row_mask, pre, w, HEAD_DIM)
        pv = tl.dot(p, x.to(p.dtype), input_precision=DOT_PRECISION)
        out += tl.where(widx == w, pv[:, None, :], 0.0)
    return tl.reshape(out, [G_PAD, HEAD_DIM])


@triton.jit
def _lowrank_factor_blocks(arena_ptr, off, param, m, r0, rows, row_mask, HEAD_DIM: tl.constexpr,
                           R_BLOCK: tl.constexpr):
    """Ranks ``[r0, r0 + R_BLOCK)`` of a low-rank payload (``A [m, r]`` then ``B [r, d]`` at ``off``): ``A[rows]``
    ``[BLOCK_N, R_BLOCK]`` and ``B`` ``[R_BLOCK, HEAD_DIM]``, arena dtype, 0 past rank ``param``."""
    cols = tl.arange(0, HEAD_DIM)
    rk = r0 + tl.arange(0, R_BLOCK)
    rmask = rk < param
    a = tl.load(arena_ptr + off + rows[:, None] * param + rk[None, :], mask=row_mask[:, None] & rmask[None, :],
                other=0.0)
    b = tl.load(arena_ptr + off + m * param + rk[:, None] * HEAD_DIM + cols[None, :], mask=rmask[:, None], other=0.0)
    return a, b


@triton.jit
def _lowrank_scores(q, arena_ptr, off, param, m, rows, row_mask, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                    R_BLOCK: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``q @ K[rows]^T`` for a low-rank payload ``K = A @ B`` computed as ``(q @ B^T) @ A[rows]^T``, ``R_BLOCK``
    ranks at a time: ``[G, BLOCK_N]`` fp32 (unscaled) without rebuilding the ``[BLOCK_N, HEAD_DIM]`` rows. ``q``:
    ``[G, HEAD_DIM]`` in ``COMPUTE_DTYPE``; the partial ``q @ B^T`` is rounded to it as a rebuilt row would be."""
    qk = tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32)
    for r0 in range(0, param, R_BLOCK):
        a, b = _lowrank_factor_blocks(arena_ptr, off, param, m, r0, rows, row_mask, HEAD_DIM, R_BLOCK)
        qb = tl.dot(q, tl.trans(b.to(COMPUTE_DTYPE)), input_precision=DOT_PRECISION)
        qk = tl.dot(qb.to(COMPUTE_DTYPE), tl.trans(a.to(COMPUTE_DTYPE)), qk, input_precision=DOT_PRECISION)
    return qk


@triton.jit
def _lowrank_weighted_sum(p, arena_ptr, off, param, m, rows, row_mask, HEAD_DIM: tl.constexpr,
                          R_BLOCK: tl.constexpr, COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``p @ V[rows]`` for a low-rank payload ``V = A @ B`` computed as ``(p @ A[rows]) @ B``: ``[G, HEAD_DIM]``
    fp32. ``p``: ``[G, BLOCK_N]`` weights in ``COMPUTE_DTYPE`` (0 on masked rows)."""
    out = tl.zeros([p.shape[0], HEAD_DIM], dtype=tl.float32)
    for r0 in range(0, param, R_BLOCK):
        a, b = _lowrank_factor_blocks(arena_ptr, off, param, m, r0, rows, row_mask, HEAD_DIM, R_BLOCK)
        pa = tl.dot(p, a.to(COMPUTE_DTYPE), input_precision=DOT_PRECISION)
        out = tl.dot(pa.to(COMPUTE_DTYPE), b.to(COMPUTE_DTYPE), out, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _online_softmax_probs(qk, qk_mask, m_i, l_i, qk_scale):
    """The softmax half of :func:`_update_online_softmax`, from the raw scores ``qk = q @ k^T`` (fp32):
    ``(p, alpha, m_new, l_new)``; the caller adds ``p @ v`` to ``acc * alpha``. Lets a caller score with ``k``
    before it builds ``v``, so the two are never held at once."""
    qk = tl.where(qk_mask, qk * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _update_online_softmax(q, k, v, qk_mask, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """One flash-attention step in the base-2 domain. ``q [M, D]``, ``k``/``v [N, D]`` (same dtype),
    ``qk_mask`` broadcastable to ``[M, N]``; ``qk_scale = sm_scale * log2(e)``. Fully masked rows stay neutral."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    p, alpha, m_new, l_i = _online_softmax_probs(qk, qk_mask, m_i, l_i, qk_scale)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc
