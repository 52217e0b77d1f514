# SPDX-License-Identifier: Apache-2.0
"""Launcher of the planner's Lagrangian choice before the bracket search: the errors made fp64 and candidate-major, and
each problem's starting bracket, in one launch, one program a problem.

The torch path (``mosaickv_sglang.lagrange._start_torch``) takes about forty launches, whatever its page and layer
counts; here they are one, which scores a problem's segments twice (at 9 lambdas, then at 1) in one program: a few
microseconds for the 128 segments of a 16-page slice, more for the 1,024 of a 128-page layer. The Triton code is in
``mosaickv_sglang.kernels._triton.lagrange_start``; its oracle is the torch path, which it matches bit for bit (the
tests compare them on the CPU through the interpreter). Fixed heuristics: the bracket search's :data:`BLOCK_N` segments
by :data:`BLOCK_C` candidates a step, :data:`NUM_WARPS` warps. Not yet timed on a GPU.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import triton

from . import _checks
from ._triton.lagrange_start import _start_kernel
from .lagrange_bracket import BLOCK_C, BLOCK_N

__all__ = ["start_fwd", "BLOCK_C", "BLOCK_N", "NUM_WARPS"]

NUM_WARPS = 8


def start_fwd(
    err: torch.Tensor, b: torch.Tensor, bl: torch.Tensor, budget: torch.Tensor, lo_factor: torch.Tensor,
    growth: float, growth_steps: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Each problem's errors as the other kernels read them and its starting bracket (see the Triton module's
    docstring).

    Parameters
    ----------
    err : torch.Tensor
        shape ``[L, N, C]``, float (any strides), ``C >= 1``: errors, ``inf`` for a candidate a segment may not use
        (``nan`` counts as ``inf``).
    b, bl : torch.Tensor
        shape ``[C]``, dtypes ``torch.float64`` and ``torch.int64``: bytes of each candidate (the same values).
    budget : torch.Tensor
        shape ``[L]``, dtype ``torch.int64``.
    lo_factor : torch.Tensor
        shape ``[1]``, dtype ``torch.float64``: the bracket starts at ``[hi * lo_factor, hi]``.
    growth : float
        A power of two (exact in the kernel's fp32 constant), ``> 1``.
    growth_steps : int
        ``>= 1``: lambdas tried for ``hi``, ``max(spread, 0) + 1`` times ``growth^k``, ``k < growth_steps``.

    Returns
    -------
    tuple of torch.Tensor
        ``(et, lo, hi, fits_at_zero)``: ``et`` shape ``[L, C, N]``, fp64, contiguous; the bracket to search, shape
        ``[L]``, fp64 each (``hi == lo`` where no search is needed: the choice at ``lo`` fits, or the minimal-error one
        does); whether the minimal-error choice fits, shape ``[L]``, bool.
    """
    _checks.check_tensor(err, "err", ndim=3, dtype=(torch.float16, torch.bfloat16, torch.float32, torch.float64))
    nl, n, c = err.shape
    dev = err.device
    if c == 0:
        raise ValueError(f"err: expected at least one candidate, got shape {list(err.shape)}")
    _checks.check_tensor(b, "b", shape=(c,), dtype=torch.float64, device=dev, contiguous=True)
    _checks.check_tensor(bl, "bl", shape=(c,), dtype=torch.int64, device=dev, contiguous=True)
    _checks.check_tensor(budget, "budget", shape=(nl,), dtype=torch.int64, device=dev, contiguous=True)
    _checks.check_tensor(lo_factor, "lo_factor", shape=(1,), dtype=torch.float64, device=dev)
    if growth <= 1 or math.frexp(growth)[0] != 0.5:
        raise ValueError(f"growth: expected a power of two above 1, got {growth}")
    if growth_steps < 1:
        raise ValueError(f"growth_steps: expected >= 1, got {growth_steps}")
    et = torch.empty((nl, c, n), dtype=torch.float64, device=dev)
    lo, hi = (torch.empty((nl,), dtype=torch.float64, device=dev) for _ in range(2))
    fits_at_zero = torch.empty((nl,), dtype=torch.bool, device=dev)
    if nl == 0 or n == 0:
        return et, lo.zero_(), hi.zero_(), fits_at_zero.fill_(True)
    _start_kernel[(nl,)](
        err, et, b, bl, budget, lo_factor, lo, hi, fits_at_zero, n, c, *err.stride(),
        GROWTH=growth, GROWTH_STEPS=growth_steps, BLOCK_K=triton.next_power_of_2(growth_steps + 1), BLOCK_N=BLOCK_N,
        BLOCK_C=BLOCK_C, num_warps=NUM_WARPS, enable_fp_fusion=False,
    )  # fmt: skip
    return et, lo, hi, fits_at_zero
