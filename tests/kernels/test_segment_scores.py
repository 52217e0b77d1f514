# SPDX-License-Identifier: Apache-2.0
"""Segment upper-bound scores vs ``ref_segment_scores``; bound validity; fixed-budget selection."""

import math

import pytest
import torch

from mkv_kernel_cases import build_packed, gpu_only, random_selection
from mosaickv_sglang.kernels.reference import ref_segment_scores, ref_unpack_segment
from mosaickv_sglang.kernels.segment_scores import segment_scores_fwd, select_segments

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
