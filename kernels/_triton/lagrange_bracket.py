# SPDX-License-Identifier: Apache-2.0
"""Triton kernels of the planner's Lagrangian choice (``mosaickv_sglang.lagrange``): bytes at given lambdas, and the
bracket search, one launch a round, each spread over blocks of segments.

Problem ``l`` has errors ``e[l, n, c]`` (stored candidate-major, ``ET[l, c, n]``), candidate bytes ``b[c]`` (fp64) and
``bl[c]`` (int64) and a budget. Its bytes at ``lam`` are ``sum_n bl[argmin_c e[l, n, c] + lam * b[c]]`` (ties: the lower
``c``), falling as ``lam`` grows. A program takes one problem and one block of ``BLOCK_N`` segments
(:func:`_block_bytes_at`) and writes its block's share; whoever needs a problem's bytes adds the shares up (integers:
the same sums in any order).

Each round of the bracket search, while ``hi > lo * REL1``, puts ``GRID`` geometric points ``exp(log lo + t_k (log hi -
log lo))`` in ``[lo, hi]`` and keeps the first feasible one and the point before it (``hi`` when none is). Round ``r``'s
programs (``_bracket_round_kernel``) first finish round ``r - 1`` from its shares (every program alike; the first
block's stores the bracket it starts from), then score their block at round ``r``'s points; ``_bracket_end_kernel``
finishes the last round. Every operation is the torch path's, in its order, with fp64 rounding at each step (the
launchers turn off multiply-add contraction), so the bracket ends where the torch path's does.

:func:`_block_bytes_at` scores ``[BLOCK_N, K, BLOCK_C]`` at a time (segments, lambdas, candidates): ``BLOCK_C``
candidates' errors of ``BLOCK_N`` segments in one load. A block's minimum is taken over its candidates first (the lowest
index among equal scores), then against the blocks before it (a strict ``<``).
"""

import triton
import triton.language as tl


@triton.jit
def _candidate_block(ET, pid, offs_n, mask_n, c0, N, C, BLOCK_C: tl.constexpr):
    """Problem ``pid``'s errors of segments ``offs_n`` for candidates ``c0 .. c0 + BLOCK_C`` (``inf`` past either end):
    ``([BLOCK_N, BLOCK_C] e, offs_c, mask_c)``."""
    offs_c = c0 + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    e = tl.load(ET + (pid * C + offs_c[None, :]) * N + offs_n[:, None], mask=mask_n[:, None] & mask_c[None, :],
                other=float("inf"))  # fmt: skip
    return e, offs_c, mask_c


@triton.jit
def _first_min(score, offs_c, C, AXIS: tl.constexpr):
    """The smallest ``score`` along ``AXIS`` (the candidates') and the lowest candidate holding it."""
    low = tl.min(score, AXIS)
    return low, tl.min(tl.where(score == tl.expand_dims(low, AXIS), offs_c, C), AXIS)


@triton.jit
def _block_bytes_at(ET, B, BL, pid, n0, N, C, lams, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Problem ``pid``'s bytes at each of the ``K`` lambdas ``lams`` over its segments ``n0 .. n0 + BLOCK_N``: ``[K]``
    int64."""
    bl0 = tl.load(BL)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    best = tl.full([BLOCK_N, K], float("inf"), tl.float64)
    best_bytes = tl.zeros([BLOCK_N, K], dtype=tl.int64) + bl0
    for c0 in range(0, C, BLOCK_C):
        e, offs_c, mask_c = _candidate_block(ET, pid, offs_n, mask_n, c0, N, C, BLOCK_C)
        b = tl.load(B + offs_c, mask=mask_c, other=0.0)
        bl = tl.load(BL + offs_c, mask=mask_c, other=0)
        score = e[:, None, :] + lams[None, :, None] * b[None, None, :]
        low, first = _first_min(score, offs_c[None, None, :], C, 2)
        low_bytes = tl.sum(tl.where(offs_c[None, None, :] == first[:, :, None], bl[None, None, :], 0), 2)
        better = low < best
        best = tl.where(better, low, best)
        best_bytes = tl.where(better, low_bytes, best_bytes)
    return tl.sum(tl.where(mask_n[:, None], best_bytes, 0), 0)


@triton.jit
def _grid_of(lo, hi, t):
    log_lo = tl.log(lo)
    log_hi = tl.log(hi)
    return tl.exp(log_lo + t * (log_hi - log_lo))


@triton.jit
def _shares_summed(PART, r, pid, L, NB, GRID: tl.constexpr, BLOCK_B: tl.constexpr):
    """Problem ``pid``'s bytes at round ``r``'s points: its ``NB`` blocks' shares added up, ``[GRID]`` int64."""
    k = tl.arange(0, GRID)
    base = PART + (r * L + pid) * NB * GRID
    totals = tl.zeros([GRID], dtype=tl.int64)
    for b0 in range(0, NB, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        share = tl.load(base + offs_b[:, None] * GRID + k[None, :], mask=(offs_b < NB)[:, None], other=0)
        totals += tl.sum(share, 0)
    return totals


@triton.jit
def _shrunk(lo, hi, t, rel1, budget, totals, GRID: tl.constexpr):
    """The bracket after a round that found ``totals`` at the points of ``[lo, hi]`` (unchanged if already narrow)."""
    k = tl.arange(0, GRID)
    active = hi > lo * rel1
    grid = _grid_of(lo, hi, t)
    first_fit = tl.min(tl.where(totals <= budget, k, GRID), 0)
    below = tl.max(tl.where(k == first_fit - 1, grid, float("-inf")), 0)
    above = tl.max(tl.where(k == first_fit, grid, float("-inf")), 0)
    new_lo = tl.where(active, tl.where(first_fit == 0, lo, below), lo)
    new_hi = tl.where(active, tl.where(first_fit == GRID, hi, above), hi)
    return new_lo, new_hi


@triton.jit(do_not_specialize=["N", "C", "K"], do_not_specialize_on_alignment=["BL"])
def _totals_kernel(
    ET, B, BL, LAMS, PART,
    N, C, K,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    nb = tl.num_programs(1)
    kk = tl.arange(0, BLOCK_K)
    mask_k = kk < K
    lams = tl.load(LAMS + pid * K + kk, mask=mask_k, other=1.0)
    share = _block_bytes_at(ET, B, BL, pid, blk * BLOCK_N, N, C, lams, BLOCK_K, BLOCK_N, BLOCK_C)
    tl.store(PART + (pid * nb + blk) * K + kk, share, mask=mask_k)


@triton.jit(do_not_specialize=["N", "C", "L", "NB", "R"], do_not_specialize_on_alignment=["BL", "BUDGET"])
def _bracket_round_kernel(
    ET, B, BL, BUDGET, LO, HI, T, REL1, BOUNDS, PART,
    N, C, L, NB, R,
    GRID: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """Round ``R`` for problem ``program_id(0)``, segment block ``program_id(1)``: ``BOUNDS[R, l]`` the bracket it
    starts from, ``PART[R, l, block]`` the block's bytes at its points (zeros once the bracket is narrow)."""
    pid = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    t = tl.load(T + tl.arange(0, GRID))
    rel1 = tl.load(REL1)
    if R == 0:
        lo = tl.load(LO + pid)
        hi = tl.load(HI + pid)
    else:
        prev = BOUNDS + ((R - 1) * L + pid) * 2
        totals = _shares_summed(PART, R - 1, pid, L, NB, GRID, BLOCK_B)
        lo, hi = _shrunk(tl.load(prev), tl.load(prev + 1), t, rel1, tl.load(BUDGET + pid), totals, GRID)
    if blk == 0:
        tl.store(BOUNDS + (R * L + pid) * 2, lo)
        tl.store(BOUNDS + (R * L + pid) * 2 + 1, hi)
    share = tl.zeros([GRID], dtype=tl.int64)
    if hi > lo * rel1:
        share = _block_bytes_at(ET, B, BL, pid, blk * BLOCK_N, N, C, _grid_of(lo, hi, t), GRID, BLOCK_N, BLOCK_C)
    tl.store(PART + ((R * L + pid) * NB + blk) * GRID + tl.arange(0, GRID), share)


@triton.jit(do_not_specialize=["L", "NB", "R"], do_not_specialize_on_alignment=["BUDGET"])
def _bracket_end_kernel(
    BUDGET, T, REL1, BOUNDS, PART, OUT_LO, OUT_HI,
    L, NB, R,
    GRID: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """Finish the last round, ``R - 1``, of problem ``program_id(0)``."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(T + tl.arange(0, GRID))
    prev = BOUNDS + ((R - 1) * L + pid) * 2
    totals = _shares_summed(PART, R - 1, pid, L, NB, GRID, BLOCK_B)
    lo, hi = _shrunk(tl.load(prev), tl.load(prev + 1), t, tl.load(REL1), tl.load(BUDGET + pid), totals, GRID)
    tl.store(OUT_LO + pid, lo)
    tl.store(OUT_HI + pid, hi)
