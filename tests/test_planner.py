# SPDX-License-Identifier: Apache-2.0
"""The planner: budget, exactness at ratio 1, monotone error, selection properties, the 2-D advantage, the packed
format round trip, the optimiser, and argument checks."""

from __future__ import annotations

import itertools
import math
from typing import List, Sequence, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaickv_sglang.importance import QueryStats, importance_from_queries
from mosaickv_sglang.kernels import format as fmt
from mosaickv_sglang.planner import (
    _EPS,
    _novelty,
    apply_plan_reference,
    attention_output_error,
    choose_candidates,
    estimate_errors_exact,
    estimate_errors_fast,
    plan_channel_only,
    plan_exact,
    plan_fast,
    plan_token_only,
    retrieval_prior,
    unseen_query_error,
)
from mosaickv_sglang.strategies import Candidate, default_menu, dense_segment_bytes, descending_rank

Case = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_case(seed: int, s: int, d: int, g: int, ctx_sizes: Sequence[int], w: int = 8) -> Case:
    """Seeded random segments grouped in contexts (ragged: ``ctx_sizes`` segments each); the segments of a context
    share their queries. Values have a non-zero mean (as real V do); nothing is zero."""
    gen = torch.Generator().manual_seed(seed)
    gid = torch.cat([torch.full((c,), i) for i, c in enumerate(ctx_sizes)])
    n = int(gid.numel())
    k = torch.randn(n, s, d, generator=gen) + 0.01
    v = torch.randn(n, s, d, generator=gen) + 0.5
    q = (1.5 * torch.randn(len(ctx_sizes), w, g, d, generator=gen))[gid]
    return k, v, q, gid


def structured_case(seed: int, s: int = 64, d: int = 64, g: int = 4, n_ctx: int = 4, per_ctx: int = 8, w: int = 16):
    """Synthetic data where both compression axes have something to exploit, as in real attention heads.

    * **Per-token heavy channels.** Every K and V vector is small noise (std 0.1) plus ``d / 16`` large entries
      (|x| in [2, 4]) at channels drawn *independently for each token*, so a per-vector top-k keeps most of a
      vector's energy while no shared channel mask (or per-head choice) can.
    * **Concentrated attention.** Each context has a query direction ``mu`` on ``d / 16`` channels; queries are
      ``mu`` plus noise (std 0.5), so observed and held-out queries come from one distribution. About 15% of the
      tokens ("heavy hitters") carry ``mu`` on those channels in their key and receive most of the attention; the
      other tokens get little, so token dropping loses little.

    Returns ``(K, V, observed queries, held-out queries, group ids)``.
    """
    gen = torch.Generator().manual_seed(seed)
    n = n_ctx * per_ctx
    hc = d // 16
    gid = torch.arange(n) // per_ctx

    def heavy_channels() -> torch.Tensor:
        x = 0.1 * torch.randn(n, s, d, generator=gen)
        idx = torch.rand(n, s, d, generator=gen).argsort(-1)[..., :hc]
        mag = torch.sign(torch.randn(n, s, hc, generator=gen)) * (2.0 + 2.0 * torch.rand(n, s, hc, generator=gen))
        return x.scatter_(2, idx, mag)

    k, v = heavy_channels(), heavy_channels()
    qc = torch.rand(n_ctx, d, generator=gen).argsort(-1)[:, :hc]
    mu = torch.zeros(n_ctx, d).scatter_(1, qc, 3.0 * torch.sign(torch.randn(n_ctx, hc, generator=gen)))
    heavy = torch.rand(n, s, generator=gen) < 0.15
    k = k + heavy[..., None] * mu[gid][:, None, :]

    def queries() -> torch.Tensor:
        return (mu[:, None, None, :] + 0.5 * torch.randn(n_ctx, w, g, d, generator=gen))[gid]

    return k, v, queries(), queries(), gid


def measured_error(k, v, plan, q, gid) -> float:
    kh, vh, mask = apply_plan_reference(k, v, plan)
    return float(attention_output_error(k, v, kh, vh, mask, q, group_ids=gid).mean())


SHAPES = [  # (S, d, G, ragged context sizes)
    (32, 64, 3, (3, 5, 2)),
    (64, 128, 8, (4, 1, 3)),
    (64, 64, 1, (6, 3)),
    (32, 128, 4, (2, 2, 5)),
]
RATIOS = [1, 2, 3, 4, 6]


def _planners():
    return {
        "exact": lambda k, v, q, gid, **kw: plan_exact(k, v, q, group_ids=gid, **kw),
        "fast": lambda k, v, q, gid, **kw: plan_fast(k, v, queries=q, group_ids=gid, **kw),
    }


@pytest.mark.parametrize("planner", ["exact", "fast"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"S{s[0]}-d{s[1]}-G{s[2]}")
def test_budget_and_monotone_error(planner, shape):
    """For ratios 1, 2, 3, 4, 6: bytes <= budget, and equal to it within one candidate's step (the leftover is less
    than the largest difference between two candidates); the estimated error never grows with the budget; ratio 1
    is all dense."""
    s, d, g, ctx = shape
    k, v, q, gid = random_case(SHAPES.index(shape), s, d, g, ctx)
    dense_b = dense_segment_bytes(s, d)
    errors = []
    for ratio in RATIOS:
        res = _planners()[planner](k, v, q, gid, ratio=ratio)
        assert res.total_bytes <= res.budget_bytes == math.floor(len(gid) * dense_b / ratio)
        step = dense_b - min(c.bytes(d) for c in res.menu)
        assert 0 <= res.budget_bytes - res.total_bytes < step
        assert int(res.plan.bump_offsets()[2]) * fmt.GRANULE_BYTES + len(gid) * (32 + 4 * d) == res.total_bytes
        errors.append(res.total_error)
        if ratio == 1:
            assert torch.all(res.plan.token_keep) and torch.all(res.plan.k_form == fmt.FORM_DENSE)
            assert torch.all(res.plan.v_form == fmt.FORM_DENSE) and res.total_error == 0.0
            assert measured_error(k, v, res.plan, q, gid) == 0.0
    assert all(a >= b for a, b in zip(errors[1:], errors[:-1])), errors


@settings(max_examples=8, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    s=st.sampled_from([16, 32, 64]),
    d=st.sampled_from([64, 128]),
    g=st.sampled_from([1, 3, 4, 8]),
    ctx=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    ratios=st.lists(st.floats(1.0, 6.0), min_size=2, max_size=4),
)
def test_fast_budget_property(seed, s, d, g, ctx, ratios):
    """plan_fast on random shapes and budgets: within budget, and estimated error monotone in the budget."""
    k, v, q, gid = random_case(seed, s, d, g, ctx, w=4)
    results = [plan_fast(k, v, queries=q, group_ids=gid, ratio=r) for r in sorted(ratios)]
    for res in results:
        assert res.total_bytes <= res.budget_bytes
    errs = [r.total_error for r in results]
    assert all(b >= a - 1e-9 * max(1.0, a) for a, b in zip(errs, errs[1:])), errs


def test_ratio_one_is_exact_even_with_sinks():
    """At ratio 1 every segment is dense with m = S and the reference reconstruction is the input, bit for bit."""
    k, v, q, gid = random_case(3, 32, 64, 4, (3, 2))
    ad = torch.tensor([True, False, False, True, False])
    for res in (plan_exact(k, v, q, ratio=1, group_ids=gid, always_dense=ad), plan_fast(k, v, queries=q, ratio=1.0)):
        kh, vh, mask = apply_plan_reference(k, v, res.plan)
        assert torch.all(mask) and torch.equal(kh, k) and torch.equal(vh, v)
        assert res.ratio == 1.0
    assert torch.equal(res.plan.flags, torch.zeros(5, dtype=torch.int32))


def test_always_dense_segments():
    """Sinks / recent window stay dense and always-read; their bytes are charged first; the rest is planned."""
    k, v, q, gid = random_case(4, 32, 64, 2, (6,))
    ad = torch.tensor([True, True, False, False, False, True])
    res = plan_exact(k, v, q, ratio=1.8, group_ids=gid, always_dense=ad)
    dense_b = dense_segment_bytes(32, 64)
    assert torch.all(res.seg_bytes[ad] == dense_b) and torch.all(res.plan.token_keep[ad])
    assert torch.equal(res.plan.flags, ad.to(torch.int32) * fmt.FLAG_ALWAYS_READ)
    assert torch.all(res.seg_bytes[~ad] < dense_b)
    assert res.total_bytes <= res.budget_bytes
    with pytest.raises(ValueError, match="ratio/budget_bytes: expected a budget >="):
        plan_exact(k, v, q, ratio=2.5, group_ids=gid, always_dense=torch.tensor([True] * 5 + [False]))


@pytest.mark.parametrize("planner", ["exact", "fast"])
def test_kept_tokens_and_channels_are_the_top_scored(planner):
    """Kept tokens are exactly the top-m by attention mass; each kept chan vector keeps exactly its top-k elements by
    |x_c| * w_c with the plan's weights; V weights are ones."""
    k, v, q, gid = random_case(5, 64, 64, 4, (4, 4))
    res = _planners()[planner](k, v, q, gid, ratio=4)
    plan = res.plan
    mass = importance_from_queries(k, q, group_ids=gid).token_mass
    m = plan.token_keep.sum(1)
    assert torch.equal(plan.token_keep, descending_rank(mass) < m[:, None])
    kept_min = mass.masked_fill(~plan.token_keep, float("inf")).min(1).values
    dropped_max = mass.masked_fill(plan.token_keep, float("-inf")).max(1).values
    assert torch.all(kept_min >= dropped_max)
    assert torch.all(plan.v_chan_weight == 1)
    kh, vh, _ = apply_plan_reference(k, v, plan)
    for x, xh, form, param, w in ((k, kh, plan.k_form, plan.k_param, plan.k_chan_weight), (v, vh, plan.v_form, plan.v_param, plan.v_chan_weight)):
        chan = torch.nonzero(form == fmt.FORM_CHAN).squeeze(1)
        assert chan.numel() > 0
        for n in chan.tolist():
            rows = plan.token_keep[n]
            kept = xh[n][rows] != 0
            assert torch.all(kept.sum(-1) == int(param[n]))
            score = x[n][rows].abs() * w[n]
            assert torch.all(score.masked_fill(~kept, float("inf")).min(-1).values >= score.masked_fill(kept, -1).max(-1).values)
            assert torch.equal(xh[n][rows][kept], x[n][rows][kept])


def test_lowrank_factors_are_svd_of_kept_rows():
    """Low-rank sides carry A [N, S, Rmax], B [N, Rmax, d]; A[:m, :r] @ B[:r] is the rank-r SVD of the kept rows."""
    k, v, q, gid = random_case(6, 32, 64, 3, (5,))
    menu = [Candidate(32)] + [
        Candidate(m, fmt.FORM_LOWRANK, r, fmt.FORM_LOWRANK, r2) for m in (32, 16) for r in (4, 8) for r2 in (4, 8)
    ]
    res = plan_exact(k, v, q, ratio=2.5, group_ids=gid, menu=menu)
    plan = res.plan
    assert torch.all(plan.k_form[~(res.seg_bytes == dense_segment_bytes(32, 64))] == fmt.FORM_LOWRANK)
    for side, x in (("k", k), ("v", v)):
        a, b = getattr(plan, f"{side}_factors")
        form, param = getattr(plan, f"{side}_form"), getattr(plan, f"{side}_param")
        for n in torch.nonzero(form == fmt.FORM_LOWRANK).squeeze(1).tolist():
            rows = x[n][plan.token_keep[n]]
            r, mm = int(param[n]), rows.shape[0]
            err = (rows - a[n, :mm, :r] @ b[n, :r]).pow(2).sum()
            sv = torch.linalg.svdvals(rows)
            torch.testing.assert_close(err, sv[r:].pow(2).sum(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ratio", [2, 3, 4])
def test_two_dimensional_beats_single_axis(seed, ratio):
    """On data with per-token heavy channels and concentrated attention (see structured_case), the observed-query
    planner's (unseen_weight=0) measured attention-output error on held-out queries of the same distribution is <=
    both single-axis baselines at the same byte budget, for the exact and the fast estimators."""
    k, v, q, q_test, gid = structured_case(seed)
    for estimator in ("exact", "fast"):
        if estimator == "exact":
            two_d = plan_exact(k, v, q, ratio=ratio, group_ids=gid, unseen_weight=0.0)
        else:
            two_d = plan_fast(k, v, queries=q, ratio=ratio, group_ids=gid, unseen_weight=0.0)
        tok = plan_token_only(k, v, q, ratio=ratio, group_ids=gid, estimator=estimator, unseen_weight=0.0)
        chan = plan_channel_only(k, v, q, ratio=ratio, group_ids=gid, estimator=estimator, unseen_weight=0.0)
        assert two_d.budget_bytes == tok.budget_bytes == chan.budget_bytes
        assert torch.all(tok.plan.k_form == fmt.FORM_DENSE) and torch.all(tok.plan.v_form == fmt.FORM_DENSE)
        assert torch.all(chan.plan.token_keep)
        e2, et, ec = (measured_error(k, v, r.plan, q_test, gid) for r in (two_d, tok, chan))
        assert e2 <= et and e2 <= ec, (estimator, e2, et, ec)


def test_exact_estimator_matches_measurement_for_one_segment():
    """When only one segment is compressed, the exact estimate equals the measured relative output error up to the
    renormalisation factor 1 / (1 + mass_delta)^2 (first order: within a few percent for mild compression)."""
    k, v, q, gid = random_case(8, 32, 64, 4, (4,))
    menu = default_menu(32, 64)
    imp = importance_from_queries(k, q, group_ids=gid)
    est = estimate_errors_exact(k, v, q, menu, imp, group_ids=gid)
    fast_menu = [c for c in menu if fmt.FORM_LOWRANK not in (c.k_form, c.v_form)]
    fast = estimate_errors_fast(k, v, fast_menu, imp, group_ids=gid)
    assert torch.all(est.first_order >= 0) and torch.all(est.err[:, 0] == 0) and torch.all(fast.err[:, 0] == 0)
    torch.testing.assert_close(est.mass_share, imp.token_mass.sum(1))
    for ci in (menu.index(Candidate(24)), menu.index(Candidate(32, fmt.FORM_CHAN, 32, fmt.FORM_CHAN, 32))):
        kh, vh, mask = k.clone(), v.clone(), torch.ones(4, 32, dtype=torch.bool)
        ks, vs = menu[ci].strategies(32, 64)
        sk = ks.select(k, token_score=imp.token_mass, chan_weight=imp.k_chan_weight)
        sv = vs.select(v, token_score=imp.token_mass, chan_weight=imp.v_chan_weight)
        kh[1], vh[1], mask[1] = sk.reconstruct(k)[1], sv.reconstruct(v)[1], sk.token_keep[1]
        meas = float(attention_output_error(k, v, kh, vh, mask, q, group_ids=gid)[0])
        predicted = float(est.first_order[1, ci]) / (1 + float(est.mass_delta[1, ci])) ** 2
        assert predicted == pytest.approx(meas, rel=0.1)


def test_apply_plan_reference_matches_pack_unpack():
    """apply_plan_reference reconstructs what the kernels' reference pack -> unpack produces (fp16 arena): dense and
    chan rows exactly, low-rank rows up to the fp16 rounding of the factors."""
    reference = pytest.importorskip("mosaickv_sglang.kernels.reference")
    if not hasattr(reference, "ref_unpack_segment") or not hasattr(reference, "ref_pack_segments"):
        pytest.skip("mosaickv_sglang.kernels.reference has no ref_pack_segments/ref_unpack_segment yet")
    s, d, n = 32, 64, 6
    k, v, q, gid = random_case(9, s, d, 4, (n,))
    k, v = k.half(), v.half()
    menu = [Candidate(s)] + [
        Candidate(m, kf, kp, vf, vp)
        for m in (s, s // 2)
        for (kf, kp), (vf, vp) in itertools.product(
            [(fmt.FORM_CHAN, 16), (fmt.FORM_LOWRANK, 8), (fmt.FORM_DENSE, 0)], [(fmt.FORM_CHAN, 8), (fmt.FORM_LOWRANK, 4)]
        )
    ]
    plan = plan_exact(k, v, q, ratio=3, group_ids=gid, menu=menu, always_dense=torch.tensor([True] + [False] * 5)).plan
    assert {int(f) for f in torch.cat([plan.k_form, plan.v_form])} >= {fmt.FORM_CHAN, fmt.FORM_LOWRANK}
    kh, vh, mask = apply_plan_reference(k, v, plan)
    k_off, v_off, end = plan.bump_offsets()
    arena = torch.zeros(end * fmt.GRANULE_ELEMS, dtype=torch.float16)
    desc = torch.zeros(n, fmt.DESC_WIDTH, dtype=torch.int32)
    bounds = torch.zeros(n, 2, d, dtype=torch.float16)
    src_k, src_v = k.reshape(n * s, 1, d), v.reshape(n * s, 1, d)
    tok = torch.arange(n * s).view(n, s)
    reference.ref_pack_segments(
        src_k, src_v, tok, torch.zeros(n, dtype=torch.int32), plan, arena, desc, bounds,
        torch.arange(n, dtype=torch.int32), k_off, v_off,
    )
    for i in range(n):
        uk, uv = reference.ref_unpack_segment(arena, desc[i], d)
        for got, ref, form in ((uk, kh[i][mask[i]], int(plan.k_form[i])), (uv, vh[i][mask[i]], int(plan.v_form[i]))):
            if form == fmt.FORM_LOWRANK:
                torch.testing.assert_close(got, ref, rtol=2e-2, atol=3e-2)
            else:
                assert torch.equal(got, ref)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 4), c=st.integers(2, 4), ties=st.booleans())
def test_choose_candidates_small_instances(seed, n, c, ties):
    """Exhaustive check on tiny instances, for every budget from the smallest feasible to all-dense: within budget;
    error non-increasing in the budget; never worse than the optimum for one candidate step less of budget (the
    Lagrangian part is optimal for its own bytes); all dense once everything fits."""
    gen = torch.Generator().manual_seed(seed)
    err = torch.rand(n, c, generator=gen)
    if ties:  # identical segments: the threshold upgrades are tied
        err = err[:1].repeat(n, 1)
    err[:, 0] = 0.0
    nbytes = torch.cat([torch.tensor([1000]), torch.randint(100, 999, (c - 1,), generator=gen)])
    step = int(nbytes.max() - nbytes.min())
    plans = [
        (int(nbytes[list(ch)].sum()), float(err[torch.arange(n), torch.tensor(ch)].sum()))
        for ch in itertools.product(range(c), repeat=n)
    ]

    def optimum(budget: int) -> float:
        return min((e for b, e in plans if b <= budget), default=float("inf"))

    prev = float("inf")
    for budget in range(int(nbytes.min()) * n, 1000 * n + 1, 53):
        choice, _ = choose_candidates(err, nbytes, budget)
        used = int(nbytes[choice].sum())
        total = float(err[torch.arange(n), choice].sum())
        assert used <= budget
        assert total <= prev + 1e-12
        assert total <= optimum(budget - step) + 1e-12
        prev = total
    assert torch.all(choose_candidates(err, nbytes, 1000 * n)[0] == 0)


def test_plan_fast_from_running_stats():
    """The hot path: plan_fast with SegmentImportance from QueryStats (no queries passed) stays within budget and
    keeps the tokens the stats rank highest; plan_exact takes the stats' ring buffer as its queries."""
    h, g, d, s = 2, 4, 64, 32
    gen = torch.Generator().manual_seed(10)
    keys = torch.randn(4 * s, h, d, generator=gen)
    values = torch.randn(4 * s, h, d, generator=gen)
    stats = QueryStats(h, g, d)
    for _ in range(6):
        stats.observe_with_keys(torch.randn(2, h * g, d, generator=gen), keys)
    heads = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    starts = torch.tensor([0, 32, 64, 96] * 2)
    imp = stats.segment_importance(heads, starts, s)
    pos = starts[:, None] + torch.arange(s)
    k, v = keys[pos, heads[:, None]], values[pos, heads[:, None]]
    res = plan_fast(k, v, importance=imp, ratio=3, group_ids=heads)
    assert res.total_bytes <= res.budget_bytes
    exact = plan_exact(k, v, stats.segment_queries(heads), importance=imp, ratio=3, group_ids=heads)
    assert exact.total_bytes <= exact.budget_bytes and exact.total_error >= 0
    m = res.plan.token_keep.sum(1)
    assert torch.equal(res.plan.token_keep, descending_rank(imp.token_mass) < m[:, None])
    torch.testing.assert_close(res.plan.k_chan_weight, stats.k_channel_weight()[heads])


def _bad_calls() -> List[Tuple[str, object]]:
    k, v, q, gid = random_case(11, 32, 64, 2, (3,))
    s_menu = default_menu(32, 64)
    plan = plan_fast(k, v, queries=q, ratio=2).plan
    return [
        ("V: expected shape", lambda: plan_exact(k, v[:, :16], q, ratio=2)),
        ("K: expected dtype", lambda: plan_exact(k.double(), v.double(), q, ratio=2)),
        (r"K \(dim 1, segment size\): expected a power of two", lambda: plan_fast(k[:, :24], v[:, :24], queries=q, ratio=2)),
        (r"K \(dim 2, head_dim\): expected a multiple of 32", lambda: plan_fast(k[..., :48], v[..., :48], queries=q[..., :48], ratio=2)),
        ("ratio: expected a finite number >= 1", lambda: plan_exact(k, v, q, ratio=0.5)),
        ("ratio: expected a finite number >= 1", lambda: plan_fast(k, v, queries=q, ratio=float("nan"))),
        ("ratio/budget_bytes: expected exactly one", lambda: plan_exact(k, v, q, ratio=2, budget_bytes=10_000)),
        ("ratio/budget_bytes: expected exactly one", lambda: plan_exact(k, v, q)),
        ("ratio/budget_bytes: expected a budget >=", lambda: plan_exact(k, v, q, ratio=100)),
        ("budget_bytes: expected >= 0", lambda: plan_fast(k, v, queries=q, budget_bytes=-1)),
        ("queries: expected shape", lambda: plan_exact(k, v, q[:2], ratio=2)),
        ("importance/queries: expected one of them", lambda: plan_fast(k, v, ratio=2)),
        ("always_dense: expected shape", lambda: plan_exact(k, v, q, ratio=2, always_dense=torch.ones(2, dtype=torch.bool))),
        ("always_dense: expected dtype", lambda: plan_exact(k, v, q, ratio=2, always_dense=torch.ones(3))),
        ("group_ids: expected shape", lambda: plan_exact(k, v, q, ratio=2, group_ids=torch.zeros(5, dtype=torch.long))),
        ("menu: expected the dense candidate", lambda: plan_exact(k, v, q, ratio=2, menu=s_menu[1:])),
        ("menu: expected no lowrank candidates in plan_fast", lambda: plan_fast(k, v, queries=q, ratio=2, menu=s_menu)),
        ("menu: expected m <= S", lambda: plan_exact(k, v, q, ratio=2, menu=[Candidate(32), Candidate(64)])),
        ("estimator: expected 'exact' or 'fast'", lambda: plan_token_only(k, v, q, ratio=2, estimator="slow")),
        ("sm_scale: expected a finite float > 0", lambda: plan_exact(k, v, q, ratio=2, sm_scale=-1.0)),
        ("plan: expected \\(N, S, d\\)", lambda: apply_plan_reference(k[:2], v[:2], plan)),
        ("err: expected a finite candidate in every row", lambda: choose_candidates(torch.full((2, 2), float("inf")), torch.tensor([2, 1]), 10)),
        ("budget_bytes: expected >= 2", lambda: choose_candidates(torch.zeros(2, 2), torch.tensor([2, 1]), 1)),
    ]


@pytest.mark.parametrize("idx", range(len(_bad_calls())))
def test_invalid_inputs_name_the_argument(idx):
    """Every bad argument raises ValueError whose message starts with the argument's name."""
    match, call = _bad_calls()[idx]
    with pytest.raises(ValueError, match=match):
        call()


# --- queries unlike the observed ones (unseen_query_error) -----------------------------------------------------------
def retrieval_queries(k: torch.Tensor, gid: torch.Tensor, per_ctx: int, seed: int, sharp: float = 4.0) -> torch.Tensor:
    """Held-out queries that each retrieve one random token of their context: ``q = sharp * k_t / ||k_t|| * sqrt(d)``
    (attention concentrated on ``t``), ``per_ctx`` of them per context, shape ``[N, per_ctx, 1, d]``."""
    gen = torch.Generator().manual_seed(seed)
    n, s, d = k.shape
    out = torch.empty(n, per_ctx, 1, d)
    for g in gid.unique().tolist():
        segs = torch.nonzero(gid == g).squeeze(1)
        rows = k[segs].reshape(-1, d)
        pick = rows[torch.randint(rows.shape[0], (per_ctx,), generator=gen)]
        q = sharp * math.sqrt(d) * pick / pick.norm(dim=-1, keepdim=True)
        out[segs] = q[None, :, None, :]
    return out


def test_unseen_error_prices_dropped_tokens_and_lost_energy():
    """unseen_query_error with the uniform prior: 0 for the dense candidate; (S - m) / T for tok-m with dense K and V
    (T = tokens of the context); for per-vector chan forms, the kept tokens' mean lost energy fraction of K and V,
    over T. The exact estimator reports the same numbers for dense and chan candidates, with either prior."""
    k, v, q, gid = random_case(3, 32, 64, 2, (3, 2))
    n, s, d = k.shape
    menu = [c for c in default_menu(s, d, lowrank=False)]
    imp = importance_from_queries(k, q, group_ids=gid)
    got = unseen_query_error(k, v, menu, imp, group_ids=gid, unseen_prior="uniform")
    t = (torch.bincount(gid)[gid] * s).float()
    rank = descending_rank(imp.token_mass)

    def lost(x, w, kk):
        xf = x.float()
        kept = xf * (descending_rank(xf.abs() * w[:, None, :]) < kk)
        return (xf - kept).pow(2).sum(-1) / xf.pow(2).sum(-1)

    for i, c in enumerate(menu):
        keep = rank < c.m
        lk = lost(k, imp.k_chan_weight, c.k_param) if c.k_form == fmt.FORM_CHAN else torch.zeros(n, s)
        lv = lost(v, imp.v_chan_weight, c.v_param) if c.v_form == fmt.FORM_CHAN else torch.zeros(n, s)
        want = ((keep * (lk + lv) / 2).sum(1) + (s - c.m)) / t
        torch.testing.assert_close(got[:, i], want, rtol=1e-5, atol=1e-7)
    assert torch.all(got[:, menu.index(Candidate(s))] == 0)
    for prior in ("uniform", "novelty"):
        ex = estimate_errors_exact(k, v, q, menu, imp, group_ids=gid, unseen_prior=prior)
        fast = unseen_query_error(k, v, menu, imp, group_ids=gid, unseen_prior=prior)
        torch.testing.assert_close(ex.unseen, fast, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("planner", ["exact", "fast"])
def test_unseen_weight_zero_is_the_observed_objective(planner):
    """With unseen_weight=0 the optimised error is the observed-query error alone; with a weight w it is
    observed + w * unseen, and the plan's est_error reports that objective."""
    k, v, q, gid = random_case(4, 32, 64, 2, (2, 3))
    imp = importance_from_queries(k, q, group_ids=gid)
    menu = default_menu(32, 64, lowrank=planner == "exact")
    for w in (0.0, 0.5):
        if planner == "exact":
            est = estimate_errors_exact(k, v, q, menu, imp, group_ids=gid, unseen_weight=w)
        else:
            est = estimate_errors_fast(k, v, menu, imp, group_ids=gid, unseen_weight=w)
        torch.testing.assert_close(est.err, est.observed_err + w * est.unseen)
    with pytest.raises(ValueError, match="unseen_weight: expected a finite number >= 0, got -1"):
        _planners()[planner](k, v, q, gid, ratio=2, unseen_weight=-1)


@pytest.mark.parametrize("planner", ["exact", "fast"])
@pytest.mark.parametrize("ratio", [2, 3])
def test_unseen_weight_protects_tokens_the_observed_queries_ignore(planner, ratio):
    """On structured data the observed queries attend to a few heavy hitters, so with unseen_weight=0 the planner
    drops most other tokens. A later query that retrieves one of them loses it. With the default weight the planner
    keeps more tokens at the same budget, and the measured error of such retrieval queries is lower; both plans fit
    the budget."""
    k, v, q, _, gid = structured_case(5)
    q_ret = retrieval_queries(k, gid, per_ctx=16, seed=6)
    plan = _planners()[planner]
    old = plan(k, v, q, gid, ratio=ratio, unseen_weight=0.0)
    new = plan(k, v, q, gid, ratio=ratio)
    assert new.total_bytes <= new.budget_bytes and old.total_bytes <= old.budget_bytes
    assert int(new.plan.token_keep.sum()) > int(old.plan.token_keep.sum())
    assert measured_error(k, v, new.plan, q_ret, gid) < measured_error(k, v, old.plan, q_ret, gid)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ratio", [2, 4])
def test_two_dimensional_default_beats_single_axis_on_mixed_queries(seed, ratio):
    """With the default unseen weight (all three planners), the 2-D planner's measured error summed over held-out
    queries of the observed distribution and retrieval queries of random tokens is <= both single-axis baselines at
    the same budget (exact and fast estimators)."""
    k, v, q, q_test, gid = structured_case(seed)
    q_ret = retrieval_queries(k, gid, per_ctx=16, seed=seed + 10)

    def mixed(res) -> float:
        return measured_error(k, v, res.plan, q_test, gid) + measured_error(k, v, res.plan, q_ret, gid)

    for estimator in ("exact", "fast"):
        if estimator == "exact":
            two_d = plan_exact(k, v, q, ratio=ratio, group_ids=gid)
        else:
            two_d = plan_fast(k, v, queries=q, ratio=ratio, group_ids=gid)
        tok = plan_token_only(k, v, q, ratio=ratio, group_ids=gid, estimator=estimator)
        chan = plan_channel_only(k, v, q, ratio=ratio, group_ids=gid, estimator=estimator)
        e2, et, ec = mixed(two_d), mixed(tok), mixed(chan)
        assert e2 <= et * (1 + 1e-6) and e2 <= ec * (1 + 1e-6), (estimator, e2, et, ec)


def test_retrieval_prior_sums_to_one_and_novelty_favours_unrepeated_tokens():
    """retrieval_prior: per context the probabilities sum to 1; "uniform" is 1 / T; with "novelty" a token whose
    value is repeated in its segment gets the floor weight and a token unlike its neighbours the largest."""
    k, v, q, gid = random_case(7, 32, 64, 2, (3, 2))
    v = v.clone()
    v[:, 1::2] = v[:, 0::2]  # every value twice in its segment ...
    v[0, 5] = 10.0 * torch.randn(64, generator=torch.Generator().manual_seed(8))  # ... but one
    v[0, 4] = v[0, 2]  # (whose twin now repeats another token)
    labels = gid.long()
    for kind in ("uniform", "novelty"):
        pr = retrieval_prior(v, labels, 2, kind)
        sums = torch.zeros(2).index_add_(0, labels, pr.sum(1))
        torch.testing.assert_close(sums, torch.ones(2))
    uni = retrieval_prior(v, labels, 2, "uniform")
    torch.testing.assert_close(uni, (1.0 / (torch.bincount(gid)[gid] * 32).float())[:, None].expand(-1, 32))
    nov = retrieval_prior(v, labels, 2, "novelty")
    assert int(nov[gid == 0].argmax()) == 5 and float(nov[0, 5]) > 100 * float(nov[0, 4])
    with pytest.raises(ValueError, match="unseen_prior: expected one of"):
        plan_fast(k, v, queries=q, ratio=2, group_ids=gid, unseen_prior="zipf")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seg", [16, 64])
def test_novelty_equals_its_formula_in_float64(dtype, seg):
    """_novelty is ``min_{j != t} ||v_t - v_j||^2 / ||v_t||^2`` clamped to [0, 1], computed directly in float64
    (fp32 Gram-matrix rounding aside), whatever the chunking (chunks that do not divide the segments give the same
    bits); repeated tokens (about 0) and all-zero tokens (1) included."""
    gen = torch.Generator().manual_seed(3 + seg)
    v = (torch.randn(7, seg, 32, generator=gen) * torch.rand(7, seg, 1, generator=gen) * 4).to(dtype)
    v[0, 1] = v[0, 0]
    v[2, 3] = 0.0
    v[5, :4] = v[5, 4:8]
    v[6, seg // 2] = v[6, 0] * 1.001  # a near-duplicate
    x = v.double()
    d2 = (x[:, :, None, :] - x[:, None, :, :]).pow(2).sum(-1)
    d2.masked_fill_(torch.eye(seg, dtype=torch.bool), float("inf"))
    ref = (d2.min(-1).values / x.pow(2).sum(-1).clamp(min=_EPS)).clamp(max=1.0)
    out = _novelty(v)
    assert out.dtype == torch.float32 and out.shape == (7, seg)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    for chunk in (1, 3):
        assert torch.equal(_novelty(v, chunk), out)
    assert float(out[0, 0]) < 1e-4 and float(out[0, 1]) < 1e-4 and float(out[2, 3]) == 1.0
    assert float(out[6, seg // 2]) < 1e-4
    assert bool(((out >= 0) & (out <= 1)).all()) and float(out[1].min()) > 0.1


def test_novelty_chunks_by_bytes(monkeypatch):
    """The default chunk holds as many segments as fit in NOVELTY_CHUNK_BYTES (at least one), and the result does not
    depend on it."""
    from mosaickv_sglang import planner

    assert planner._novelty_chunk(64, 128) == planner.NOVELTY_CHUNK_BYTES // (4 * 64 * (64 + 2 * 128))
    assert planner._novelty_chunk(64, 128) * 4 * 64 * 320 <= planner.NOVELTY_CHUNK_BYTES
    assert planner._novelty_chunk(1 << 12, 1 << 12) == 1
    v = torch.randn(9, 16, 64, generator=torch.Generator().manual_seed(5)).half()
    whole = _novelty(v)
    monkeypatch.setattr(planner, "NOVELTY_CHUNK_BYTES", 2 * 4 * 16 * (16 + 128))  # two segments a chunk
    assert planner._novelty_chunk(16, 64) == 2
    assert torch.equal(_novelty(v), whole)
