# SPDX-License-Identifier: Apache-2.0
"""The planner's Lagrangian choice after the bracket search in one launch (``fixup_fwd``) vs its torch steps
(``lagrange._finish_torch``: the picks at the bracket's ends, the threshold upgrades, the single fix-up move)."""

import math

import pytest
import torch

from mkv_kernel_cases import gpu_only
from mosaickv_sglang import lagrange
from mosaickv_sglang.kernels.lagrange_bracket import candidate_major
from mosaickv_sglang.kernels.lagrange_fixup import BLOCK_C, BLOCK_J, BLOCK_N, fixup_fwd

# (seed, L, N, C): one to many problems, segment counts below, at and across BLOCK_N and BLOCK_J (ragged last blocks),
# a 16-page slice's 128 and more, the fast menu's 80 candidates and a few, candidate counts across BLOCK_C
CASES = [
    (0, 1, 1, 2),
    (1, 3, 37, 7),
    (2, 2, BLOCK_N, 80),
    (3, 4, BLOCK_J + 1, BLOCK_C - 3),
    (4, 5, 300, 80),
    (5, 8, 128, 3),
    (6, 2, 5, BLOCK_C + 1),
    (7, 3, 2 * BLOCK_J + BLOCK_N + 3, 5),
]
# the bracket given: the search's (the choice at its hi, upgraded toward its lo), reversed (upgraded toward a lambda
# above, fewer bytes: negative extras, running extras that fall), none searched (hi == lo: no upgrade)
VARIANTS = ("bracket", "reversed", "no_search")


def _problem(seed: int, nl: int, n: int, c: int, variant: str, device):
    """Errors on a coarse dyadic grid (many exactly tied scores and slopes; candidate 0 the dense one, error 0, the most
    bytes), a few forbidden candidates (``inf``), budgets from the tightest reachable to the loosest, the bracket of
    ``variant``, every other problem's minimal-error choice marked as fitting."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randint(0, 64, (nl, n, c), generator=g).double() / 8
    e[:, :, 0] = 0.0
    if c > 2:
        e[:, : max(1, n // 5), 1 + seed % (c - 1)] = math.inf
    bl = torch.cat([torch.tensor([1024]), 64 * torch.randint(1, 16, (c - 1,), generator=g)]).long()
    b = bl.double()
    smallest = torch.where(torch.isfinite(e), b, math.inf).amin(2).sum(1).long()
    budget = smallest + (torch.rand(nl, generator=g, dtype=torch.float64) * (1024 * n - smallest)).long()
    hi = 2.0 ** torch.randint(-12, 4, (nl,), generator=g).double()
    lo = hi * lagrange._LO_FACTOR
    lo, hi = lagrange._bracket_torch(e, b, bl, budget, lo, hi)
    if variant == "reversed":
        lo, hi = hi * 2.0 ** torch.randint(1, 8, (nl,), generator=g).double(), lo
    elif variant == "no_search":
        hi = lo
    fits_at_zero = torch.arange(nl) % 2 == 1
    return [x.contiguous().to(device) for x in (e, b, bl, budget, lo, hi, fits_at_zero)]


def _torch_steps(e, b, bl, budget, lo, hi, fits_at_zero):
    """What each torch step did per problem: segments upgraded, upgrades refused, whether a running extra fell back
    within the budget after one past it (the order's cumulative product matters), whether a single move applied."""
    lam, lam_alt = hi.masked_fill(fits_at_zero, 0.0), lo.masked_fill(fits_at_zero, 0.0)
    choice, alt = lagrange._pick(e, b, torch.stack([lam, lam_alt], 1)).unbind(1)
    left = budget - bl[choice].sum(1)
    upgraded = lagrange._threshold_upgrades(e, bl, choice, alt, left)
    moved = alt != choice
    extra = (bl[alt] - bl[choice]) * moved
    slope = torch.where(moved, (e.gather(2, choice[..., None]) - e.gather(2, alt[..., None])).squeeze(2)
                        / extra.clamp(min=1).double(), torch.full_like(lam[:, None].expand(-1, e.shape[1]), -math.inf))
    order = torch.argsort(slope, dim=1, descending=True, stable=True)
    running = extra.gather(1, order).cumsum(1)
    plain = (running <= left[:, None]) & moved.gather(1, order)
    falls_back = plain.sum(1) > (upgraded != choice).sum(1)
    final = lagrange._finish_torch(e, b, bl, budget, lo, hi, fits_at_zero)[0]
    return (upgraded != choice).sum(1), (moved & (upgraded == choice)).sum(1), falls_back, (final != upgraded).any(1)


def test_cases_exercise_every_step():
    """The cases below upgrade some segments and refuse others, hit a running extra that falls back within the budget,
    and apply single moves (and not everywhere): a kernel skipping a step fails them."""
    seen = torch.zeros(4, dtype=torch.long)
    for seed, nl, n, c in CASES:
        for variant in VARIANTS:
            steps = _torch_steps(*_problem(seed, nl, n, c, variant, "cpu"))
            seen += torch.stack([x.bool().sum() for x in steps])
    upgraded, refused, falls_back, single = seen.tolist()
    assert upgraded > 0 and refused > 0 and falls_back > 0 and single > 0, seen


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seed,nl,n,c", CASES)
def test_fixup_equals_the_torch_steps(device, seed, nl, n, c, variant):
    """The same choices and lambdas, exactly."""
    e, *rest = _problem(seed, nl, n, c, variant, device)
    choice, lam = fixup_fwd(candidate_major(e), *rest)
    want_choice, want_lam = lagrange._finish_torch(e, *rest)
    assert torch.equal(choice, want_choice) and torch.equal(lam, want_lam)


def test_fixup_on_no_segments_and_no_problems(device):
    e, b, bl, budget, lo, hi, fits_at_zero = _problem(1, 3, 37, 7, "bracket", device)
    choice, lam = fixup_fwd(candidate_major(e[:, :0]), b, bl, budget, lo, hi, fits_at_zero)
    assert choice.shape == (3, 0) and lam.shape == (3,)
    none = fixup_fwd(candidate_major(e[:0]), b, bl, budget[:0], lo[:0], hi[:0], fits_at_zero[:0])
    assert none[0].shape == (0, 37)


def test_fixup_refuses_bad_inputs(device):
    e, b, bl, budget, lo, hi, fits_at_zero = _problem(1, 3, 37, 7, "bracket", device)
    et = candidate_major(e)
    with pytest.raises((TypeError, ValueError), match="et"):
        fixup_fwd(e.transpose(1, 2), b, bl, budget, lo, hi, fits_at_zero)
    with pytest.raises((TypeError, ValueError), match="budget"):
        fixup_fwd(et, b, bl, budget[:2], lo, hi, fits_at_zero)
    with pytest.raises((TypeError, ValueError), match="hi"):
        fixup_fwd(et, b, bl, budget, lo, hi.float(), fits_at_zero)
    with pytest.raises((TypeError, ValueError), match="fits_at_zero"):
        fixup_fwd(et, b, bl, budget, lo, hi, fits_at_zero.long())


@gpu_only
@pytest.mark.parametrize("seed,nl,n,c", CASES)
def test_fixup_on_gpu_equals_the_torch_steps_and_captures(seed, nl, n, c):
    """On CUDA too, and captured and replayed in a CUDA graph (as the seal graphs do) with the same result."""
    args = _problem(seed, nl, n, c, "bracket", "cuda")
    et = candidate_major(args[0])
    want = lagrange._finish_torch(*args)
    got = fixup_fwd(et, *args[1:])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fixup_fwd(et, *args[1:])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fixup_fwd(et, *args[1:])
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], want[0]) and torch.equal(captured[1], want[1])
