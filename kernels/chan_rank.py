# SPDX-License-Identifier: Apache-2.0
"""Launcher of the per-row descending rank of channel scores, the chan form's top-k order in one pass.

``rank < k`` is the top-``k`` channel mask of a vector for every ``k`` at once (ties: the lower channel index ranks
first), which the seal planner otherwise gets from an int64-key ``torch.topk`` per call. The Triton code is in
``mosaickv_sglang.kernels._triton.chan_rank``; the oracle is :func:`mosaickv_sglang.kernels.reference.ref_chan_rank`.

Fixed heuristics (no autotune), all overridable per call: algorithm :data:`ALGO` (:data:`ALGO_SORT`, a bitonic sort
of each row, ``log2(d) (log2(d) + 1) / 2`` int64 compare-swap stages per score; :data:`ALGO_COUNT` counts the
``d`` channels ahead of each score, about 3 integer ops per pair), ``BLOCK_R = max(1, 1024 // d)`` rows per program
(8 scores per thread at 4 warps, for every ``d``), :data:`BLOCK_J` channels per count step, :data:`NUM_WARPS` warps.
Chosen from instruction counts, not yet timed on a GPU: ``python -m bench.chan_rank`` times the alternatives.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import triton

from . import _checks
from ._triton.chan_rank import _chan_rank_count_kernel, _chan_rank_sort_kernel

logger = logging.getLogger(__name__)

__all__ = [
    "chan_rank_fwd",
    "default_block_r",
    "CHAN_RANK_HEAD_DIMS",
    "ALGO_SORT",
    "ALGO_COUNT",
    "ALGO",
    "BLOCK_J",
    "NUM_WARPS",
]

CHAN_RANK_HEAD_DIMS = (16, 32, 64, 128, 256)
ALGO_SORT = "sort"
ALGO_COUNT = "count"
ALGO = ALGO_SORT
_SCORES_PER_PROGRAM = 1024  # BLOCK_R * d: 8 per thread at 4 warps (8 int64 composites = 16 registers when sorting)
BLOCK_J = 1  # count: one channel per step keeps the compare tile the [BLOCK_R, d] layout of the loaded rows
NUM_WARPS = 4
_WARP_CHOICES = (1, 2, 4, 8, 16)


def default_block_r(d: int) -> int:
    """Rows per program for head dim ``d``: ``max(1, 1024 // d)``."""
    return max(1, _SCORES_PER_PROGRAM // d)


def _check_pow2(x: object, name: str, lo: int, hi: int) -> int:
    _checks.check_int(x, name, lo=lo, hi=hi)
    if x & (x - 1):  # type: ignore[operator]
        raise ValueError(f"{name}: expected a power of two, got {x}")
    return int(x)  # type: ignore[arg-type]


def chan_rank_fwd(
    score: torch.Tensor,
    out: Optional[torch.Tensor] = None,
    *,
    algo: str = ALGO,
    block_r: Optional[int] = None,
    block_j: int = BLOCK_J,
    num_warps: int = NUM_WARPS,
    unroll: bool = True,
) -> torch.Tensor:
    """Descending rank of every score within its row (last dim).

    ``rank_i = #{j : s_j > s_i} + #{j < i : s_j == s_i}``: 0 for the largest score, ties broken towards the lower
    index; ``-0.0`` equals ``+0.0``; a NaN ranks by its bits (a positive NaN above ``+inf``). Equal to
    ``mosaickv_sglang.strategies.descending_rank(score)`` on NaN-free input.

    Parameters
    ----------
    score : torch.Tensor
        shape ``[..., d]``, dtype ``torch.float32``, contiguous; ``d`` a power of two in 16..256.
    out : torch.Tensor, optional
        shape ``score.shape``, dtype ``torch.uint8``, contiguous, on ``score``'s device; written when given.
    algo : str
        :data:`ALGO_SORT` or :data:`ALGO_COUNT` (same output).
    block_r : int, optional
        Rows per program, a power of two (default :func:`default_block_r`).
    block_j : int
        ``count`` only: channels per compare step, a power of two ``<= d``.
    num_warps : int
        One of 1, 2, 4, 8, 16.
    unroll : bool
        ``count`` only: unroll the loop over channel blocks.

    Returns
    -------
    torch.Tensor
        shape ``score.shape``, dtype ``torch.uint8`` (``out`` when given). Compare it with a Python ``k`` only for
        ``0 <= k <= 255``: torch casts the scalar to ``uint8`` (``rank >= 256`` is ``rank >= 0``).
    """
    _checks.check_tensor(score, "score", dtype=torch.float32, contiguous=True)
    if score.dim() == 0:
        raise ValueError("score: expected a tensor of at least 1 dimension, got a 0-D tensor")
    d = score.shape[-1]
    if d not in CHAN_RANK_HEAD_DIMS:
        raise ValueError(f"score: expected last dim in {CHAN_RANK_HEAD_DIMS}, got {d}")
    if out is None:
        out = torch.empty(score.shape, dtype=torch.uint8, device=score.device)
    else:
        _checks.check_tensor(out, "out", shape=tuple(score.shape), dtype=torch.uint8, device=score.device,
                             contiguous=True)  # fmt: skip
    if algo not in (ALGO_SORT, ALGO_COUNT):
        raise ValueError(f"algo: expected {ALGO_SORT!r} or {ALGO_COUNT!r}, got {algo!r}")
    block_r = default_block_r(d) if block_r is None else _check_pow2(block_r, "block_r", 1, 1024)
    _check_pow2(block_j, "block_j", 1, d)
    _checks.check_int(num_warps, "num_warps", lo=1, hi=16)
    if num_warps not in _WARP_CHOICES:
        raise ValueError(f"num_warps: expected one of {_WARP_CHOICES}, got {num_warps}")
    if not isinstance(unroll, bool):
        raise TypeError(f"unroll: expected bool, got {type(unroll).__name__}")
    n_rows = score.numel() // d
    if n_rows == 0:
        return out
    s2, o2 = score.view(n_rows, d), out.view(n_rows, d)
    grid = (triton.cdiv(n_rows, block_r),)
    if algo == ALGO_SORT:
        _chan_rank_sort_kernel[grid](
            s2, *s2.stride(), o2, *o2.stride(), n_rows, HEAD_DIM=d, BLOCK_R=block_r, num_warps=num_warps
        )
    else:
        _chan_rank_count_kernel[grid](
            s2, *s2.stride(), o2, *o2.stride(), n_rows,
            HEAD_DIM=d, BLOCK_R=block_r, BLOCK_J=block_j, UNROLL=unroll, num_warps=num_warps,
        )  # fmt: skip
    return out
