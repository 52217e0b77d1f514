# SPDX-License-Identifier: Apache-2.0
"""Launcher of the planner's Lagrangian choice after the bracket search: the picks at the bracket's ends, the threshold
upgrades and the single fix-up move in one launch, one program a problem.

The torch path (``mosaickv_sglang.lagrange``: ``_pick``, ``_threshold_upgrades``, ``_single_move``) takes about fifty
launches, whatever its page and layer counts; here they are one. The upgrades' order is found by comparing every pair of
a problem's segments instead of sorting them (``O(N^2)`` per problem: 16 K pairs for the 128 segments of a 16-page
slice, 1 M for a 128-page seal's 1,024). The Triton code is in ``mosaickv_sglang.kernels._triton.lagrange_fixup``; its
oracle is the torch path, which it matches bit for bit (the tests compare them on the CPU through the interpreter).
Fixed heuristics: :data:`BLOCK_N` segments by :data:`BLOCK_C` candidates a step, :data:`BLOCK_J` segments compared a
step, :data:`NUM_WARPS` warps. Not yet timed on a GPU.
"""

from __future__ import annotations

from typing import Tuple

import torch

from . import _checks
from ._triton.lagrange_fixup import _fixup_kernel
from .lagrange_bracket import BLOCK_C, check_problem

__all__ = ["fixup_fwd", "BLOCK_C", "BLOCK_J", "BLOCK_N", "NUM_WARPS"]

BLOCK_N = 32
BLOCK_J = 64
NUM_WARPS = 4


def fixup_fwd(
    et: torch.Tensor,
    b: torch.Tensor,
    bl: torch.Tensor,
    budget: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    fits_at_zero: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each problem's choice and lambda from its bracket (see the Triton module's docstring).

    Parameters
    ----------
    et, b, bl : torch.Tensor
        As :func:`~mosaickv_sglang.kernels.lagrange_bracket.bracket_fwd`: errors ``[L, C, N]`` candidate-major (``inf``
        for a candidate a segment may not use, no ``nan``, a finite one in every segment), candidate bytes.
    budget : torch.Tensor
        shape ``[L]``, dtype ``torch.int64``.
    lo, hi : torch.Tensor
        shape ``[L]``, dtype ``torch.float64``: the bracket the search ended with, ``hi == lo`` where none ran.
    fits_at_zero : torch.Tensor
        shape ``[L]``, dtype ``torch.bool``: the minimal-error choice fits.

    Returns
    -------
    tuple of torch.Tensor
        ``(choice, lambda)``: shape ``[L, N]``, dtype ``torch.int64``; shape ``[L]``, dtype ``torch.float64``.
    """
    nl, c, n = check_problem(et, b, bl)
    dev = et.device
    _checks.check_tensor(budget, "budget", shape=(nl,), dtype=torch.int64, device=dev, contiguous=True)
    for name, x in (("lo", lo), ("hi", hi)):
        _checks.check_tensor(x, name, shape=(nl,), dtype=torch.float64, device=dev, contiguous=True)
    _checks.check_tensor(fits_at_zero, "fits_at_zero", shape=(nl,), dtype=torch.bool, device=dev, contiguous=True)
    choice = torch.empty((nl, n), dtype=torch.int64, device=dev)
    lam = torch.empty((nl,), dtype=torch.float64, device=dev)
    if nl == 0 or n == 0:
        return choice, lam.zero_()
    alt, extra, running = (torch.empty((nl, n), dtype=torch.int64, device=dev) for _ in range(3))
    slope = torch.empty((nl, n), dtype=torch.float64, device=dev)
    _fixup_kernel[(nl,)](
        et, b, bl, budget, lo, hi, fits_at_zero, lam, choice, alt, extra, slope, running, n, c,
        BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, BLOCK_J=BLOCK_J, num_warps=NUM_WARPS, enable_fp_fusion=False,
    )  # fmt: skip
    return choice, lam
