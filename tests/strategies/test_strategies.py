# SPDX-License-Identifier: Apache-2.0
"""Contract of every strategy in the matrix: construction, shapes of a selection, bytes and ratio, purity."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mkv_strategy_matrix import STRATEGY_MATRIX
from mosaickv_sglang.kernels import format as fmt
from mosaickv_sglang.strategies import (
    STRATEGIES,
    ChanKStrategy,
    ComposedStrategy,
    DenseStrategy,
    LowRankStrategy,
    Strategy,
    TokMStrategy,
    dense_segment_bytes,
    segment_bytes,
)


def test_registry_names_and_classes():
    """STRATEGIES maps the five menu names of the design brief to strategy classes."""
    assert list(STRATEGIES) == ["dense", "chan-k", "tok-m", "tok-m/chan-k", "lowrank-r"]
    assert all(issubclass(cls, Strategy) for cls in STRATEGIES.values())
    assert STRATEGIES["tok-m/chan-k"] is ComposedStrategy


def test_select_contract(strategy_case, segment_data):
    """select() returns a Selection of the right shapes; kept rows are m (S if no token member), reconstruct zeroes
    dropped rows, and the inputs are not modified."""
    name, cls, kw = strategy_case
    strat = cls(**kw)
    x = segment_data["x"]
    before = x.clone()
    sel = strat.select(x, token_score=segment_data["token_score"], chan_weight=segment_data["chan_weight"])
    assert torch.equal(x, before)
    assert sel.token_keep.shape == (5, 64) and sel.token_keep.dtype == torch.bool
    assert torch.all(sel.token_keep.sum(1) == strat.rows(64))
    assert sel.form == strat.form and sel.param == strat.param
    rec = sel.reconstruct(x)
    assert rec.shape == x.shape and rec.dtype == torch.float32
    assert torch.all(rec[~sel.token_keep] == 0)
    if sel.form == fmt.FORM_CHAN:
        assert sel.chan_keep is not None and torch.all(sel.chan_keep.sum(-1) == sel.param)
    if sel.form == fmt.FORM_LOWRANK:
        a, b = sel.factors
        assert a.shape == (5, 64, sel.param) and b.shape == (5, sel.param, 128)
    if sel.form == fmt.FORM_DENSE:
        assert torch.equal(rec[sel.token_keep], x[sel.token_keep])


def test_bytes_and_ratio(strategy_case):
    """bytes_per_segment follows the packed format (granule-rounded payloads plus metadata) and compression_ratio is
    dense bytes over it; harder kwargs never cost more bytes than easier ones of the same strategy."""
    name, cls, kw = strategy_case
    strat = cls(**kw)
    m = strat.rows(64)
    expect = segment_bytes(m, strat.form, strat.param, strat.form, strat.param, 128)
    assert strat.bytes_per_segment() == expect == strat.bytes_per_segment(64, 128)
    assert strat.compression_ratio == pytest.approx(dense_segment_bytes(64, 128) / expect)
    if name == "dense":
        assert strat.compression_ratio == 1.0
    else:
        assert strat.compression_ratio > 1.0


def test_harder_kwargs_compress_more():
    """Within each strategy of the matrix, kwargs are ordered easy to hard: the ratio never decreases."""
    for entry in STRATEGY_MATRIX:
        if entry["name"] == "tok-m/chan-k":
            continue  # mixed members (lowrank last) are not ordered by bytes
        ratios = [STRATEGIES[entry["name"]](**kw).compression_ratio for kw in entry["kwargs"]]
        assert ratios == sorted(ratios), entry["name"]


def test_frozen(strategy_case):
    """Strategies are frozen dataclasses: hyper-parameters cannot change after construction."""
    _, cls, kw = strategy_case
    strat = cls(**kw)
    assert dataclasses.is_dataclass(strat)
    field = dataclasses.fields(strat)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(strat, field, getattr(strat, field))


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: ChanKStrategy(0), "k: expected >= 1"),
        (lambda: ChanKStrategy(128), "k: expected <= 127"),
        (lambda: ChanKStrategy(8, head_dim=48), "head_dim: expected a multiple of 32"),
        (lambda: TokMStrategy(0), "m: expected >= 1"),
        (lambda: TokMStrategy(65), "m: expected <= 64"),
        (lambda: TokMStrategy(4, segment_size=48), "segment_size: expected a power of two"),
        (lambda: TokMStrategy(4, segment_size=8), "segment_size: expected >= 16"),
        (lambda: LowRankStrategy(0), "r: expected >= 1"),
        (lambda: LowRankStrategy(65), "r: expected <= 64"),
        (lambda: DenseStrategy(segment_size=512), "segment_size: expected <= 256"),
    ],
)
def test_range_checks(factory, match):
    """__post_init__ rejects out-of-range hyper-parameters with a ValueError naming the field."""
    with pytest.raises(ValueError, match=match):
        factory()


def test_select_rejects_bad_inputs(segment_data):
    """select() names the offending argument: wrong rank, wrong segment shape, missing or mis-shaped scores."""
    x = segment_data["x"]
    with pytest.raises(ValueError, match="x: expected a 3-D tensor"):
        ChanKStrategy(8).select(x[0])
    with pytest.raises(ValueError, match=r"x \(dim 1, segment size\): expected a power of two"):
        ChanKStrategy(8).select(x[:, :48])
    with pytest.raises(ValueError, match="token_score: expected a \\[N, S\\] tensor"):
        TokMStrategy(8).select(x)
    with pytest.raises(ValueError, match="token_score: expected shape"):
        TokMStrategy(8).select(x, token_score=segment_data["token_score"][:, :10])
    with pytest.raises(ValueError, match="chan_weight: expected shape"):
        ChanKStrategy(8).select(x, chan_weight=segment_data["chan_weight"][:, :10])
    with pytest.raises(ValueError, match="x: expected dtype"):
        ChanKStrategy(8).select(x.to(torch.float64))
    with pytest.raises(ValueError, match="k: expected < head_dim of x"):
        ChanKStrategy(64, head_dim=128).select(x[:, :, :64].contiguous())
