# SPDX-License-Identifier: Apache-2.0
"""sealable_pages (the sealing rule) and the sizing formulas, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from mosaickv_sglang.pool import (
    arena_granules_for,
    capacity_tokens,
    dense_bytes_per_token,
    metadata_bytes_per_token,
    sealable_pages,
)


@pytest.mark.parametrize(
    "seq_len,hot,sink,want,want_sinks",
    [
        (0, 0, 0, 0, 0),  # nothing written
        (15, 0, 16, 0, 0),  # sink page incomplete: not sealable
        (16, 64, 16, 1, 1),  # complete sink page seals at once, even inside the hot window
        (100, 32, 0, 4, 0),  # floor((100 - 32) / 16) = 4 cold pages
        (100, 32, 20, 4, 2),  # ceil(20 / 16) = 2 sink pages among them
        (100, 96, 40, 3, 3),  # only the 3 sink pages are sealable
        (128, 0, 0, 8, 0),  # no hot window: every complete page
        (127, 0, 300, 7, 7),  # sinks beyond the complete pages are capped
    ],
)
def test_sealable_pages_rule(seq_len, hot, sink, want, want_sinks):
    """Page i is sealable iff complete and (a sink page, i < ceil(sink/S), or out of the hot window,
    (i + 1) * S <= seq_len - hot)."""
    pages = torch.arange(100, 108)
    got = sealable_pages(pages, seq_len, hot, sink, page_size=16)
    assert got.pages.tolist() == list(range(100, 100 + want))
    assert got.always_dense.tolist() == [i < want_sinks for i in range(want)]
    brute = [
        i for i in range(8)
        if (i + 1) * 16 <= seq_len and (i < math.ceil(sink / 16) or (i + 1) * 16 <= seq_len - hot)
    ]
    assert brute == list(range(want))


def test_sealable_pages_rejects_bad_arguments():
    with pytest.raises(ValueError, match="seq_len: expected <= n_pages \\* page_size = 32, got 33"):
        sealable_pages(torch.arange(2), 33, 0, 0, page_size=16)
    with pytest.raises(ValueError, match="hot_window: expected an integer >= 0"):
        sealable_pages(torch.arange(2), 3, -1, 0, page_size=16)
    with pytest.raises(ValueError, match="req_pages: expected a 1-D integer tensor"):
        sealable_pages(torch.zeros(2), 3, 0, 0, page_size=16)


def test_capacity_formula():
    """tokens = floor((B - dense * D) / (D / r + M)) rounded down to S; D and M as documented."""
    L, H, d, S = 4, 2, 64, 16
    D = dense_bytes_per_token(L, H, d)
    M = metadata_bytes_per_token(L, H, d, S)
    assert D == 2 * L * H * d * 2 and M == L * H * (32 + 2 * d * 2) / S
    budget, dense = 10_000_000, 1000
    got = capacity_tokens(budget, 3.0, num_layers=L, num_kv_heads=H, head_dim=d, page_size=S, dense_tokens=dense)
    raw = math.floor((budget - dense * D) / (D / 3.0 + M))
    assert got == raw - raw % S and got % S == 0
    # ratio 1 with no metadata would give budget / D; metadata makes it strictly fewer
    assert capacity_tokens(budget, 1.0, num_layers=L, num_kv_heads=H, head_dim=d, page_size=S) < budget // D
    assert capacity_tokens(100, 3.0, num_layers=L, num_kv_heads=H, head_dim=d, page_size=S, dense_tokens=1) == 0
    assert arena_granules_for(got, 3.0, num_kv_heads=H, head_dim=d) == math.ceil(got * H * 2 * d * 2 / 3.0 / 128)
    with pytest.raises(ValueError, match="ratio: expected a finite number >= 1"):
        capacity_tokens(budget, 0.5, num_layers=L, num_kv_heads=H, head_dim=d, page_size=S)
