# SPDX-License-Identifier: Apache-2.0
"""Triton kernels of the planner's Lagrangian choice (``mosaickv_sglang.lagrange``): bytes at given lambdas, and the
bracket search, every round in one launch.

Problem ``l`` (one program each) has errors ``e[l, n, c]`` (stored candidate-major, ``ET[l, c, n]``), candidate bytes
``b[c]`` (fp64) and ``bl[c]`` (int64) and a budget. Its bytes at ``lam`` are ``sum_n bl[argmin_c e[l, n, c] + lam *
b[c]]`` (ties: the lower ``c``), falling as ``lam`` grows (:func:`_bytes_at`; ``_totals_kernel`` at given lambdas).
Each of ``ROUNDS`` rounds of ``_bracket_kernel``, while ``hi > lo * REL1``, puts ``GRID`` geometric points ``exp(log lo
+ t_k (log hi - log lo))`` in ``[lo, hi]`` and keeps the first feasible one and the point before it (``hi`` when none
is). Every operation is the torch path's, in its order, with fp64 rounding at each step (the launcher turns off
multiply-add contraction), so the bracket ends where the torch path's does.

:func:`_bytes_at` scores ``[BLOCK_N, K, BLOCK_C]`` at a time (segments, lambdas, candidates): ``BLOCK_C`` candidates'
errors of ``BLOCK_N`` segments in one load, so that few loads a round wait on each other. A block's minimum is taken
over its candidates first (the lowest index among equal scores), then against the blocks before it (a strict ``<``).
"""

import triton
import triton.language as tl


@triton.jit
def _bytes_at(ET, B, BL, pid, N, C, lams, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Problem ``pid``'s bytes at each of the ``K`` lambdas ``lams``: ``[K]`` int64."""
    bl0 = tl.load(BL)
    totals = tl.zeros([K], dtype=tl.int64)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        best = tl.full([BLOCK_N, K], float("inf"), tl.float64)
        best_bytes = tl.zeros([BLOCK_N, K], dtype=tl.int64) + bl0
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            e = tl.load(ET + (pid * C + offs_c[None, :]) * N + offs_n[:, None],
                        mask=mask_n[:, None] & mask_c[None, :], other=float("inf"))  # fmt: skip
            b = tl.load(B + offs_c, mask=mask_c, other=0.0)
            bl = tl.load(BL + offs_c, mask=mask_c, other=0)
            score = e[:, None, :] + lams[None, :, None] * b[None, None, :]
            low = tl.min(score, 2)
            first = tl.min(tl.where(score == low[:, :, None], offs_c[None, None, :], C), 2)
            low_bytes = tl.sum(tl.where(offs_c[None, None, :] == first[:, :, None], bl[None, None, :], 0), 2)
            better = low < best
            best = tl.where(better, low, best)
            best_bytes = tl.where(better, low_bytes, best_bytes)
        totals += tl.sum(tl.where(mask_n[:, None], best_bytes, 0), 0)
    return totals


@triton.jit(do_not_specialize=["N", "C", "K"], do_not_specialize_on_alignment=["BL"])
def _totals_kernel(
    ET, B, BL, LAMS, OUT,
    N, C, K,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    mask_k = kk < K
    lams = tl.load(LAMS + pid * K + kk, mask=mask_k, other=1.0)
    totals = _bytes_at(ET, B, BL, pid, N, C, lams, BLOCK_K, BLOCK_N, BLOCK_C)
    tl.store(OUT + pid * K + kk, totals, mask=mask_k)


@triton.jit(do_not_specialize=["N", "C"], do_not_specialize_on_alignment=["BL", "BUDGET"])
def _bracket_kernel(
    ET, B, BL, BUDGET, LO, HI, T, REL1, OUT_LO, OUT_HI,
    N, C,
    ROUNDS: tl.constexpr, GRID: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, GRID)
    t = tl.load(T + k)
    rel1 = tl.load(REL1)
    budget = tl.load(BUDGET + pid)
    lo = tl.load(LO + pid)
    hi = tl.load(HI + pid)
    for _ in range(ROUNDS):
        active = hi > lo * rel1
        log_lo = tl.log(lo)
        log_hi = tl.log(hi)
        grid = tl.exp(log_lo + t * (log_hi - log_lo))
        totals = _bytes_at(ET, B, BL, pid, N, C, grid, GRID, BLOCK_N, BLOCK_C)
        first_fit = tl.min(tl.where(totals <= budget, k, GRID), 0)
        below = tl.max(tl.where(k == first_fit - 1, grid, float("-inf")), 0)
        above = tl.max(tl.where(k == first_fit, grid, float("-inf")), 0)
        lo = tl.where(active, tl.where(first_fit == 0, lo, below), lo)
        hi = tl.where(active, tl.where(first_fit == GRID, hi, above), hi)
    tl.store(OUT_LO + pid, lo)
    tl.store(OUT_HI + pid, hi)
