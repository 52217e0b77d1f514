# SPDX-License-Identifier: Apache-2.0
"""chan-k: every vector keeps exactly its own top-k elements by |x_c| * w_c (the packed format's rule)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaickv_sglang.kernels.reference import ref_chan_select
from mosaickv_sglang.strategies import ChanKStrategy


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 5),
    s=st.sampled_from([16, 32, 64]),
    d=st.sampled_from([64, 128]),
    frac=st.floats(0.01, 0.99),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_keeps_exactly_top_k_per_vector(seed, n, s, d, frac, dtype):
    """Each vector keeps k elements, and every kept element scores >= every dropped one of the same vector."""
    g = torch.Generator().manual_seed(seed)
    k = max(1, min(d - 1, int(frac * d)))
    x = (torch.randn(n, s, d, generator=g) + 0.05).to(dtype)
    w = torch.rand(n, d, generator=g) + 0.05
    sel = ChanKStrategy(k, s, d).select(x, chan_weight=w)
    keep = sel.chan_keep
    assert torch.all(keep.sum(-1) == k)
    score = x.float().abs() * w[:, None, :]
    kept_min = score.masked_fill(~keep, float("inf")).min(-1).values
    dropped_max = score.masked_fill(keep, float("-inf")).max(-1).values
    assert torch.all(kept_min >= dropped_max)


def test_matches_kernel_reference_including_ties():
    """The selection equals the kernels' ref_chan_select row by row, ties broken towards the lower channel."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 32, 64, generator=g).half()
    x[:, :, 10:20] = 0.5  # ties
    w = torch.rand(3, 64, generator=g) + 0.1
    w[:, 10:20] = 1.0
    sel = ChanKStrategy(12, 32, 64).select(x, chan_weight=w)
    for i in range(3):
        assert torch.equal(sel.chan_keep[i], ref_chan_select(x[i], w[i], 12))


def test_weights_change_the_choice():
    """With unit weights the largest |x| wins; a large weight on a small channel makes it kept."""
    x = torch.full((1, 16, 64), 1.0)
    x[..., 0] = 0.1
    x[..., 1:] += torch.arange(63.0) * 0.01
    plain = ChanKStrategy(4, 16, 64).select(x)
    assert not plain.chan_keep[..., 0].any()
    w = torch.ones(1, 64)
    w[0, 0] = 100.0
    weighted = ChanKStrategy(4, 16, 64).select(x, chan_weight=w)
    assert weighted.chan_keep[..., 0].all()


def test_reconstruct_keeps_values_and_zeroes_the_rest():
    """reconstruct() returns the kept elements unchanged (fp32) and zeros elsewhere."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 64, generator=g).to(torch.bfloat16)
    sel = ChanKStrategy(8, 16, 64).select(x)
    rec = sel.reconstruct(x)
    assert torch.equal(rec[sel.chan_keep], x.float()[sel.chan_keep])
    assert torch.all(rec[~sel.chan_keep] == 0)
