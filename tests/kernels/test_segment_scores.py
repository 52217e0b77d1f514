# SPDX-License-Identifier: Apache-2.0
"""Segment upper-bound scores vs ``ref_segment_scores``; bound validity; fixed-budget selection."""

import math

import pytest
import torch

from mkv_kernel_cases import build_packed, gpu_only, random_selection
from mosaickv_sglang.kernels.reference import ref_segment_scores, ref_unpack_segment
from mosaickv_sglang.kernels import segment_scores
from mosaickv_sglang.kernels.segment_scores import (
    score_and_select,
    segment_scores_fwd,
    select_segments,
    select_top_segments,
)

# (seed, head_dim, group, q dtype, max_segs, counts): pairwise over head dim x group x dtype
SCORE_CASES = [
    (0, 64, 1, torch.float16, 7, [7, 3]),
    (1, 128, 3, torch.float32, 70, [70, 0, 33]),
    (2, 64, 4, torch.float32, 9, [2, 9]),
    (3, 128, 8, torch.float16, 5, [5]),
]


def _scores_case(seed, d, group, qdt, max_segs, counts, device, h_kv=2):
    n = max(max_segs, 4)
    case = build_packed(seed, n=n, seg_size=16, head_dim=d, h_kv=h_kv, pool=n * 16 + 3, device=device,
                        always_read_frac=0.2)  # fmt: skip
    gen = torch.Generator().manual_seed(seed + 100)
    bsz = len(counts)
    ids = random_selection(gen, n, bsz, h_kv, counts, max_segs, device)
    # counts limit the valid prefix: put the chosen ids first, then make entries past the count garbage-but-valid ids
    ids = torch.sort(ids, dim=-1, descending=True).values
    for b, c in enumerate(counts):
        ids[b, :, c:] = torch.where(torch.arange(max_segs - c, device=device) % 2 == 0, -1, 0).to(torch.int32)
    q = torch.randn(bsz, h_kv * group, d, generator=gen).to(qdt).to(device)
    return case, q, ids, torch.tensor(counts, dtype=torch.int32, device=device)


@pytest.mark.parametrize("seed, d, group, qdt, max_segs, counts", SCORE_CASES)
def test_segment_scores_match_reference(seed, d, group, qdt, max_segs, counts, device):
    """Scores equal max over the GQA group of sum_c max(q*kmin, q*kmax) * sm_scale; +inf for FLAG_ALWAYS_READ,
    -inf for -1 and for entries beyond the request's count. The output may be a strided view."""
    case, q, ids, cnt = _scores_case(seed, d, group, qdt, max_segs, counts, device)
    big = torch.full((len(counts), 2, max_segs, 2), 123.0, device=device)
    out = big[..., 0]
    assert not out.is_contiguous()
    res = segment_scores_fwd(q, case.desc, case.bounds, ids, cnt, out, sm_scale=0.37)
    assert res is out
    ref = ref_segment_scores(q, case.desc, case.bounds, ids, cnt, sm_scale=0.37)
    got = out.double().cpu()
    assert torch.equal(torch.isposinf(got), torch.isposinf(ref))
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin], ref[fin], atol=1e-4, rtol=1e-4)
    assert (big[..., 1] == 123.0).all()


def test_scores_upper_bound_the_segment_logits(device):
    """For every segment the score is >= sm_scale * q.k for each query head of the group and each original row of
    a dense segment (the Quest bound holds)."""
    d, group, h_kv = 64, 4, 2
    case = build_packed(9, n=12, seg_size=16, head_dim=d, h_kv=h_kv, pool=200, device=device, forms="dense",
                        full_rows=True)  # fmt: skip
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(1, h_kv * group, d, generator=gen).to(device)
    ids = torch.arange(12, dtype=torch.int32, device=device).view(1, 1, 12).expand(1, h_kv, 12).contiguous()
    out = torch.empty(1, h_kv, 12, device=device)
    segment_scores_fwd(q, case.desc, case.bounds, ids, torch.tensor([12], dtype=torch.int32, device=device), out)
    scale = 1 / math.sqrt(d)
    for h in range(h_kv):
        for i in range(12):
            k, _ = ref_unpack_segment(case.arena.cpu(), case.desc[i].cpu(), d)
            logits = (q[0, h * group : (h + 1) * group].cpu().float() @ k.T) * scale
            assert float(out[0, h, i]) >= float(logits.max()) - 1e-4


def test_select_segments_picks_the_budget_best():
    """select_segments returns the ids of the top-`budget` scores (always-read first), -1 for padding."""
    inf = float("inf")
    scores = torch.tensor([[[0.5, inf, -inf, 2.0, 1.0], [-inf, -inf, 0.1, -inf, -inf]]])
    ids = torch.tensor([[[10, 11, -1, 13, 14], [-1, -1, 22, 0, 0]]], dtype=torch.int32)
    sel = select_segments(scores, ids, 3)
    assert sel.dtype == torch.int32 and sel.shape == (1, 2, 3)
    assert sel[0, 0].tolist() == [11, 13, 14]
    assert sel[0, 1].tolist() == [22, -1, -1]
    out = torch.empty(1, 2, 3, dtype=torch.int32)
    assert select_segments(scores, ids, 3, out=out) is out and torch.equal(out, sel)


@pytest.mark.parametrize("seed", range(4))
def test_select_segments_matches_a_sort_on_random_scores(device, seed):
    """Random batches, heads, candidate counts and budgets, with always-read (+inf) and padding (-inf) scores: the
    selected ids are a plain sort's top `budget` in descending score order, -1 exactly where the score is -inf; the
    `out` tensor (stale values in it) is written whole."""
    g = torch.Generator().manual_seed(seed)
    b, h = (int(x) for x in torch.randint(1, 6, (2,), generator=g))
    n = int(torch.randint(1, 90, (1,), generator=g))
    scores = torch.randn(b, h, n, generator=g)
    kind = torch.randint(0, 10, (b, h, n), generator=g)
    scores[kind == 0] = float("-inf")
    scores[kind == 1] = float("inf")
    ids = torch.randperm(10 * b * h * n, generator=g)[: b * h * n].reshape(b, h, n).to(torch.int32)
    budget = int(torch.randint(1, n + 1, (1,), generator=g))
    out = torch.full((b, h, budget), 12345, dtype=torch.int32, device=device)
    sel = select_segments(scores.to(device), ids.to(device), budget, out=out)
    assert sel is out
    sel = sel.cpu()
    for i in range(b):
        for j in range(h):
            order = torch.sort(scores[i, j], descending=True, stable=True).indices[:budget]
            want = torch.where(scores[i, j, order] == float("-inf"), -1, ids[i, j, order])
            got = sel[i, j].tolist()
            # always-read segments first, in any order, and any `budget` of them when there are more
            always = set(ids[i, j][scores[i, j] == float("inf")].tolist())
            n_always = min(len(always), budget)
            assert len(set(got[:n_always])) == n_always and set(got[:n_always]) <= always
            assert got[n_always:] == want[n_always:].tolist()
    with pytest.raises(ValueError, match=r"out: expected shape"):
        select_segments(scores.to(device), ids.to(device), budget, out=out[..., :0] if budget > 1 else out[:0])


def _stable_top(scores_row, ids_row, count, budget):
    """Ids of a stable descending sort's first ``budget`` of the first ``count`` scores, ``-1`` for ``-inf``, padded
    with ``-1``; all of the first ``count`` ids, in table order, when they fit the budget."""
    if count <= budget:
        return ids_row[:count].tolist() + [-1] * (budget - count)
    sc = scores_row[:count]
    order = torch.sort(sc, descending=True, stable=True).indices[:budget]
    return torch.where(sc[order] == float("-inf"), -1, ids_row[order]).tolist()


# (seed, batch, heads, table width, budget, scores sorted at a time): sort tiles 64 (budget at and below it), 128 and
# 256; tables of one to three blocks of scores (the served block, 1024, takes one up to 1024 columns: smaller blocks
# cover the merge of blocks at a width the interpreter sorts quickly)
TOP_CASES = [(0, 3, 2, 17, 13, None), (1, 2, 3, 200, 5, 128), (2, 2, 1, 300, 70, 128), (3, 2, 2, 150, 130, None),
             (4, 3, 1, 260, 64, 128), (5, 2, 1, 1100, 64, None)]  # fmt: skip


@pytest.mark.parametrize("seed, b, h, n, budget, block", TOP_CASES)
def test_select_top_segments_matches_a_stable_sort(device, monkeypatch, seed, b, h, n, budget, block):
    """Random scores with ties, always-read (+inf) and padding (-inf), a full table, a request within the budget and
    random counts, garbage past each count: a request that fits the budget keeps its candidates in table order, the
    others get a stable descending sort's best; `out` (stale values in it) is written whole."""
    if block is not None:
        monkeypatch.setattr(segment_scores, "_SELECT_BLOCK", block)
    g = torch.Generator().manual_seed(seed)
    scores = torch.round(torch.randn(b, h, n, generator=g) * 4) / 4  # ties, and -0.0 beside 0.0
    kind = torch.randint(0, 10, (b, h, n), generator=g)
    scores[kind == 0] = float("-inf")
    scores[kind == 1] = float("inf")
    ids = torch.randperm(10 * b * h * n, generator=g)[: b * h * n].reshape(b, h, n).to(torch.int32)
    counts = torch.randint(0, n + 1, (b,), generator=g).to(torch.int32)
    counts[0] = n
    counts[1 % b] = int(torch.randint(0, budget + 1, (1,), generator=g)) if b > 1 else n
    out = torch.full((b, h, budget), 12345, dtype=torch.int32, device=device)
    res = select_top_segments(scores.to(device), ids.to(device), counts.to(device), budget, out)
    assert res is out
    got = out.cpu()
    for i in range(b):
        for j in range(h):
            assert got[i, j].tolist() == _stable_top(scores[i, j], ids[i, j], int(counts[i]), budget), (i, j)


def test_select_top_segments_reads_no_scores_of_a_request_that_fits(device):
    """NaN scores of requests within the budget do not matter (they are never read); a count above the table width
    counts as the width."""
    scores = torch.full((2, 1, 4), float("nan"), device=device)
    scores[1, 0] = torch.tensor([0.5, 2.0, float("-inf"), 1.0])
    ids = torch.tensor([[[7, -1, 9, 3]], [[4, 5, 6, 8]]], dtype=torch.int32, device=device)
    out = torch.empty(2, 1, 3, dtype=torch.int32, device=device)
    select_top_segments(scores, ids, torch.tensor([3, 9], dtype=torch.int32, device=device), 3, out)
    assert out.cpu().tolist() == [[[7, -1, 9]], [[5, 8, 4]]]


@pytest.mark.parametrize("seed, d, group, qdt, max_segs, counts, budget",
                         [(0, 64, 1, torch.float16, 9, [9, 3, 0], 4), (1, 128, 3, torch.float32, 70, [70, 5], 6),
                          (2, 64, 4, torch.float32, 20, [20, 20], 20), (3, 128, 8, torch.float16, 12, [12, 7], 7)])
def test_score_and_select_keeps_the_reference_best(device, seed, d, group, qdt, max_segs, counts, budget):
    """Scores, then the budget's best: the same ids as the reference scores' top-k; a request within the budget is
    not scored (its rows of the scratch keep what they held), the others are, as segment_scores_fwd scores them."""
    case, q, ids, cnt = _scores_case(seed, d, group, qdt, max_segs, counts, device)
    scores = torch.full((len(counts), 2, max_segs), 123.0, device=device)
    out = torch.empty(len(counts), 2, budget, dtype=torch.int32, device=device)
    assert score_and_select(q, case.desc, case.bounds, ids, cnt, scores, budget, out, sm_scale=0.5) is out
    ref = ref_segment_scores(q, case.desc, case.bounds, ids, cnt, sm_scale=0.5)
    got, ids_cpu = out.cpu(), ids.cpu()
    for b, c in enumerate(counts):
        if c <= budget:
            assert (scores[b] == 123.0).all()
        else:
            fin = torch.isfinite(ref[b])
            torch.testing.assert_close(scores[b].double().cpu()[fin], ref[b][fin], atol=1e-4, rtol=1e-4)
        for h in range(2):
            live = [i for i in range(c) if ref[b, h, i] > float("-inf")]
            best = sorted(live, key=lambda i: -float(ref[b, h, i]))[:budget]
            cut = float(ref[b, h, best[-1]]) if best else 0.0
            picked = [x for x in got[b, h].tolist() if x >= 0]
            assert len(picked) == len(best) == len(set(picked))
            # equal to the reference's best but for near-ties at the cut
            for x in set(picked) ^ {int(ids_cpu[b, h, i]) for i in best}:
                i = ids_cpu[b, h, :c].tolist().index(x)
                assert abs(float(ref[b, h, i]) - cut) < 1e-3


def test_score_and_select_above_the_largest_tile_takes_torch_topk(device, monkeypatch):
    """A budget whose sort tile would exceed MAX_SELECT_TILE scores every request and selects with torch.topk: the
    same ids as the top-k kernel, every score written."""
    case, q, ids, cnt = _scores_case(4, 64, 2, torch.float32, 30, [30, 4], device)
    outs, all_scores = [], []
    for cap in (segment_scores.MAX_SELECT_TILE, 32):
        monkeypatch.setattr(segment_scores, "MAX_SELECT_TILE", cap)
        scores = torch.full((2, 2, 30), 123.0, device=device)
        out = torch.empty(2, 2, 5, dtype=torch.int32, device=device)
        score_and_select(q, case.desc, case.bounds, ids, cnt, scores, 5, out)
        outs.append(out.cpu())
        all_scores.append(scores.cpu())
    assert (all_scores[0][1] == 123.0).all() and not (all_scores[1] == 123.0).any()
    assert torch.equal(torch.sort(outs[0][0], dim=-1).values, torch.sort(outs[1][0], dim=-1).values)
    assert torch.equal(torch.sort(outs[0][1], dim=-1).values, torch.sort(outs[1][1], dim=-1).values)


def test_selection_rejects_bad_arguments(device):
    """Bad shapes, dtypes and budgets raise ValueError naming the argument."""
    case, q, ids, cnt = _scores_case(0, 64, 1, torch.float16, 7, [7, 3], device)
    out = torch.empty(2, 2, 7, device=device)
    segment_scores_fwd(q, case.desc, case.bounds, ids, cnt, out)
    with pytest.raises(ValueError, match=r"out_scores: expected shape \[2, 2, 7\]"):
        segment_scores_fwd(q, case.desc, case.bounds, ids, cnt, out[:, :, :6])
    with pytest.raises(ValueError, match="out_scores: expected dtype torch.float32"):
        segment_scores_fwd(q, case.desc, case.bounds, ids, cnt, out.half())
    with pytest.raises(ValueError, match="seg_counts: expected dtype torch.int32"):
        segment_scores_fwd(q, case.desc, case.bounds, ids, cnt.long(), out)
    with pytest.raises(ValueError, match="seg_ids_padded: expected H_kv"):
        segment_scores_fwd(q[:, :1], case.desc, case.bounds, ids, cnt, out)
    with pytest.raises(ValueError, match="q: expected head_dim in"):
        segment_scores_fwd(q[..., :32], case.desc, case.bounds, ids, cnt, out)
    with pytest.raises(ValueError, match="sm_scale: expected a positive float"):
        segment_scores_fwd(q, case.desc, case.bounds, ids, cnt, out, sm_scale=-1.0)
    with pytest.raises(ValueError, match="budget: expected <= 7, got 8"):
        select_segments(out, ids, 8)
    with pytest.raises(TypeError, match="budget: expected int"):
        select_segments(out, ids, 2.0)
    with pytest.raises(ValueError, match="skip_counts_upto: expected >= -1, got -2"):
        segment_scores_fwd(q, case.desc, case.bounds, ids, cnt, out, skip_counts_upto=-2)
    sel = torch.empty(2, 2, 3, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="seg_counts: expected dtype torch.int32"):
        select_top_segments(out, ids, cnt.long(), 3, sel)
    with pytest.raises(ValueError, match=r"out: expected shape \[2, 2, 3\]"):
        select_top_segments(out, ids, cnt, 3, sel[..., :2])
    with pytest.raises(ValueError, match="budget: expected <= 7, got 8"):
        select_top_segments(out, ids, cnt, 8, sel)
    wide = torch.zeros(1, 1, 2000, device=device)
    wide_ids = torch.zeros(1, 1, 2000, dtype=torch.int32, device=device)
    one = torch.ones(1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="budget: expected at most 1024 or MAX_SEGS \\(2000\\), got 1500"):
        select_top_segments(wide, wide_ids, one, 1500, torch.empty(1, 1, 1500, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="budget: expected >= 1, got 0"):
        score_and_select(q, case.desc, case.bounds, ids, cnt, out, 0, sel)


@gpu_only
@pytest.mark.parametrize("group", [1, 8])
def test_segment_scores_bf16_gpu(group):
    """bf16 queries and bounds on the GPU match the reference."""
    dev = torch.device("cuda")
    case, q, ids, cnt = _scores_case(5, 128, group, torch.bfloat16, 40, [40, 13, 0], dev)
    out = torch.empty(3, 2, 40, device=dev)
    segment_scores_fwd(q, case.desc, case.bounds, ids, cnt, out)
    ref = ref_segment_scores(q, case.desc, case.bounds, ids, cnt)
    fin = torch.isfinite(ref)
    torch.testing.assert_close(out.double().cpu()[fin], ref[fin], atol=1e-3, rtol=1e-3)


def _check_served_shape(device, budget):
    counts = [256, budget, 61, 0] if device.type == "cpu" else [256, budget, 61, 200, 0, 255]
    qdt = torch.bfloat16 if device.type == "cuda" else torch.float16
    case, q, ids, cnt = _scores_case(6, 128, 4, qdt, 256, counts, device, h_kv=8)
    scores = torch.empty(len(counts), 8, 256, device=device)
    out = torch.empty(len(counts), 8, budget, dtype=torch.int32, device=device)
    score_and_select(q, case.desc, case.bounds, ids, cnt, scores, budget, out)
    segment_scores_fwd(q, case.desc, case.bounds, ids, cnt, scores)
    want = select_segments(scores, ids, budget)
    assert torch.equal(torch.sort(out, dim=-1).values, torch.sort(want, dim=-1).values)


@pytest.mark.parametrize("budget", [64, pytest.param(100, marks=pytest.mark.slow)])
def test_score_and_select_equals_torch_topk_on_a_served_shape(device, budget):
    """The 8B shape's heads (8 KV, GQA 4, d 128), a 256-column table and counts on both sides of the budget (fp16 in
    the interpreter): the top-k kernel keeps the ids torch.topk keeps from the same scores (all of them within the
    budget)."""
    _check_served_shape(device, budget)


@gpu_only
@pytest.mark.parametrize("budget", [64, 100])
def test_score_and_select_bf16_gpu(budget):
    """As above, compiled for the GPU, bf16 queries and bounds, six requests."""
    _check_served_shape(torch.device("cuda"), budget)
