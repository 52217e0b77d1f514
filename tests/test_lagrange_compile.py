# SPDX-License-Identifier: Apache-2.0
"""``MOSAICKV_COMPILE_LAGRANGE=1``: the batched Lagrangian choice through :func:`torch.compile` chooses what the eager
torch ops and the host-driven reference choose, on problems of several shapes (each shape compiled on first use)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "kernels"))  # the Lagrangian kernels' problem maker

from test_lagrange_bracket import _problem  # noqa: E402

from mosaickv_sglang import lagrange  # noqa: E402
from mosaickv_sglang.planner import choose_candidates  # noqa: E402


@pytest.mark.parametrize("seed,nl,n,c", [(11, 3, 37, 7), (12, 4, 130, 80)])
def test_compiled_choice_equals_the_eager_torch_ops_and_the_reference(monkeypatch, seed, nl, n, c):
    e, _, bl, budget, _, _ = _problem(seed, nl, n, c, "cpu")
    monkeypatch.setenv(lagrange.BRACKET_ENV_VAR, "torch")
    monkeypatch.delenv(lagrange.COMPILE_ENV_VAR, raising=False)
    want_choice, want_lam = lagrange.choose_candidates_batched(e, bl, budget)
    monkeypatch.setenv(lagrange.COMPILE_ENV_VAR, "1")
    compiled = []
    real = lagrange._compiled_choice
    monkeypatch.setattr(lagrange, "_compiled_choice", lambda: compiled.append(1) or real())
    choice, lam = lagrange.choose_candidates_batched(e, bl, budget)
    assert compiled == [1]
    assert torch.equal(choice, want_choice)
    torch.testing.assert_close(lam, want_lam, rtol=1e-11, atol=0)
    for i in range(nl):
        ref_choice, _ = choose_candidates(e[i], bl, int(budget[i]))
        assert torch.equal(choice[i], ref_choice), i


def test_compile_setting_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(lagrange.COMPILE_ENV_VAR, raising=False)
    assert not lagrange.compile_enabled()
    monkeypatch.setenv(lagrange.COMPILE_ENV_VAR, "1")
    assert lagrange.compile_enabled()
    monkeypatch.setenv(lagrange.COMPILE_ENV_VAR, "yes")
    with pytest.raises(ValueError, match="MOSAICKV_COMPILE_LAGRANGE: expected 0 or 1, got 'yes'"):
        lagrange.choose_candidates_batched(torch.rand(1, 2, 3, dtype=torch.float64), torch.tensor([3, 2, 1]),
                                           torch.tensor([2]))  # fmt: skip
