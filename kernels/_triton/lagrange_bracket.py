# SPDX-License-Identifier: Apache-2.0
"""Triton kernel of the planner's Lagrangian bracket search (``mosaickv_sglang.lagrange``), every round in one launch.

Problem ``l`` (one program each) has errors ``e[l, n, c]`` (stored candidate-major, ``ET[l, c, n]``), candidate bytes
``b[c]`` (fp64) and ``bl[c]`` (int64) and a budget. Its bytes at ``lam`` are ``sum_n bl[argmin_c e[l, n, c] + lam *
b[c]]`` (ties: the lower ``c``), falling as ``lam`` grows. Each of ``ROUNDS`` rounds, while ``hi > lo * REL1``, puts
``GRID`` geometric points ``exp(log lo + t_k (log hi - log lo))`` in ``[lo, hi]`` and keeps the first feasible one and
the point before it (``hi`` when none is). Every operation is the torch path's, in its order, with fp64 rounding at
each step (the launcher turns off multiply-add contraction), so the bracket ends where the torch path's does.
"""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["N", "C"])
def _bracket_kernel(
    ET, B, BL, BUDGET, LO, HI, T, REL1, OUT_LO, OUT_HI,
    N, C,
    ROUNDS: tl.constexpr, GRID: tl.constexpr, BLOCK_N: tl.constexpr,
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
            for c in range(0, C):
                e_c = tl.load(ET + (pid * C + c) * N + offs_n, mask=mask_n, other=0.0)
                score = e_c[:, None] + grid[None, :] * tl.load(B + c)
                better = score < best
                best = tl.where(better, score, best)
                best_bytes = tl.where(better, tl.load(BL + c), best_bytes)
            totals += tl.sum(tl.where(mask_n[:, None], best_bytes, 0), 0)
        first = tl.min(tl.where(totals <= budget, k, GRID), 0)
        below = tl.max(tl.where(k == first - 1, grid, float("-inf")), 0)
        above = tl.max(tl.where(k == first, grid, float("-inf")), 0)
        lo = tl.where(active, tl.where(first == 0, lo, below), lo)
        hi = tl.where(active, tl.where(first == GRID, hi, above), hi)
    tl.store(OUT_LO + pid, lo)
    tl.store(OUT_HI + pid, hi)
