# SPDX-License-Identifier: Apache-2.0
"""Query statistics: running moments, ring buffer, attention mass, merging, and importance from queries."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaickv_sglang.importance import QueryStats, SegmentImportance, importance_from_queries


def _data(seed: int, h: int, g: int, d: int, t: int, steps: int):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(t, h, d, generator=gen)
    qs = [torch.randn(2, h * g, d, generator=gen) + 0.3 for _ in range(steps)]
    return keys, qs


def _attn(q: torch.Tensor, keys: torch.Tensor, h: int, g: int) -> torch.Tensor:
    d = q.shape[-1]
    logits = torch.einsum("bhgd,thd->bhgt", q.view(q.shape[0], h, g, d), keys) / math.sqrt(d)
    return torch.softmax(logits, -1).reshape(q.shape[0], h * g, -1)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    h=st.integers(1, 3),
    g=st.sampled_from([1, 3, 4, 8]),
    d=st.sampled_from([64, 128]),
    steps=st.integers(1, 6),
)
def test_moments_and_mass_match_direct_computation(seed, h, g, d, steps):
    """k_channel_weight = sqrt(mean q^2) over the group's queries; token mass = mean attention probability over the
    group's heads and all queries; q_mean = mean query."""
    keys, qs = _data(seed, h, g, d, 40, steps)
    stats = QueryStats(h, g, d, window=4)
    for q in qs:
        stats.observe_with_keys(q, keys)
    allq = torch.cat(qs).view(-1, h, g, d)
    torch.testing.assert_close(stats.k_channel_weight(), allq.pow(2).mean((0, 2)).sqrt())
    torch.testing.assert_close(stats.q_mean(), allq.mean((0, 2)))
    attn = _attn(torch.cat(qs), keys, h, g).view(-1, h, g, 40).mean((0, 2))
    pos = torch.arange(40)[None].repeat(h, 1)
    torch.testing.assert_close(stats.token_importance(torch.arange(h), pos), attn)
    assert torch.all(stats.v_channel_weight() == 1)


def test_ring_buffer_keeps_the_last_w_in_order():
    """recent_queries() returns the last W queries per KV head, oldest first."""
    h, g, d = 2, 3, 64
    stats = QueryStats(h, g, d, window=5)
    qs = [torch.full((1, h * g, d), float(i + 1)) for i in range(8)]
    for q in qs[:3]:
        stats.observe(q)
    assert stats.recent_queries().shape == (h, 3, g, d)
    for q in qs[3:]:
        stats.observe(q)
    rq = stats.recent_queries()
    assert rq.shape == (h, 5, g, d)
    assert rq[:, :, 0, 0].tolist() == [[4.0, 5.0, 6.0, 7.0, 8.0]] * h
    stats.observe(torch.cat([torch.full((1, h * g, d), float(10 + i)) for i in range(7)]))  # B > W
    assert stats.recent_queries()[0, :, 0, 0].tolist() == [12.0, 13.0, 14.0, 15.0, 16.0]


def test_token_mass_with_growing_context():
    """Tokens appended later are averaged only over the queries that could see them."""
    h, g, d = 1, 2, 64
    stats = QueryStats(h, g, d)
    stats.observe(torch.randn(1, 2, d), attn=torch.full((1, 2, 4), 0.25))
    stats.observe(torch.randn(1, 2, d), attn=torch.full((1, 2, 8), 0.125))
    imp = stats.token_importance(torch.tensor([0]), torch.arange(10)[None])
    torch.testing.assert_close(imp[0, :4], torch.full((4,), (0.25 + 0.125) / 2))
    torch.testing.assert_close(imp[0, 4:8], torch.full((4,), 0.125))
    assert torch.all(imp[0, 8:] == 0)  # never observed


def test_merge_pools_both_requests():
    """merge() equals observing both requests' queries in one object (sums add); inputs are unchanged; the ring
    buffer interleaves the two newest-first."""
    h, g, d = 2, 4, 64
    keys, qs = _data(11, h, g, d, 24, 4)
    a, b, both = QueryStats(h, g, d, window=4), QueryStats(h, g, d, window=4), QueryStats(h, g, d, window=4)
    for q in qs[:2]:
        a.observe_with_keys(q, keys)
        both.observe_with_keys(q, keys)
    for q in qs[2:]:
        b.observe_with_keys(q, keys[:16])
        both.observe_with_keys(q, keys[:16])
    a_before = a.q2_sum.clone()
    m = a.merge(b)
    torch.testing.assert_close(m.k_channel_weight(), both.k_channel_weight())
    torch.testing.assert_close(m.q_mean(), both.q_mean())
    pos = torch.arange(24)[None].repeat(h, 1)
    torch.testing.assert_close(m.token_importance(torch.arange(h), pos), both.token_importance(torch.arange(h), pos))
    assert torch.equal(a.q2_sum, a_before)
    ra, rb, rm = a.recent_queries(), b.recent_queries(), m.recent_queries()
    assert rm.shape == (h, 4, g, d)
    expect = torch.stack([rb[:, -2], ra[:, -2], rb[:, -1], ra[:, -1]], 1)  # oldest first; a before b at each age
    torch.testing.assert_close(rm, expect)


def test_segment_importance_gathers_positions():
    """segment_importance() gives per-segment token mass and per-head weights."""
    h, g, d = 2, 2, 64
    keys, qs = _data(5, h, g, d, 64, 3)
    stats = QueryStats(h, g, d)
    for q in qs:
        stats.observe_with_keys(q, keys)
    imp = stats.segment_importance(torch.tensor([1, 0]), torch.tensor([16, 32]), 16)
    assert isinstance(imp, SegmentImportance)
    full = stats.token_importance(torch.tensor([1, 0]), torch.stack([torch.arange(16, 32), torch.arange(32, 48)]))
    torch.testing.assert_close(imp.token_mass, full)
    torch.testing.assert_close(imp.k_chan_weight, stats.k_channel_weight()[[1, 0]])


@pytest.mark.parametrize("g", [1, 3, 8])
def test_importance_from_queries_is_context_normalised(g):
    """Token mass sums to 1 over the segments of one context (queries shared), for every context."""
    gen = torch.Generator().manual_seed(g)
    keys = torch.randn(7, 32, 64, generator=gen)
    gid = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    q = torch.randn(3, 8, g, 64, generator=gen)[gid]
    imp = importance_from_queries(keys, q, group_ids=gid)
    tot = torch.zeros(3).index_add_(0, gid, imp.token_mass.sum(1))
    torch.testing.assert_close(tot, torch.ones(3))
    torch.testing.assert_close(imp.k_chan_weight, q.reshape(7, -1, 64).pow(2).mean(1).sqrt())


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: QueryStats(0, 1, 64), "num_kv_heads: expected >= 1"),
        (lambda: QueryStats(1, 1, 64, window=0), "window: expected >= 1"),
        (lambda: QueryStats(1, 1, 64, decay=0.0), "decay: expected a float in \\(0, 1\\]"),
        (lambda: QueryStats(2, 2, 64).observe(torch.randn(1, 3, 64)), "q: expected shape"),
        (lambda: QueryStats(2, 2, 64).observe(torch.randn(1, 4, 64), attn=torch.rand(2, 4, 8)), "attn: expected shape"),
        (lambda: QueryStats(2, 2, 64).merge(QueryStats(2, 4, 64)), "other: expected \\(num_kv_heads"),
        (lambda: importance_from_queries(torch.randn(2, 16, 64), torch.randn(3, 4, 1, 64)), "queries: expected shape"),
        (
            lambda: importance_from_queries(torch.randn(2, 16, 64), torch.randn(2, 4, 1, 64), group_ids=torch.zeros(3)),
            "group_ids: expected shape",
        ),
    ],
)
def test_invalid_inputs(call, match):
    """Bad arguments raise ValueError naming the argument."""
    with pytest.raises(ValueError, match=match):
        call()


def test_decay_weights_recent_queries_more():
    """With decay < 1 the second moment leans to recent queries."""
    stats = QueryStats(1, 1, 64, decay=0.5)
    stats.observe(torch.full((1, 1, 64), 1.0))
    stats.observe(torch.full((1, 1, 64), 3.0))
    expect = math.sqrt((0.5 * 1.0 + 9.0) / 1.5)
    torch.testing.assert_close(stats.k_channel_weight(), torch.full((1, 64), expect))
