# SPDX-License-Identifier: Apache-2.0
"""lowrank-r: A @ B of the kept rows, in order, is the best rank-r approximation (Eckart-Young)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaickv_sglang.strategies import LowRankStrategy, TokMStrategy
from mosaickv_sglang.strategies.tok_chan import ComposedStrategy


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), s=st.sampled_from([16, 32]), d=st.sampled_from([32, 64]), r=st.integers(1, 16))
def test_factors_are_the_truncated_svd(seed, s, d, r):
    """||X - A B||_F^2 equals the sum of the discarded squared singular values, A is [N, S, r], B is [N, r, d]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, s, d, generator=g)
    sel = LowRankStrategy(r, s, d).select(x)
    a, b = sel.factors
    assert a.shape == (3, s, r) and b.shape == (3, r, d)
    err = (x - a @ b).pow(2).sum((1, 2))
    sv = torch.linalg.svdvals(x)
    torch.testing.assert_close(err, sv[:, r:].pow(2).sum(1), rtol=1e-3, atol=1e-3)


def test_full_rank_is_exact():
    """r = min(S, d) reproduces the rows."""
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0))
    rec = LowRankStrategy(16, 16, 32).select(x).reconstruct(x)
    torch.testing.assert_close(rec, x, rtol=1e-4, atol=1e-4)


def test_kept_rows_first_in_order():
    """With token dropping, A's first m rows factor the kept rows in their original order and the rest are zero."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 32, 64, generator=g)
    score = torch.rand(2, 32, generator=g)
    sel = ComposedStrategy((TokMStrategy(12, 32, 64), LowRankStrategy(12, 32, 64))).select(x, token_score=score)
    a, b = sel.factors
    for n in range(2):
        rows = x[n][sel.token_keep[n]]
        torch.testing.assert_close(a[n, :12] @ b[n], rows, rtol=1e-4, atol=1e-4)
        assert torch.all(a[n, 12:] == 0)
    rec = sel.reconstruct(x)
    torch.testing.assert_close(rec[sel.token_keep], x[sel.token_keep], rtol=1e-4, atol=1e-4)
    assert torch.all(rec[~sel.token_keep] == 0)
