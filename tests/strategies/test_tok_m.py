# SPDX-License-Identifier: Apache-2.0
"""tok-m: the kept tokens are exactly the m top-scored ones of each segment (ties: lower position)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaickv_sglang.strategies import TokMStrategy


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 6), s=st.sampled_from([16, 32, 64]), frac=st.floats(0, 1))
def test_keeps_highest_score(seed, n, s, frac):
    """Every kept token scores >= every dropped token, and exactly m are kept."""
    g = torch.Generator().manual_seed(seed)
    m = max(1, min(s, int(round(frac * s))))
    score = torch.rand(n, s, generator=g) + 1e-4
    x = torch.randn(n, s, 64, generator=g)
    keep = TokMStrategy(m, s, 64).select(x, token_score=score).token_keep
    assert torch.all(keep.sum(1) == m)
    kept_min = score.masked_fill(~keep, float("inf")).min(1).values
    dropped_max = score.masked_fill(keep, float("-inf")).max(1).values
    assert torch.all(kept_min >= dropped_max)
    assert torch.equal(keep, torch.zeros_like(keep).scatter_(1, score.topk(m, dim=1).indices, True))


def test_ties_prefer_lower_positions():
    """Equal scores: the earlier tokens are kept (deterministic, matches a stable sort)."""
    score = torch.ones(1, 16)
    keep = TokMStrategy(5, 16, 64).select(torch.randn(1, 16, 64), token_score=score).token_keep
    assert keep[0, :5].all() and not keep[0, 5:].any()


def test_restricted_by_token_keep():
    """Rows excluded by token_keep are never selected, even when they score highest."""
    score = torch.arange(16.0)[None].repeat(2, 1)
    allowed = torch.ones(2, 16, dtype=torch.bool)
    allowed[:, 12:] = False
    keep = TokMStrategy(4, 16, 64).select(torch.randn(2, 16, 64), token_score=score, token_keep=allowed).token_keep
    assert torch.equal(keep[0].nonzero().squeeze(1), torch.tensor([8, 9, 10, 11]))


def test_m_larger_than_segment_rejected():
    """A strategy built for 64-token segments refuses 16-token ones when m does not fit."""
    with pytest.raises(ValueError, match="m: expected <= segment size 16"):
        TokMStrategy(32, 64, 64).select(torch.randn(1, 16, 64), token_score=torch.rand(1, 16))
