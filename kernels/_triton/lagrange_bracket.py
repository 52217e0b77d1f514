# SPDX-License-Identifier: Apache-2.0
"""Triton kernel of the planner's Lagrangian bracket search (``mosaickv_sglang.lagrange``), every round in one launch.

Problem ``l`` (one program each) has errors ``e[l, n, c]`` (stored candidate-major, ``ET[l, c, n]``), candidate bytes
``b[c]`` (fp64) and ``bl[c]`` (int64) and a budget. Its bytes at ``lam`` are ``sum_n bl[argmin_c e[l, n, c] + lam *
b[c]]`` (ties: the lower ``c``), falling as ``lam`` grows. Each of ``ROUNDS`` rounds, while ``hi > lo * REL1``, puts
``GRID`` geometric points ``exp(log lo + t_k (log hi - log lo))`` in ``[lo, hi]`` and keeps the first feasible one and
the point before it (``hi`` when none is). Every operation is the torch path's, in its order, with fp64 rounding at
each step (the launcher turns off multiply-add contraction), so the bracket ends where the torch path's does.

A round scores ``[BLOCK_N, GRID, BLOCK_C]`` at a time (segments, lambdas, candidates): ``BLOCK_C`` candidates' errors
of ``BLOCK_N`` segments in one load, so that few loads a round wait on each other. A block's minimum is taken over
its candidates first (the lowest index among equal scores), then against the blocks before it (a strict ``<``).
"""

import triton
import triton.language as tl


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
    bl0 = tl.load(BL)
    lo = tl.load(LO + pid)
    hi = tl.load(HI + pid)
    for _ in range(ROUNDS):
        active = hi > lo * rel1
        log_lo = tl.log(lo)
        log_hi = tl.log(hi)
        grid = tl.exp(log_lo + t * (log_hi - log_lo))
        totals = tl.zeros([GRID], dtype=tl.int64)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            best = tl.full([BLOCK_N, GRID], float("inf"), tl.float64)
            best_bytes = tl.zeros([BLOCK_N, GRID], dtype=tl.int64) + bl0
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                mask_c = offs_c < C
                e = tl.load(ET + (pid * C + offs_c[None, :]) * N + offs_n[:, None],
                            mask=mask_n[:, None] & mask_c[None, :], other=float("inf"))  # fmt: skip
                b = tl.load(B + offs_c, mask=mask_c, other=0.0)
                bl = tl.load(BL + offs_c, mask=mask_c, other=0)
                score = e[:, None, :] + grid[None, :, None] * b[None, None, :]
                low = tl.min(score, 2)
                first = tl.min(tl.where(score == low[:, :, None], offs_c[None, None, :], C), 2)
                low_bytes = tl.sum(tl.where(offs_c[None, None, :] == first[:, :, None], bl[None, None, :], 0), 2)
                better = low < best
                best = tl.where(better, low, best)
                best_bytes = tl.where(better, low_bytes, best_bytes)
            totals += tl.sum(tl.where(mask_n[:, None], best_bytes, 0), 0)
        first_fit = tl.min(tl.where(totals <= budget, k, GRID), 0)
        below = tl.max(tl.where(k == first_fit - 1, grid, float("-inf")), 0)
        above = tl.max(tl.where(k == first_fit, grid, float("-inf")), 0)
        lo = tl.where(active, tl.where(first_fit == 0, lo, below), lo)
        hi = tl.where(active, tl.where(first_fit == GRID, hi, above), hi)
    tl.store(OUT_LO + pid, lo)
    tl.store(OUT_HI + pid, hi)
