# SPDX-License-Identifier: Apache-2.0
"""Launchers of the planner's Lagrangian choice kernels: the bracket search, one launch a round, and the bytes at given
lambdas.

The planner's batched choice (``mosaickv_sglang.lagrange``) otherwise runs ``_ROUNDS`` rounds of about nineteen torch
ops each (about 300 launches a planner call, whatever its page and layer counts), and materialises each evaluation's
``[L, K, N, C]`` scores. Here a round is one launch (the search ``rounds + 1``). :func:`totals_fwd` runs the evaluation
the rounds and ``lagrange_start`` share at any lambdas (two launches: the blocks' shares, then their sum); the planner
does not call it, the tests check the evaluation through it. Every launch spreads a problem over blocks of
:data:`BLOCK_N` segments: one program a problem (the first design) left a 1-layer slice's whole search to one SM and
lost to the torch rounds through seal graphs (bench/RESULTS.md, forty-third to forty-seventh sessions). The Triton code
is in ``mosaickv_sglang.kernels._triton.lagrange_bracket``; its oracles are the torch path's
``mosaickv_sglang.lagrange._totals`` and ``_bracket_torch``, which they match bit for bit where ``exp`` and ``log``
round alike (the tests compare them on the CPU through the interpreter).

Both take the errors candidate-major (``lagrange_start`` writes them so; :func:`candidate_major` makes them). Fixed
heuristics: :data:`BLOCK_N` segments by :data:`BLOCK_C` candidates a step, :data:`NUM_WARPS` warps. Not yet timed on a
GPU.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton

from . import _checks
from ._triton.lagrange_bracket import _bracket_end_kernel, _bracket_round_kernel, _totals_kernel

__all__ = ["bracket_fwd", "candidate_major", "totals_fwd", "BLOCK_B", "BLOCK_C", "BLOCK_N", "NUM_WARPS"]

BLOCK_N = 32
BLOCK_C = 16
NUM_WARPS = 8
BLOCK_B = 32  # segment blocks' shares added a step


def candidate_major(e: torch.Tensor) -> torch.Tensor:
    """``e`` ``[L, N, C]`` float64 as the kernels read it: ``[L, C, N]``, contiguous."""
    _checks.check_tensor(e, "e", ndim=3, dtype=torch.float64)
    if e.shape[2] == 0:
        raise ValueError(f"e: expected at least one candidate, got shape {list(e.shape)}")
    return e.transpose(1, 2).contiguous()


def check_problem(et: torch.Tensor, b: torch.Tensor, bl: torch.Tensor) -> Tuple[int, int, int]:
    """Checks the problems' errors ``[L, C, N]`` and candidate bytes (fp64 and int64); returns ``(L, C, N)``."""
    _checks.check_tensor(et, "et", ndim=3, dtype=torch.float64, contiguous=True)
    nl, c, n = et.shape
    if c == 0:
        raise ValueError(f"et: expected at least one candidate, got shape {list(et.shape)}")
    _checks.check_tensor(b, "b", shape=(c,), dtype=torch.float64, device=et.device, contiguous=True)
    _checks.check_tensor(bl, "bl", shape=(c,), dtype=torch.int64, device=et.device, contiguous=True)
    return nl, c, n


def totals_fwd(et: torch.Tensor, b: torch.Tensor, bl: torch.Tensor, lams: torch.Tensor) -> torch.Tensor:
    """Each problem's bytes at each of its lambdas.

    Parameters
    ----------
    et : torch.Tensor
        shape ``[L, C, N]``, dtype ``torch.float64``, contiguous (:func:`candidate_major`): errors, ``inf`` for a
        candidate a segment may not use (no ``nan``).
    b, bl : torch.Tensor
        shape ``[C]``, dtypes ``torch.float64`` and ``torch.int64``: bytes of each candidate (the same values).
    lams : torch.Tensor
        shape ``[L, K]``, dtype ``torch.float64``, ``>= 0``.

    Returns
    -------
    torch.Tensor
        shape ``[L, K]``, dtype ``torch.int64``.
    """
    nl, c, n = check_problem(et, b, bl)
    _checks.check_tensor(lams, "lams", ndim=2, dtype=torch.float64, device=et.device, contiguous=True)
    if lams.shape[0] != nl:
        raise ValueError(f"lams: expected {nl} rows, got shape {list(lams.shape)}")
    k = lams.shape[1]
    if nl == 0 or k == 0 or n == 0:
        return torch.zeros((nl, k), dtype=torch.int64, device=et.device)
    blocks = triton.cdiv(n, BLOCK_N)
    shares = torch.empty((nl, blocks, k), dtype=torch.int64, device=et.device)
    _totals_kernel[(nl, blocks)](
        et, b, bl, lams, shares, n, c, k,
        BLOCK_K=triton.next_power_of_2(k), BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )  # fmt: skip
    return shares[:, 0] if blocks == 1 else shares.sum(1)


def bracket_fwd(
    et: torch.Tensor,
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
    et, b, bl : torch.Tensor
        As :func:`totals_fwd`.
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
    nl, c, n = check_problem(et, b, bl)
    dev = et.device
    _checks.check_tensor(budget, "budget", shape=(nl,), dtype=torch.int64, device=dev, contiguous=True)
    for name, x in (("lo", lo), ("hi", hi)):
        _checks.check_tensor(x, name, shape=(nl,), dtype=torch.float64, device=dev, contiguous=True)
    _checks.check_tensor(t, "t", ndim=1, dtype=torch.float64, device=dev, contiguous=True)
    grid = t.shape[0]
    if grid < 1 or grid & (grid - 1):
        raise ValueError(f"t: expected a power-of-two length, got {grid}")
    if rounds < 0:
        raise ValueError(f"rounds: expected >= 0, got {rounds}")
    if nl == 0 or rounds == 0:
        return lo.clone(), hi.clone()
    out_lo, out_hi = torch.empty_like(lo), torch.empty_like(hi)
    blocks = max(1, triton.cdiv(n, BLOCK_N))  # no segment: one block of none, every total 0
    rel = torch.full((1,), rel1, dtype=torch.float64, device=dev)  # a fill, not a host copy: graphs capture it
    bounds = torch.empty((rounds, nl, 2), dtype=torch.float64, device=dev)
    shares = torch.empty((rounds, nl, blocks, grid), dtype=torch.int64, device=dev)
    for r in range(rounds):
        _bracket_round_kernel[(nl, blocks)](
            et, b, bl, budget, lo, hi, t, rel, bounds, shares, n, c, nl, blocks, r,
            GRID=grid, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, BLOCK_B=BLOCK_B, num_warps=NUM_WARPS, enable_fp_fusion=False,
        )  # fmt: skip
    _bracket_end_kernel[(nl,)](
        budget, t, rel, bounds, shares, out_lo, out_hi, nl, blocks, rounds,
        GRID=grid, BLOCK_B=BLOCK_B, num_warps=1, enable_fp_fusion=False,
    )  # fmt: skip
    return out_lo, out_hi
