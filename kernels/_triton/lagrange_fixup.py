# SPDX-License-Identifier: Apache-2.0
"""Triton kernel of the planner's Lagrangian choice after its bracket search (``mosaickv_sglang.lagrange``): the picks
at the two ends of the bracket, the threshold upgrades and the single fix-up move, one program a problem.

Problem ``l`` has errors ``e[l, n, c]`` (stored candidate-major, ``ET[l, c, n]``), candidate bytes ``b[c]`` (fp64) and
``bl[c]`` (int64), a budget, the bracket ``[lo, hi]`` (``hi == lo`` where no search ran) and whether the minimal-error
choice fits (``FITS0``). The lambda chosen is 0 where it does, else ``hi``, and the upgrades move toward ``lam_alt``, 0
or ``lo``. The program runs the torch path's steps over blocks of segments, its scratch rows in global memory between
them (a barrier after each pass):

1. ``choice`` and ``alt``: ``argmin_c e + lam * b`` and ``... + lam_alt * b`` (ties: the lower ``c``); each segment's
   extra bytes and error saved per byte if moved from ``choice`` to ``alt`` (``-inf`` where they agree).
2. The upgrades' order is a stable sort by that slope, descending: segment ``j`` comes no later than ``i`` when its
   slope is larger, or equal and ``j <= i``. Each segment's running extra is the sum over the segments no later than
   it (all pairs compared: ``O(N^2)``, no sort).
3. A segment moves to ``alt`` when no segment no later than it has a running extra past the budget left (the torch
   path's cumulative product: the running extra need not grow, an ``extra`` may round below zero).
4. Unless the minimal-error choice fits: the one fitting move with the largest error reduction (the first
   in row-major order among equal ones), if it reduces the error.

Every comparison and the one division are the torch path's in fp64, so the choices are the same bit for bit.
"""

import triton
import triton.language as tl

from .lagrange_bracket import _candidate_block, _first_min


@triton.jit
def _block_picks(ET, B, pid, offs_n, mask_n, N, C, lam, lam_alt, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """Segments ``offs_n``'s ``argmin_c e + lam * b`` and ``argmin_c e + lam_alt * b`` (``[BLOCK_N]`` int64 each)
    and their errors."""
    best = tl.full([BLOCK_N], float("inf"), tl.float64)
    best_alt = tl.full([BLOCK_N], float("inf"), tl.float64)
    choice = tl.zeros([BLOCK_N], dtype=tl.int64)
    alt = tl.zeros([BLOCK_N], dtype=tl.int64)
    e_choice = tl.zeros([BLOCK_N], dtype=tl.float64)
    e_alt = tl.zeros([BLOCK_N], dtype=tl.float64)
    for c0 in range(0, C, BLOCK_C):
        e, offs_c, mask_c = _candidate_block(ET, pid, offs_n, mask_n, c0, N, C, BLOCK_C)
        b = tl.load(B + offs_c, mask=mask_c, other=0.0)

        low, first = _first_min(e + lam * b[None, :], offs_c[None, :], C, 1)
        better = low < best
        best = tl.where(better, low, best)
        choice = tl.where(better, first, choice)
        e_choice = tl.where(better, tl.sum(tl.where(offs_c[None, :] == first[:, None], e, 0.0), 1), e_choice)

        low, first = _first_min(e + lam_alt * b[None, :], offs_c[None, :], C, 1)
        better = low < best_alt
        best_alt = tl.where(better, low, best_alt)
        alt = tl.where(better, first, alt)
        e_alt = tl.where(better, tl.sum(tl.where(offs_c[None, :] == first[:, None], e, 0.0), 1), e_alt)
    return choice, alt, e_choice, e_alt


@triton.jit
def _no_later(SLOPE, base, offs_i, s_i, j0, N, BLOCK_J: tl.constexpr):
    """``[BLOCK_I, BLOCK_J]``: segment ``j0 + j`` comes no later than ``offs_i[i]`` in the upgrades' order."""
    offs_j = j0 + tl.arange(0, BLOCK_J)
    mask_j = offs_j < N
    s_j = tl.load(SLOPE + base + offs_j, mask=mask_j, other=float("-inf"))
    before = (s_j[None, :] > s_i[:, None]) | ((s_j[None, :] == s_i[:, None]) & (offs_j[None, :] <= offs_i[:, None]))
    return before & mask_j[None, :], offs_j, mask_j


@triton.jit(do_not_specialize=["N", "C"], do_not_specialize_on_alignment=["BL", "BUDGET"])
def _fixup_kernel(
    ET, B, BL, BUDGET, LO, HI, FITS0, LAM, CHOICE, ALT, EXTRA, SLOPE, RUNNING,
    N, C,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    """Problem ``program_id(0)``'s choice into ``CHOICE[l]`` and its lambda into ``LAM[l]``; ``ALT``, ``EXTRA``,
    ``SLOPE`` and ``RUNNING`` are its scratch rows."""
    pid = tl.program_id(0).to(tl.int64)
    base = pid * N
    budget = tl.load(BUDGET + pid)
    fits_at_zero = tl.load(FITS0 + pid) != 0
    lam = tl.where(fits_at_zero, 0.0, tl.load(HI + pid))
    lam_alt = tl.where(fits_at_zero, 0.0, tl.load(LO + pid))
    tl.store(LAM + pid, lam)

    used = tl.zeros([BLOCK_N], dtype=tl.int64)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        choice, alt, e_choice, e_alt = _block_picks(ET, B, pid, offs_n, mask_n, N, C, lam, lam_alt, BLOCK_N, BLOCK_C)
        bytes_choice = tl.load(BL + choice)
        moved = alt != choice
        extra = tl.where(moved, tl.load(BL + alt) - bytes_choice, 0)
        slope = tl.where(moved, (e_choice - e_alt) / tl.maximum(extra, 1).to(tl.float64), float("-inf"))
        tl.store(CHOICE + base + offs_n, choice, mask=mask_n)
        tl.store(ALT + base + offs_n, alt, mask=mask_n)
        tl.store(EXTRA + base + offs_n, extra, mask=mask_n)
        tl.store(SLOPE + base + offs_n, slope, mask=mask_n)
        used += tl.where(mask_n, bytes_choice, 0)
    left = budget - tl.sum(used, 0)
    tl.debug_barrier()

    for i0 in range(0, N, BLOCK_N):
        offs_i = i0 + tl.arange(0, BLOCK_N)
        mask_i = offs_i < N
        s_i = tl.load(SLOPE + base + offs_i, mask=mask_i, other=float("-inf"))
        running = tl.zeros([BLOCK_N], dtype=tl.int64)
        for j0 in range(0, N, BLOCK_J):
            before, offs_j, mask_j = _no_later(SLOPE, base, offs_i, s_i, j0, N, BLOCK_J)
            x_j = tl.load(EXTRA + base + offs_j, mask=mask_j, other=0)
            running += tl.sum(tl.where(before, x_j[None, :], 0), 1)
        tl.store(RUNNING + base + offs_i, running, mask=mask_i)
    tl.debug_barrier()

    used = tl.zeros([BLOCK_N], dtype=tl.int64)
    for i0 in range(0, N, BLOCK_N):
        offs_i = i0 + tl.arange(0, BLOCK_N)
        mask_i = offs_i < N
        s_i = tl.load(SLOPE + base + offs_i, mask=mask_i, other=float("-inf"))
        over = tl.zeros([BLOCK_N], dtype=tl.int32)
        for j0 in range(0, N, BLOCK_J):
            before, offs_j, mask_j = _no_later(SLOPE, base, offs_i, s_i, j0, N, BLOCK_J)
            r_j = tl.load(RUNNING + base + offs_j, mask=mask_j, other=0)
            over += tl.sum(tl.where(before & (r_j[None, :] > left), 1, 0), 1)
        choice = tl.load(CHOICE + base + offs_i, mask=mask_i, other=0)
        alt = tl.load(ALT + base + offs_i, mask=mask_i, other=0)
        choice = tl.where((alt != choice) & (over == 0), alt, choice)
        tl.store(CHOICE + base + offs_i, choice, mask=mask_i)
        used += tl.where(mask_i, tl.load(BL + choice), 0)
    left = budget - tl.sum(used, 0)
    tl.debug_barrier()

    if tl.load(FITS0 + pid) == 0:
        best_gain = tl.zeros([1], dtype=tl.float64).sum(0)
        best_at = tl.zeros([1], dtype=tl.int64).sum(0)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            choice = tl.load(CHOICE + base + offs_n, mask=mask_n, other=0)
            current = tl.load(ET + (pid * C + choice) * N + offs_n, mask=mask_n, other=0.0)
            bytes_choice = tl.load(BL + choice)
            for c0 in range(0, C, BLOCK_C):
                e, offs_c, mask_c = _candidate_block(ET, pid, offs_n, mask_n, c0, N, C, BLOCK_C)
                bl = tl.load(BL + offs_c, mask=mask_c, other=0)
                ok = (bl[None, :] - bytes_choice[:, None] <= left) & (e < current[:, None])
                gain = tl.where(ok, current[:, None] - e, 0.0)
                top = tl.max(tl.max(gain, 1), 0)
                flat = offs_n[:, None] * C + offs_c[None, :]
                top_at = tl.min(tl.min(tl.where(gain == top, flat, N * C), 1), 0)
                take = (top > best_gain) | ((top == best_gain) & (top_at < best_at))
                best_gain = tl.where(take, top, best_gain)
                best_at = tl.where(take, top_at, best_at)
        if best_gain > 0:
            tl.store(CHOICE + base + best_at // C, best_at % C)
