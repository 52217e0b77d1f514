# SPDX-License-Identifier: Apache-2.0
"""tok-m/chan-k: ComposedStrategy chains tokens then per-vector channels and refuses incompatible members."""

from __future__ import annotations

import pytest
import torch

from mosaickv_sglang.kernels import format as fmt
from mosaickv_sglang.strategies import (
    ChanKStrategy,
    ComposedStrategy,
    DenseStrategy,
    LowRankStrategy,
    TokMStrategy,
    segment_bytes,
)


def test_composition_is_tokens_then_channels(segment_data):
    """Kept rows are the top-m tokens; each kept vector keeps its own top-k channels (as each member alone)."""
    x, score, w = segment_data["x"], segment_data["token_score"], segment_data["chan_weight"]
    comp = ComposedStrategy.tok_chan(16, 24)
    sel = comp.select(x, token_score=score, chan_weight=w)
    tok = TokMStrategy(16).select(x, token_score=score)
    chan = ChanKStrategy(24).select(x, chan_weight=w)
    assert torch.equal(sel.token_keep, tok.token_keep)
    assert torch.equal(sel.chan_keep, chan.chan_keep)
    assert sel.form == fmt.FORM_CHAN and sel.param == 24
    rec = sel.reconstruct(x)
    assert torch.equal(rec, x * tok.token_keep[:, :, None] * chan.chan_keep)


def test_bytes_are_two_dimensional():
    """Bytes of tok-m/chan-k are those of m rows in chan form, fewer than either axis alone."""
    comp = ComposedStrategy.tok_chan(16, 16)
    assert comp.bytes_per_segment() == segment_bytes(16, fmt.FORM_CHAN, 16, fmt.FORM_CHAN, 16, 128)
    assert comp.bytes_per_segment() < TokMStrategy(16).bytes_per_segment()
    assert comp.bytes_per_segment() < ChanKStrategy(16).bytes_per_segment()
    assert comp.segment_size == 64 and comp.head_dim == 128 and comp.rows(64) == 16


@pytest.mark.parametrize(
    "members, match",
    [
        ((TokMStrategy(8), TokMStrategy(4)), "one token and one per-vector strategy"),
        ((ChanKStrategy(8), LowRankStrategy(4)), "one token and one per-vector strategy"),
        ((TokMStrategy(8), DenseStrategy()), "got DenseStrategy"),
        ((TokMStrategy(8), ComposedStrategy.tok_chan(8, 8)), "got ComposedStrategy"),
        ((TokMStrategy(8),), "a tuple of 2 strategies"),
        ((TokMStrategy(8), ChanKStrategy(8), ChanKStrategy(4)), "a tuple of 2 strategies"),
        ((TokMStrategy(8, head_dim=64), ChanKStrategy(8)), "one \\(segment_size, head_dim\\)"),
        ((TokMStrategy(8), "chan"), "got str"),
    ],
)
def test_refuses_incompatible_members(members, match):
    """Construction fails with a ValueError naming ``members``."""
    with pytest.raises(ValueError, match=f"members: expected.*{match}"):
        ComposedStrategy(members)
