# SPDX-License-Identifier: Apache-2.0
"""Triton kernel of the planner's Lagrangian choice before its bracket search (``mosaickv_sglang.lagrange``): the
errors made fp64 and candidate-major, and each problem's starting bracket, one program a problem.

Problem ``l`` has errors ``err[l, n, c]`` (any float dtype, any strides), candidate bytes ``b[c]`` (fp64) and ``bl[c]``
(int64) and a budget. The program, as the torch path:

1. writes ``ET[l, c, n]``, the errors in fp64 with ``nan`` as ``inf``, and finds their spread: the largest (non-finite
   ones counted as 0) less the smallest finite one;
2. scores its segments (:func:`~mosaickv_sglang.kernels._triton.lagrange_bracket._block_bytes_at`, after a barrier:
   it reads ``ET``) at lambda 0 and at ``hi0 * GROWTH^k`` for ``k < GROWTH_STEPS``, ``hi0 = max(spread, 0) + 1``: the
   minimal-error choice fits (``FITS0``), and ``hi`` is the first of the growing lambdas that fits (the last if none
   does);
3. scores them at ``lo = hi * LO_FACTOR``; the bracket to search is ``[lo, hi]``, or ``[lo, lo]`` where either the
   minimal-error choice or the one at ``lo`` fits (no search).
"""

import triton
import triton.language as tl

from .lagrange_bracket import _block_bytes_at


@triton.jit(do_not_specialize=["N", "C", "stride_l", "stride_n", "stride_c"],
            do_not_specialize_on_alignment=["ERR", "BUDGET"])  # fmt: skip
def _start_kernel(
    ERR, ET, B, BL, BUDGET, LO_FACTOR, LO, HI, FITS0,
    N, C, stride_l, stride_n, stride_c,
    GROWTH: tl.constexpr, GROWTH_STEPS: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    largest = tl.full([BLOCK_N, BLOCK_C], float("-inf"), tl.float64)
    smallest = tl.full([BLOCK_N, BLOCK_C], float("inf"), tl.float64)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = mask_n[:, None] & (offs_c < C)[None, :]
            e = tl.load(ERR + pid * stride_l + offs_n[:, None] * stride_n + offs_c[None, :] * stride_c, mask=mask,
                        other=0.0).to(tl.float64)  # fmt: skip
            e = tl.where(e != e, float("inf"), e)
            tl.store(ET + (pid * C + offs_c[None, :]) * N + offs_n[:, None], e, mask=mask)
            finite = (e < float("inf")) & (e > float("-inf"))
            largest = tl.maximum(largest, tl.where(mask, tl.where(finite, e, 0.0), float("-inf")))
            smallest = tl.minimum(smallest, tl.where(finite & mask, e, float("inf")))
    spread = tl.max(tl.max(largest, 1), 0) - tl.min(tl.min(smallest, 1), 0)
    hi0 = tl.maximum(spread, 0.0) + 1.0
    tl.debug_barrier()

    # lambda 0, then hi0 * GROWTH^k (exact: powers of two), padded to BLOCK_K with more lambdas 0
    k = tl.arange(0, BLOCK_K)
    power = tl.where(k == 0, 0.0, 1.0).to(tl.float64)
    for i in tl.static_range(1, GROWTH_STEPS):
        power = tl.where((k > i) & (k <= GROWTH_STEPS), power * GROWTH, power)
    power = tl.where(k > GROWTH_STEPS, 0.0, power)
    lams = hi0 * power
    budget = tl.load(BUDGET + pid)
    totals = tl.zeros([BLOCK_K], dtype=tl.int64)
    for n0 in range(0, N, BLOCK_N):
        totals += _block_bytes_at(ET, B, BL, pid, n0, N, C, lams, BLOCK_K, BLOCK_N, BLOCK_C)
    fits = totals <= budget
    fits_at_zero = tl.sum(tl.where(k == 0, fits, 0), 0) > 0
    grown = fits & (k >= 1) & (k <= GROWTH_STEPS)
    first = tl.min(tl.where(grown, k, GROWTH_STEPS), 0)
    hi = tl.max(tl.where(k == first, lams, float("-inf")), 0)

    lo = hi * tl.load(LO_FACTOR)
    at_lo = tl.zeros([2], dtype=tl.int64)
    lo_lams = tl.zeros([2], dtype=tl.float64) + lo
    for n0 in range(0, N, BLOCK_N):
        at_lo += _block_bytes_at(ET, B, BL, pid, n0, N, C, lo_lams, 2, BLOCK_N, BLOCK_C)
    fits_at_lo = tl.max(at_lo, 0) <= budget
    tl.store(LO + pid, lo)
    tl.store(HI + pid, tl.where(fits_at_zero | fits_at_lo, lo, hi))
    tl.store(FITS0 + pid, fits_at_zero)
