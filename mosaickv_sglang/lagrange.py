# SPDX-License-Identifier: Apache-2.0
"""The planner's Lagrangian choice on the device, for many independent problems at once and without host reads.

:func:`choose_candidates_batched` solves ``L`` problems (e.g. the layers of one seal), each ``min sum_n err[l, n,
choice] s.t. sum_n bytes[choice] <= budget[l]``, with the algorithm of :func:`~mosaickv_sglang.planner.
choose_candidates` (its plain, host-driven reference): the same bracketing of the smallest feasible ``lambda`` by
rounds of ``_GRID`` geometric points, the same threshold upgrades and single fix-up move. Every step is a fixed
sequence of tensor operations; a layer whose bracket is already narrow enough stays where it is while the others
shrink theirs (the reference stops there). So the number of rounds, and the host synchronisations, do not depend on
the data: there are none.

The steps before the search, its rounds and the steps after it run as torch ops (about forty launches before, nineteen
a round, fifty after) or, with ``MOSAICKV_LAGRANGE_BRACKET=kernel`` (experimental; default ``torch``), as Triton
kernels on CUDA tensors, or on the CPU under ``TRITON_INTERPRET=1``: :mod:`~mosaickv_sglang.kernels.lagrange_start`
(the starting bracket in one launch), :mod:`~mosaickv_sglang.kernels.lagrange_bracket` (one launch a round, each spread
over blocks of segments) and :mod:`~mosaickv_sglang.kernels.lagrange_fixup` (the picks, upgrades and fix-up move in one
launch). The same brackets but where ``exp`` or ``log`` rounds differently, so the same choices but at a lambda within
the bracket's width.

With ``MOSAICKV_COMPILE_LAGRANGE=1`` (experimental, default off) the torch method's search, about 400 small kernels
for a 4-layer call, runs through :func:`torch.compile` (TorchInductor fuses its element-wise and reduction chains into
fewer kernels); each new shape compiles once, on its first call, which must not be under CUDA-graph capture.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Callable, Optional, Tuple

import torch

from mosaickv_sglang.config import flag_env
from mosaickv_sglang.kernels._checks import check_tensor

__all__ = ["BRACKET_ENV_VAR", "BRACKET_METHODS", "COMPILE_ENV_VAR", "bracket_method", "choose_candidates_batched",
           "compile_enabled"]  # fmt: skip

BRACKET_ENV_VAR = "MOSAICKV_LAGRANGE_BRACKET"
COMPILE_ENV_VAR = "MOSAICKV_COMPILE_LAGRANGE"
BRACKET_METHODS = ("torch", "kernel")

_GRID = 8  # lambdas per bracketing round, as in the reference
_LO_FACTOR = 1e-30  # the bracket starts at [hi * 1e-30, hi]
_REL_WIDTH = 1e-12  # ... and ends at hi <= lo * (1 + 1e-12)
_GROWTH = 16.0  # hi *= 16 until feasible (in the reference; here all at once)
_GROWTH_STEPS = 8
# Each round shrinks the log-width of the bracket by (_GRID + 1): from log(1e30) to log(1 + 1e-12) takes 15 rounds.
_ROUNDS = math.ceil(math.log(-math.log(_LO_FACTOR) / math.log1p(_REL_WIDTH)) / math.log(_GRID + 1)) + 1
_MAX_GRID_ELEMENTS = 1 << 25  # bounds the [L, lambdas, N, C] scores of one evaluation (chunked over layers)


def _totals(e: torch.Tensor, b: torch.Tensor, bl: torch.Tensor, lams: torch.Tensor) -> torch.Tensor:
    """Total bytes of ``argmin_c e + lam * b`` for each layer and lambda: ``lams`` ``[L, K]`` -> ``[L, K]`` int64."""
    nl, n, c = e.shape
    per = max(1, _MAX_GRID_ELEMENTS // max(1, lams.shape[1] * n * c))
    out = []
    for a in range(0, nl, per):
        scores = e[a : a + per, None] + lams[a : a + per, :, None, None] * b
        out.append(bl[torch.argmin(scores, dim=3)].sum(2))
    return out[0] if len(out) == 1 else torch.cat(out, 0)  # one chunk (the usual case): no copy


def _pick(e: torch.Tensor, b: torch.Tensor, lams: torch.Tensor) -> torch.Tensor:
    """``argmin_c e[l, n, c] + lams[l, k] * b[c]`` (ties: the lower index): ``lams`` ``[L, K]`` -> ``[L, K, N]``."""
    return torch.argmin(e[:, None] + lams[:, :, None, None] * b, dim=3)


def bracket_method() -> str:
    """``MOSAICKV_LAGRANGE_BRACKET``: ``torch`` (the default) or ``kernel``."""
    method = os.environ.get(BRACKET_ENV_VAR, "torch")
    if method not in BRACKET_METHODS:
        raise ValueError(f"{BRACKET_ENV_VAR}: expected one of {', '.join(BRACKET_METHODS)}, got {method!r}")
    return method


def compile_enabled() -> bool:
    """``MOSAICKV_COMPILE_LAGRANGE``: ``1`` runs the torch method's search compiled (see the module docstring)."""
    return flag_env(COMPILE_ENV_VAR)


def _grid_fractions(device: torch.device) -> torch.Tensor:
    return torch.arange(1, _GRID + 1, dtype=torch.float64, device=device) / (_GRID + 1)


def _bracket_torch(
    e: torch.Tensor, b: torch.Tensor, bl: torch.Tensor, budget: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:meth:`_Scores.bracket` in torch ops, the kernel's oracle."""
    t = _grid_fractions(e.device)
    bounds = torch.stack([lo, hi], 1)  # [L, 2]
    for _ in range(_ROUNDS):
        active = bounds[:, 1] > bounds[:, 0] * (1.0 + _REL_WIDTH)
        log_b = torch.log(bounds)
        grid = torch.exp(log_b[:, :1] + t[None, :] * (log_b[:, 1:] - log_b[:, :1]))  # [L, _GRID]
        # totals fall as lambda grows: the new bracket is the first feasible point and the one before it, in
        # [lo, grid..., hi]; none feasible: [the last grid point, hi] (a last column that always fits)
        feasible = torch.cat([_totals(e, b, bl, grid), budget[:, None]], 1) <= budget[:, None]
        first = torch.argmax(feasible.to(torch.int8), dim=1)
        points = torch.cat([bounds[:, :1], grid, bounds[:, 1:]], 1)  # [L, _GRID + 2]
        shrunk = points.unfold(1, 2, 1).gather(1, first[:, None, None].expand(-1, 1, 2)).squeeze(1)
        bounds = torch.where(active[:, None], shrunk, bounds)
    return bounds[:, 0], bounds[:, 1]


def _threshold_upgrades(
    e: torch.Tensor, bl: torch.Tensor, choice: torch.Tensor, alt: torch.Tensor, left: torch.Tensor
) -> torch.Tensor:
    """Step 2a: move segments from ``choice`` to ``alt`` by decreasing error saved per byte (then segment order)
    while the extra bytes fit in ``left``."""
    moved = alt != choice
    extra = (bl[alt] - bl[choice]) * moved
    gain = e.gather(2, choice[..., None]).squeeze(2) - e.gather(2, alt[..., None]).squeeze(2)
    slope = torch.where(moved, gain / extra.clamp(min=1).double(), torch.full_like(gain, -math.inf))
    order = torch.argsort(slope, dim=1, descending=True, stable=True)
    fits_sorted = torch.cumprod((extra.gather(1, order).cumsum(1) <= left[:, None]).long(), 1).bool()
    fits = torch.zeros_like(fits_sorted).scatter_(1, order, fits_sorted)
    return torch.where(moved & fits, alt, choice)


def _single_move(e: torch.Tensor, bl: torch.Tensor, choice: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Step 2b: apply, per layer, the one fitting move with the largest error reduction (first in row-major order)."""
    nl, n, c = e.shape
    cur_bytes = bl[choice]
    left = budget - cur_bytes.sum(1)
    cur = e.gather(2, choice[..., None])
    ok = (bl[None, None, :] - cur_bytes[..., None] <= left[:, None, None]) & (e < cur)
    gain = torch.where(ok, cur - e, torch.zeros_like(e)).reshape(nl, n * c)
    best = torch.argmax(gain, dim=1)
    apply = gain.gather(1, best[:, None]).squeeze(1) > 0
    seg, cand = best // c, best % c
    rows = torch.arange(nl, device=e.device)
    moved = choice.clone()
    moved[rows, seg] = torch.where(apply, cand, choice[rows, seg])
    return moved


def _start_torch(
    e: torch.Tensor, b: torch.Tensor, bl: torch.Tensor, budget: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bracket to search, ``(lo, hi)`` (``hi == lo`` where no search is needed: the minimal-error choice or the
    choice at ``lo`` fits), and whether the minimal-error choice fits: the kernel's oracle."""
    nl = e.shape[0]
    finite = torch.isfinite(e)
    spread = e.masked_fill(~finite, 0).amax((1, 2)) - e.masked_fill(~finite, math.inf).amin((1, 2))
    hi0 = spread.clamp(min=0) + 1.0
    steps = _GROWTH ** torch.arange(_GROWTH_STEPS, dtype=torch.float64, device=e.device)
    growth = hi0[:, None] * steps[None, :]
    zero = torch.zeros(nl, 1, dtype=torch.float64, device=e.device)
    fits = _totals(e, b, bl, torch.cat([zero, growth], 1)) <= budget[:, None]  # lambda 0, then growth
    fits_at_zero, grown = fits[:, 0], fits[:, 1:]
    hi = growth.gather(1, torch.argmax(grown.to(torch.int8), dim=1)[:, None]).squeeze(1)
    hi = torch.where(grown.any(1), hi, growth[:, -1])
    lo = hi * _LO_FACTOR
    fits_at_lo = _totals(e, b, bl, lo[:, None])[:, 0] <= budget
    return lo, torch.where(fits_at_zero | fits_at_lo, lo, hi), fits_at_zero


def _finish_torch(
    e: torch.Tensor,
    b: torch.Tensor,
    bl: torch.Tensor,
    budget: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    fits_at_zero: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The choice and lambda from the bracket the search ended with (``hi == lo`` where none ran): lambda 0 where the
    minimal-error choice fits, else ``hi``; the choice there, upgraded toward the choice at ``lo`` while the budget
    allows, then one fix-up move unless the minimal-error choice fits: the kernel's oracle."""
    lam = hi.masked_fill(fits_at_zero, 0.0)
    lam_alt = lo.masked_fill(fits_at_zero, 0.0)
    choice, alt = _pick(e, b, torch.stack([lam, lam_alt], 1)).unbind(1)
    left = budget - bl[choice].sum(1)
    choice = _threshold_upgrades(e, bl, choice, alt, left)
    return torch.where(fits_at_zero[:, None], choice, _single_move(e, bl, choice, budget)), lam


def choose_candidates_batched(
    err: torch.Tensor, cand_bytes: torch.Tensor, budget_bytes: torch.Tensor, method: Optional[str] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per layer ``l``, one candidate per segment minimising ``sum_n err[l, n, c]`` s.t. bytes ``<= budget[l]``.

    The device twin of :func:`~mosaickv_sglang.planner.choose_candidates` (same steps, same result up to rounding
    of ``lambda``), run for all layers at once in a fixed number of tensor operations with no host read. Inputs are
    not validated against their contents (that would read them): every row needs a finite entry (``nan`` counts as
    ``inf``), and each budget must be reachable (every segment at its smallest finite candidate); otherwise the
    result may exceed the budget.

    Parameters
    ----------
    err : torch.Tensor
        shape ``[L, N, C]``, float, ``>= 0``; ``inf`` marks a candidate a segment may not use (e.g. a segment that
        must stay dense gets 0 for the dense candidate and ``inf`` elsewhere).
    cand_bytes : torch.Tensor
        shape ``[C]``, integer; bytes of each candidate.
    budget_bytes : torch.Tensor
        shape ``[L]``, integer; the budget of each layer's ``N`` segments.
    method : str, optional
        How the bytes at given lambdas and the bracket search run: ``torch`` or ``kernel`` (see the module
        docstring); default :func:`bracket_method`.

    Returns
    -------
    tuple of torch.Tensor
        ``(choice, lambda)``: ``choice`` shape ``[L, N]``, dtype ``torch.int64``; ``lambda`` shape ``[L]``,
        dtype ``torch.float64``, the multiplier of the Lagrangian step (0 where the minimal-error choice fits).
    """
    check_tensor(err, "err", ndim=3)
    nl, n, c = err.shape
    dev = err.device
    check_tensor(cand_bytes, "cand_bytes", shape=(c,), dtype=(torch.int32, torch.int64), device=dev)
    check_tensor(budget_bytes, "budget_bytes", shape=(nl,), dtype=(torch.int32, torch.int64), device=dev)
    if method is None:
        method = bracket_method()  # the environment's, checked there
    elif method not in BRACKET_METHODS:
        raise ValueError(f"method: expected one of {', '.join(BRACKET_METHODS)}, got {method!r}")
    if nl == 0 or n == 0:
        return torch.zeros(nl, n, dtype=torch.int64, device=dev), torch.zeros(nl, dtype=torch.float64, device=dev)
    if method == "torch" and compile_enabled():
        return _compiled_choice()(err, cand_bytes, budget_bytes, method)
    return _choose(err, cand_bytes, budget_bytes, method)


@functools.lru_cache(maxsize=None)
def _compiled_choice() -> Callable[..., Tuple[torch.Tensor, torch.Tensor]]:
    """:func:`_choose` through :func:`torch.compile`, made on first use."""
    return torch.compile(_choose, fullgraph=True)


def _choose(
    err: torch.Tensor, cand_bytes: torch.Tensor, budget_bytes: torch.Tensor, method: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`choose_candidates_batched` of checked, non-empty inputs."""
    b = cand_bytes.to(torch.float64)
    bl = cand_bytes.to(torch.int64)
    budget = budget_bytes.to(torch.int64)
    if method == "kernel" and (err.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        from mosaickv_sglang.kernels.lagrange_bracket import bracket_fwd
        from mosaickv_sglang.kernels.lagrange_fixup import fixup_fwd
        from mosaickv_sglang.kernels.lagrange_start import start_fwd

        lo_factor = torch.full((1,), _LO_FACTOR, dtype=torch.float64, device=err.device)  # a fill: graphs capture it
        et, lo, hi, fits_at_zero = start_fwd(err, b, bl, budget, lo_factor, _GROWTH, _GROWTH_STEPS)
        lo, hi = bracket_fwd(et, b, bl, budget, lo, hi, _grid_fractions(err.device), 1.0 + _REL_WIDTH, _ROUNDS)
        return fixup_fwd(et, b, bl, budget, lo, hi, fits_at_zero)
    e = err.double()
    e = torch.where(torch.isnan(e), torch.full_like(e, math.inf), e)
    lo, hi, fits_at_zero = _start_torch(e, b, bl, budget)
    lo, hi = _bracket_torch(e, b, bl, budget, lo, hi)
    return _finish_torch(e, b, bl, budget, lo, hi, fits_at_zero)
