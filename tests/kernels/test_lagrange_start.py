# SPDX-License-Identifier: Apache-2.0
"""The planner's Lagrangian choice before the bracket search in one launch (``start_fwd``) vs its torch steps
(``lagrange._start_torch``: the errors' spread, the bytes at lambda 0 and the growing lambdas, then at ``lo``)."""

import math

import pytest
import torch

from mkv_kernel_cases import gpu_only
from mosaickv_sglang import lagrange
from mosaickv_sglang.kernels.lagrange_bracket import candidate_major
from mosaickv_sglang.kernels.lagrange_start import BLOCK_C, BLOCK_N, start_fwd

# (seed, L, N, C): one to many problems, segment counts below, at and across BLOCK_N, a 16-page slice's 128, the fast
# menu's 80 candidates and a few, candidate counts across BLOCK_C
CASES = [
    (0, 1, 1, 2),
    (1, 3, 37, 7),
    (2, 2, BLOCK_N, 80),
    (3, 4, BLOCK_N + 1, BLOCK_C - 3),
    (4, 6, 300, 80),
    (5, 8, 128, 3),
    (6, 2, 5, BLOCK_C + 1),
]


def _problem(seed: int, nl: int, n: int, c: int, dtype: torch.dtype, device):
    """Random errors spanning many magnitudes (candidate 0 the dense one: error 0, the most bytes) with a few forbidden
    candidates (``inf``) and ``nan`` (counted as ``inf``); per problem a budget that the minimal-error choice fits, that
    the choice at ``lo`` fits (the smallest reachable, tiny errors beside one huge one), one that none of the growing
    lambdas reaches (below the smallest reachable) or one in between."""
    g = torch.Generator().manual_seed(seed)
    e = torch.rand(nl, n, c, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-3, 4, (nl, 1, c), generator=g)
    e[:, :, 0] = 0.0
    if c > 2:
        e[:, : max(1, n // 5), 1 + seed % (c - 1)] = math.inf
        e[:, -1, 2 + seed % (c - 2) if c > 3 else 1] = math.nan
    bl = torch.cat([torch.tensor([1000]), torch.randint(100, 999, (c - 1,), generator=g)]).long()
    finite = torch.isfinite(e)
    smallest = torch.where(finite, bl.double(), math.inf).amin(2).sum(1).long()
    budget = smallest + (torch.rand(nl, generator=g, dtype=torch.float64) * (1000 * n - smallest)).long()
    kind = (torch.arange(nl) + seed) % 4
    budget = torch.where(kind == 0, torch.full_like(budget, 1000 * n), budget)
    budget = torch.where(kind == 2, smallest - 1, budget)
    # errors so small against their spread (the dense candidate's, never chosen) that lo = hi * 1e-30 still fits the
    # smallest reachable
    e[kind == 3] *= 1e-24
    e[kind == 3, 0, 0] = 1e12
    budget = torch.where(kind == 3, smallest, budget)
    return [x.to(device) for x in (e.to(dtype), bl.double(), bl, budget)]


def _start(err, b, bl, budget):
    lo_factor = torch.full((1,), lagrange._LO_FACTOR, dtype=torch.float64, device=err.device)
    return start_fwd(err, b, bl, budget, lo_factor, lagrange._GROWTH, lagrange._GROWTH_STEPS)


def test_cases_reach_every_start():
    """The cases below have problems whose minimal-error choice fits, whose choice at ``lo`` fits, that search, and
    that no growing lambda fits (``hi`` the last one): a kernel mixing them up fails them."""
    seen = torch.zeros(4, dtype=torch.long)
    for seed, nl, n, c in CASES:
        e, b, bl, budget = _problem(seed, nl, n, c, torch.float64, "cpu")
        e = torch.where(torch.isnan(e), math.inf, e)
        lo, hi, fits_at_zero = lagrange._start_torch(e, b, bl, budget)
        last = lagrange._totals(e, b, bl, hi[:, None])[:, 0] > budget
        seen += torch.stack([fits_at_zero.sum(), ((hi == lo) & ~fits_at_zero).sum(), (hi > lo).sum(), last.sum()])
    assert bool((seen > 0).all()), seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("seed,nl,n,c", CASES)
def test_start_equals_the_torch_steps(device, seed, nl, n, c, dtype):
    """The errors fp64 and candidate-major with ``nan`` as ``inf``, the bracket and the flag, exactly; from a
    non-contiguous view of the errors too."""
    err, b, bl, budget = _problem(seed, nl, n, c, dtype, device)
    e = err.double()
    e = torch.where(torch.isnan(e), math.inf, e)
    want = lagrange._start_torch(e, b, bl, budget)
    for errors in (err, err.transpose(1, 2).contiguous().transpose(1, 2)):
        et, *got = _start(errors, b, bl, budget)
        assert torch.equal(et, candidate_major(e))
        for g, w in zip(got, want):
            assert torch.equal(g, w)


def test_start_on_no_segments_and_no_problems(device):
    err, b, bl, budget = _problem(1, 3, 37, 7, torch.float32, device)
    et, lo, hi, fits_at_zero = _start(err[:, :0], b, bl, budget)
    assert et.shape == (3, 7, 0) and bool(fits_at_zero.all()) and bool((hi == lo).all())
    assert _start(err[:0], b, bl, budget[:0])[0].shape == (0, 7, 37)


def test_start_refuses_bad_inputs(device):
    err, b, bl, budget = _problem(1, 3, 37, 7, torch.float32, device)
    lo_factor = torch.full((1,), lagrange._LO_FACTOR, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match="at least one candidate"):
        start_fwd(err[:, :, :0], b[:0], bl[:0], budget, lo_factor, 16.0, 8)
    with pytest.raises((TypeError, ValueError), match="err"):
        start_fwd(err.long(), b, bl, budget, lo_factor, 16.0, 8)
    with pytest.raises((TypeError, ValueError), match="budget"):
        start_fwd(err, b, bl, budget.int(), lo_factor, 16.0, 8)
    with pytest.raises(ValueError, match="growth: expected a power of two above 1, got 10.0"):
        start_fwd(err, b, bl, budget, lo_factor, 10.0, 8)
    with pytest.raises(ValueError, match="growth_steps: expected >= 1, got 0"):
        start_fwd(err, b, bl, budget, lo_factor, 16.0, 0)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed,nl,n,c", CASES)
def test_start_on_gpu_equals_the_torch_steps_and_captures(seed, nl, n, c, dtype):
    """On CUDA too (bf16 errors as well), and captured and replayed in a CUDA graph with the same result."""
    err, b, bl, budget = _problem(seed, nl, n, c, dtype, "cuda")
    e = err.double()
    want = lagrange._start_torch(torch.where(torch.isnan(e), math.inf, e), b, bl, budget)
    assert all(torch.equal(g, w) for g, w in zip(_start(err, b, bl, budget)[1:], want))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _start(err, b, bl, budget)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _start(err, b, bl, budget)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(g, w) for g, w in zip(captured[1:], want))
