# SPDX-License-Identifier: Apache-2.0
"""The planner's Lagrangian kernels: the bracket search a launch a round (``bracket_fwd``) vs its torch rounds
(``lagrange._bracket_torch``), the bytes at given lambdas (``totals_fwd``) vs ``lagrange._totals``, and the batched
choice through them vs the torch path and the host-driven reference."""

import math

import pytest
import torch

from mkv_kernel_cases import gpu_only
from mosaickv_sglang import lagrange
from mosaickv_sglang.kernels.lagrange_bracket import BLOCK_B, BLOCK_C, BLOCK_N, bracket_fwd, candidate_major, totals_fwd
from mosaickv_sglang.planner import choose_candidates

# (seed, L, N, C): one to many problems, segment counts below, at and across BLOCK_N (ragged last block) and more
# blocks than one step adds up (BLOCK_B), the fast menu's 80 candidates and a few, candidate counts across BLOCK_C
CASES = [
    (0, 1, 1, 2),
    (1, 3, 37, 7),
    (2, 2, BLOCK_N, 80),
    (3, 4, BLOCK_N + 1, BLOCK_C - 3),
    (4, 5, 300, 80),
    (5, 8, 64, 3),
    (6, 2, 5, BLOCK_C + 1),
    (7, 3, BLOCK_N * BLOCK_B + 5, 3),
]


def _problem(seed: int, nl: int, n: int, c: int, device):
    """Random errors (candidate 0 the dense one: error 0, the most bytes), a few forbidden candidates (``inf``),
    tied rows in one problem, budgets from the tightest reachable to the loosest, the brackets the batched choice
    starts from (one problem with none to search: ``lo == hi``)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.rand(nl, n, c, generator=g, dtype=torch.float64) * torch.rand(nl, 1, c, generator=g, dtype=torch.float64)
    e[:, :, 0] = 0.0
    if c > 2:
        e[:, : max(1, n // 5), 1 + seed % (c - 1)] = math.inf
    if nl > 1:
        e[1] = e[1, :1].expand(n, c)
    bl = torch.cat([torch.tensor([1000]), torch.randint(100, 999, (c - 1,), generator=g)]).long()
    smallest = torch.where(torch.isfinite(e), bl.double(), math.inf).amin(2).sum(1).long()
    budget = smallest + (torch.rand(nl, generator=g, dtype=torch.float64) * (1000 * n - smallest)).long()
    hi = (1.0 + torch.rand(nl, generator=g, dtype=torch.float64)) * 16.0 ** torch.randint(0, 4, (nl,), generator=g)
    lo = hi * lagrange._LO_FACTOR
    if nl > 2:
        lo[2] = hi[2]
    return [x.to(device) for x in (e, bl.double(), bl, budget, lo, hi)]


def _kernel_bracket(e, b, bl, budget, lo, hi):
    return bracket_fwd(candidate_major(e), b, bl, budget, lo, hi, lagrange._grid_fractions(e.device),
                       1.0 + lagrange._REL_WIDTH, lagrange._ROUNDS)  # fmt: skip


@pytest.mark.parametrize("seed,nl,n,c", CASES)
def test_bracket_ends_where_the_torch_rounds_do(device, seed, nl, n, c):
    """The same brackets within the rounding of ``exp``/``log`` (the interpreter's numpy against torch's), so the same
    choice at each end; ``hi`` feasible, ``lo`` not, where a search ran."""
    e, b, bl, budget, lo, hi = _problem(seed, nl, n, c, device)
    got_lo, got_hi = _kernel_bracket(e, b, bl, budget, lo, hi)
    want_lo, want_hi = lagrange._bracket_torch(e, b, bl, budget, lo, hi)
    torch.testing.assert_close(got_lo, want_lo, rtol=1e-13, atol=0)
    torch.testing.assert_close(got_hi, want_hi, rtol=1e-13, atol=0)
    assert torch.equal(lagrange._pick(e, b, torch.stack([got_lo, got_hi], 1)),
                       lagrange._pick(e, b, torch.stack([want_lo, want_hi], 1)))  # fmt: skip
    searched = hi > lo
    totals = lagrange._totals(e, b, bl, torch.stack([got_lo, got_hi], 1))
    assert bool((totals[:, 1] <= budget).all())
    assert bool((totals[searched, 0] > budget[searched]).all())
    assert bool((got_hi[searched] <= got_lo[searched] * (1.0 + 2 * lagrange._REL_WIDTH)).all())
    assert torch.equal(got_lo[~searched], lo[~searched]) and torch.equal(got_hi[~searched], hi[~searched])


@pytest.mark.parametrize("seed,nl,n,c", CASES)
def test_totals_equal_the_torch_path_at_any_lambdas(device, seed, nl, n, c):
    """The bytes at 1, 9 (a tile of 16, 7 of it padding) and 20 lambdas per problem, from 0 (the errors alone) to past
    the largest the search tries, equal ``lagrange._totals``'s, exactly: no rounding differs."""
    e, b, bl, _, _, hi = _problem(seed, nl, n, c, device)
    g = torch.Generator().manual_seed(seed + 100)
    for k in (1, 9, 20):
        lams = hi[:, None] * 16.0 ** torch.randint(-40, 9, (nl, k), generator=g).to(device, torch.float64)
        lams[:, 0] = 0.0
        assert torch.equal(totals_fwd(candidate_major(e), b, bl, lams), lagrange._totals(e, b, bl, lams)), k


def test_totals_break_exact_ties_toward_the_lower_candidate(device):
    """Scores tied exactly (dyadic errors, bytes and lambdas) go to the lower candidate, as ``torch.argmin`` does:
    within one candidate block (1 against 2) and across blocks (1 against ``BLOCK_C + 1``), each tie at the lambda
    where it lies and broken either way just beside it."""
    c, far = BLOCK_C + 2, BLOCK_C + 1
    bl = torch.full((c,), 900, dtype=torch.long)
    bl[0], bl[1], bl[2], bl[far] = 1000, 400, 350, 300
    e = torch.full((2, 3, c), math.inf, dtype=torch.float64)
    e[:, :, 0] = 0.0
    lam = 2.0**-4
    e[:, :, 1] = 1.0
    e[0, :, 2] = 1.0 + 50 * lam  # ties candidate 1 at lam
    e[1, :, far] = 1.0 + 100 * lam  # ties candidate 1 at lam, a block later
    e[1, 1:, far] = math.inf  # one row only: a count of the tied rows is checked too
    lams = torch.tensor([[lam, lam * (1 - 2.0**-10), lam * (1 + 2.0**-10)]] * 2, dtype=torch.float64)
    e, b, bl, lams = e.to(device), bl.double().to(device), bl.to(device), lams.to(device)
    got = totals_fwd(candidate_major(e), b, bl, lams)
    assert torch.equal(got, lagrange._totals(e, b, bl, lams))
    # at the tie the lower candidate (400 bytes); just below it too (lower score); just above it the other one
    assert got.tolist() == [[1200, 1200, 1050], [1200, 1200, 1100]]


@pytest.mark.parametrize("seed,nl,n,c", CASES)
def test_batched_choice_through_the_kernel_equals_the_torch_path_and_the_reference(monkeypatch, device, seed, nl, n, c):
    """``choose_candidates_batched`` with ``MOSAICKV_LAGRANGE_BRACKET=kernel`` chooses what the torch path and the
    host-driven ``choose_candidates`` choose, at their lambda within the bracket's width."""
    e, _, bl, budget, _, _ = _problem(seed, nl, n, c, device)
    monkeypatch.setenv(lagrange.BRACKET_ENV_VAR, "torch")
    want_choice, want_lam = lagrange.choose_candidates_batched(e, bl, budget)
    monkeypatch.setenv(lagrange.BRACKET_ENV_VAR, "kernel")
    calls = []
    for name in ("_start_torch", "_bracket_torch", "_finish_torch", "_totals"):  # must not be reached
        monkeypatch.setattr(lagrange, name, lambda *a, name=name: calls.append(name))
    choice, lam = lagrange.choose_candidates_batched(e, bl, budget)
    assert not calls
    monkeypatch.undo()
    assert torch.equal(choice, want_choice)
    torch.testing.assert_close(lam, want_lam, rtol=1e-11, atol=0)
    for i in range(nl):
        ref_choice, ref_lam = choose_candidates(e[i].cpu(), bl.cpu(), int(budget[i]))
        assert torch.equal(choice[i].cpu(), ref_choice), i
        assert float(lam[i]) == pytest.approx(ref_lam, rel=1e-9, abs=0)


def test_bracket_method_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(lagrange.BRACKET_ENV_VAR, raising=False)
    assert lagrange.bracket_method() == "torch"
    monkeypatch.setenv(lagrange.BRACKET_ENV_VAR, "kernel")
    assert lagrange.bracket_method() == "kernel"
    monkeypatch.setenv(lagrange.BRACKET_ENV_VAR, "fused")
    with pytest.raises(ValueError, match="MOSAICKV_LAGRANGE_BRACKET: expected one of torch, kernel, got 'fused'"):
        lagrange.choose_candidates_batched(torch.rand(1, 2, 3, dtype=torch.float64), torch.tensor([3, 2, 1]),
                                           torch.tensor([2]))  # fmt: skip


def test_kernels_refuse_bad_inputs(device):
    e, b, bl, budget, lo, hi = _problem(1, 3, 37, 7, device)
    et = candidate_major(e)
    t = lagrange._grid_fractions(e.device)
    with pytest.raises((TypeError, ValueError), match="e"):
        candidate_major(e.float())
    with pytest.raises(ValueError, match="at least one candidate"):
        candidate_major(e[:, :, :0])
    with pytest.raises((TypeError, ValueError), match="et"):
        bracket_fwd(e.transpose(1, 2), b, bl, budget, lo, hi, t, 1.0, 1)  # not contiguous
    with pytest.raises((TypeError, ValueError), match="bl"):
        bracket_fwd(et, b, bl[:-1], budget, lo, hi, t, 1.0, 1)
    with pytest.raises(ValueError, match="t: expected a power-of-two length, got 6"):
        bracket_fwd(et, b, bl, budget, lo, hi, t[:6].contiguous(), 1.0, 1)
    with pytest.raises(ValueError, match="rounds: expected >= 0, got -1"):
        bracket_fwd(et, b, bl, budget, lo, hi, t, 1.0, -1)
    with pytest.raises(ValueError, match="lams: expected 3 rows"):
        totals_fwd(et, b, bl, torch.zeros(2, 4, dtype=torch.float64, device=e.device))
    with pytest.raises((TypeError, ValueError), match="lams"):
        totals_fwd(et, b, bl, torch.zeros(3, 4, device=e.device))
    with pytest.raises(ValueError, match="method: expected one of torch, kernel, got 'fused'"):
        lagrange.choose_candidates_batched(e, bl, budget, method="fused")


@gpu_only
@pytest.mark.parametrize("seed,nl,n,c", CASES)
def test_bracket_on_gpu_equals_the_torch_rounds_bit_for_bit_and_captures(monkeypatch, seed, nl, n, c):
    """On CUDA both sides round ``exp``/``log`` with the same library: the same brackets bit for bit. The batched
    choice through the kernel is captured and replayed in a CUDA graph (as the seal graphs do) with the same result."""
    e, b, bl, budget, lo, hi = _problem(seed, nl, n, c, "cuda")
    got = _kernel_bracket(e, b, bl, budget, lo, hi)
    want = lagrange._bracket_torch(e, b, bl, budget, lo, hi)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    monkeypatch.setenv(lagrange.BRACKET_ENV_VAR, "kernel")
    eager = lagrange.choose_candidates_batched(e, bl, budget)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        lagrange.choose_candidates_batched(e, bl, budget)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = lagrange.choose_candidates_batched(e, bl, budget)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])
