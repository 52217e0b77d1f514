# SPDX-License-Identifier: Apache-2.0
"""The fast estimator and the one-call planner against the frozen copy of the estimator before its sorts were
replaced (``tests/planner_reference.py``): the same channel masks (ties included), estimates within 1e-5 and the same
plans, on fresh random inputs of seal-like shapes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mosaickv_sglang import plan_layers as plan_layers_mod
from mosaickv_sglang.importance import importance_from_labels, uniform_importance
from mosaickv_sglang.plan_layers import plan_fast_layers
from mosaickv_sglang.planner import _chan_drop_masks, _check_menu, _estimate_fast
from mosaickv_sglang.strategies import descending_rank
from mosaickv_sglang.strategies.base import chan_scores

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # --import-mode=importlib puts no test folder on sys.path
    sys.path.insert(0, str(TESTS))

from planner_reference import estimate_fast_reference  # noqa: E402
from test_plan_layers import budget_for, layer_case  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIELDS = ("first_order", "mass_delta", "mass_share", "unseen")
PLAN_FIELDS = ("token_keep", "k_form", "k_param", "v_form", "v_param", "k_chan_weight", "v_chan_weight", "flags")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("weights", ["random", "ones", "zeros-and-negative"])
def test_chan_drop_masks_equal_the_full_rank(dtype, d, weights):
    """One top-k gives ``descending_rank(chan_scores) >= k`` exactly, ties (fp16 values, unit weights, zeros,
    -0.0) broken by the lower channel index."""
    gen = torch.Generator().manual_seed(d)
    x = torch.randn(6, 16, d, generator=gen).to(dtype)
    x[0, 0] = 0.0
    x[0, 1] = -0.0
    x[1, :, : d // 2] = 1.0  # half the channels tied
    if weights == "random":
        w = torch.rand(6, d, generator=gen)
    elif weights == "ones":
        w = torch.ones(6, d)
    else:
        w = torch.randn(6, d, generator=gen)
        w[:, ::3] = 0.0
    ks = [d // 8, d // 4, d // 2, d - 1]
    rank = descending_rank(chan_scores(x, w))
    masks = _chan_drop_masks(x, w, ks)
    for k in ks:
        assert torch.equal(masks[k], rank >= k), k


def _importance(keys, queries, heads):
    n, s, d = keys.shape
    if queries is None:
        return uniform_importance(n, s, d, keys.device)
    labels = torch.from_numpy(heads)
    return importance_from_labels(keys, queries.reshape(n, -1, d).float(), labels, int(heads.max()) + 1, d**-0.5)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("g", [1, 4])
@pytest.mark.parametrize("pages", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_estimates_match_the_reference(d, g, pages, dtype):
    """Per layer (with queries, and one layer with none), every field of the estimate within 1e-5 (relative to the
    field's largest entry) of the reference's."""
    h, s = 2, 64
    keys, values, queries, heads = layer_case(100 * d + 10 * g + pages, 3, pages, h, s, d, g)
    menu = _check_menu(None, s, d, lowrank=False)
    labels = torch.from_numpy(heads)
    for k, v, q in zip(keys, values, queries):
        k, v = k.to(dtype), v.to(dtype)
        imp = _importance(k, q, heads)
        new = _estimate_fast(k, v, menu, imp, labels, h, d**-0.5, 1.0, "novelty")
        ref = estimate_fast_reference(k, v, menu, imp, labels, h, d**-0.5, 1.0, "novelty")
        order = torch.sort(imp.token_mass, dim=1, descending=True, stable=True).indices
        given = _estimate_fast(k, v, menu, imp, labels, h, d**-0.5, 1.0, "novelty", order=order)
        for f in FIELDS:
            assert torch.equal(getattr(given, f), getattr(new, f)), f
        for f in FIELDS:
            a, b = getattr(new, f), getattr(ref, f)
            assert a.shape == b.shape and a.dtype == b.dtype, f
            tol = 1e-5 * float(b.abs().max().clamp(min=1e-30))
            assert float((a - b).abs().max()) <= tol, f


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("g", [1, 4])
@pytest.mark.parametrize("pages", [2, 5, 16])
@pytest.mark.parametrize("ratio", [2.0, 4.0])
def test_plans_match_the_reference(monkeypatch, d, g, pages, ratio):
    """plan_fast_layers (one layer without queries, the others with) gives the plans it gave with the reference
    estimator: same choices, lambdas, plans and estimated errors within 1e-5."""
    h, s, layers = 2, 64, 3
    keys, values, queries, heads = layer_case(7 * d + g + pages, layers, pages, h, s, d, g)
    n = pages * h
    ad = np.repeat(np.arange(pages) < 1, h)
    budgets = [budget_for(n, s, d, ad, ratio)] * layers
    kw = dict(budget_bytes=budgets, queries=queries, group_ids=heads, always_dense=ad)
    new = plan_fast_layers(keys, values, **kw)
    with monkeypatch.context() as m:
        m.setattr(plan_layers_mod, "_estimate_fast", lambda *a, order=None, **kw: estimate_fast_reference(*a, **kw))
        ref = plan_fast_layers(keys, values, **kw)
    for a, b in zip(new, ref):
        assert torch.equal(a.choice, b.choice)
        assert a.lagrange_multiplier == pytest.approx(b.lagrange_multiplier, rel=1e-5, abs=0)
        assert torch.allclose(a.est_error, b.est_error, rtol=1e-5, atol=1e-30)
        for f in PLAN_FIELDS:
            assert torch.equal(getattr(a.plan, f), getattr(b.plan, f)), f


@pytest.mark.parametrize("layers_per_chunk", [1, 2])
def test_chunks_by_bytes_give_the_plans_of_one_chunk(monkeypatch, layers_per_chunk):
    """A byte bound of one or two layers' largest temporary (8 bytes per segment, token and channel) splits the
    estimate into chunks of that many layers, and the plans are those of one chunk of all layers."""
    h, s, d, g, pages, layers = 2, 64, 64, 4, 3, 5
    keys, values, queries, heads = layer_case(11 + layers_per_chunk, layers, pages, h, s, d, g)
    n = pages * h
    ad = np.repeat(np.arange(pages) < 1, h)
    kw = dict(budget_bytes=[budget_for(n, s, d, ad, 3.0)] * layers, queries=queries, group_ids=heads,
              always_dense=ad)  # fmt: skip
    one = plan_fast_layers(keys, values, max_chunk_bytes=1 << 40, **kw)
    blocks = []

    def counting(*args, **kwargs):
        blocks.append(kwargs["blocks"])
        return _estimate_fast(*args, **kwargs)

    monkeypatch.setattr(plan_layers_mod, "_estimate_fast", counting)
    chunked = plan_fast_layers(keys, values, max_chunk_bytes=layers_per_chunk * n * s * d * 8 + 7, **kw)
    assert blocks == [layers_per_chunk] * (layers // layers_per_chunk) + [layers % layers_per_chunk] * (
        layers % layers_per_chunk > 0)
    for a, b in zip(chunked, one):
        assert torch.equal(a.choice, b.choice)
        assert a.lagrange_multiplier == b.lagrange_multiplier
        assert torch.equal(a.est_error, b.est_error)
        for f in PLAN_FIELDS:
            assert torch.equal(getattr(a.plan, f), getattr(b.plan, f)), f


def test_max_chunk_bytes_is_checked():
    keys, values, queries, heads = layer_case(3, 2, 2, 2, 64, 64, 1)
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        plan_fast_layers(keys, values, budget_bytes=[0, 0], queries=queries, group_ids=heads, max_chunk_bytes=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_importance_of_layer_runs_equals_per_layer(dtype):
    """Runs of layers whose queries have one shape get their importance in one call: the same statistics as one
    call per layer, across layers without queries, a different window and the chunk bound."""
    h, s, d, g, pages = 2, 64, 64, 4, 3
    keys, values, queries, heads = layer_case(5, 6, pages, h, s, d, g)
    keys = [k.to(dtype) for k in keys]
    queries[3] = queries[3][:, :2]  # W = 2 instead of 4
    queries[4] = None
    labels = torch.from_numpy(heads)
    for per in (1, 2, 6):
        runs = plan_layers_mod._layer_importance(keys, queries, None, labels, h, d**-0.5, per)
        got = plan_layers_mod._stack_importance(runs)
        want = [_importance(k, q, heads) for k, q in zip(keys, queries)]
        for f in ("token_mass", "k_chan_weight", "v_chan_weight", "q_mean"):
            assert torch.equal(getattr(got, f), torch.cat([getattr(w, f) for w in want])), (per, f)
        assert len(runs) == {1: 6, 2: 5, 6: 5}[per]  # None | 1, 2 | 3 (W = 2) | 4 None | 5
