# SPDX-License-Identifier: Apache-2.0
"""Launcher of the planner's Lagrangian bracket search, every round in one launch.

The planner's batched choice (``mosaickv_sglang.lagrange``) otherwise runs ``_ROUNDS`` rounds of about fourteen torch
ops each (about 300 launches a planner call, whatever its page and layer counts), and materialises each round's
``[L, GRID, N, C]`` scores. The Triton code is in ``mosaickv_sglang.kernels._triton.lagrange_bracket``; its oracle is
the torch path, ``mosaickv_sglang.lagrange._bracket_torch``, which it matches bit for bit where ``exp`` and ``log``
round alike (the tests compare them on the CPU through the interpreter).

Fixed heuristics: :data:`BLOCK_N` segments by :data:`BLOCK_C` candidates a step, :data:`NUM_WARPS` warps, one program
a problem. Not yet timed on a GPU.
"""

from __future__ import annotations

from typing import Tuple

import torch

from . import _checks
from ._triton.lagrange_bracket import _bracket_kernel

__all__ = ["bracket_fwd", "BLOCK_C", "BLOCK_N", "NUM_WARPS"]

BLOCK_N = 32
BLOCK_C = 16
NUM_WARPS = 8


def bracket_fwd(
    e: torch.Tensor,
    b: torch.Tensor,
    bl: torch.Tensor,
    budget: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    t: torch.Tensor,
    rel1: float,
    rounds: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Shrink each problem's ``[lo, hi]`` for ``rounds`` rounds (see the Triton module's docstring).

    Parameters
    ----------
    e : torch.Tensor
        shape ``[L, N, C]``, dtype ``torch.float64``: errors, ``inf`` for a candidate a segment may not use (no
        ``nan``).
    b, bl : torch.Tensor
        shape ``[C]``, dtypes ``torch.float64`` and ``torch.int64``: bytes of each candidate (the same values).
    budget : torch.Tensor
        shape ``[L]``, dtype ``torch.int64``.
    lo, hi : torch.Tensor
        shape ``[L]``, dtype ``torch.float64``, ``0 < lo <= hi``: each problem's bracket.
    t : torch.Tensor
        shape ``[GRID]``, dtype ``torch.float64``, ``GRID`` a power of two: the grid's fractions of the log-width.
    rel1 : float
        A bracket with ``hi <= lo * rel1`` stays as it is.
    rounds : int
        ``>= 0``.

    Returns
    -------
    tuple of torch.Tensor
        ``(lo, hi)``, new tensors of shape ``[L]``, dtype ``torch.float64``.
    """
    _checks.check_tensor(e, "e", ndim=3, dtype=torch.float64)
    nl, n, c = e.shape
    dev = e.device
    _checks.check_tensor(b, "b", shape=(c,), dtype=torch.float64, device=dev, contiguous=True)
    _checks.check_tensor(bl, "bl", shape=(c,), dtype=torch.int64, device=dev, contiguous=True)
    _checks.check_tensor(budget, "budget", shape=(nl,), dtype=torch.int64, device=dev, contiguous=True)
    for name, x in (("lo", lo), ("hi", hi)):
        _checks.check_tensor(x, name, shape=(nl,), dtype=torch.float64, device=dev, contiguous=True)
    _checks.check_tensor(t, "t", ndim=1, dtype=torch.float64, device=dev, contiguous=True)
    grid = t.shape[0]
    if grid < 1 or grid & (grid - 1):
        raise ValueError(f"t: expected a power-of-two length, got {grid}")
    if c == 0:
        raise ValueError(f"e: expected at least one candidate, got shape {list(e.shape)}")
    if rounds < 0:
        raise ValueError(f"rounds: expected >= 0, got {rounds}")
    out_lo, out_hi = torch.empty_like(lo), torch.empty_like(hi)
    if nl == 0:
        return out_lo, out_hi
    et = e.transpose(1, 2).contiguous()  # candidate-major: a candidate's errors of BLOCK_N segments contiguous
    rel = torch.full((1,), rel1, dtype=torch.float64, device=dev)  # a fill, not a host copy: graphs capture it
    _bracket_kernel[(nl,)](
        et, b, bl, budget, lo, hi, t, rel, out_lo, out_hi, n, c,
        ROUNDS=rounds, GRID=grid, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS, enable_fp_fusion=False,
    )  # fmt: skip
    return out_lo, out_hi
