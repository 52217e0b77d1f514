# SPDX-License-Identifier: Apache-2.0
"""The decode-speed benchmark: its synthetic plan hits its memory ratio and packs to what it claims, its tables, and
its check that two selections keep segments of the same scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.decode_speed import SEG, build_plan
from mosaickv_sglang.kernels.format import DESC_WIDTH, GRANULE_BYTES


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("ratio", [2.0, 3.0, 4.0])
def test_build_plan_meets_ratio(d, ratio):
    """Stored bytes (payloads + bounds + descriptors) are within 10% of dense / ratio, and sinks stay dense."""
    n = 400
    plan, mix = build_plan(n, d, ratio, torch.Generator().manual_seed(1), torch.device("cpu"))
    kg, vg = plan.granules()
    stored = int((kg + vg).sum()) * GRANULE_BYTES + n * (2 * d * 2 + DESC_WIDTH * 4)
    dense = n * SEG * d * 2 * 2
    assert dense / stored == pytest.approx(ratio, rel=0.05)
    assert int(plan.flags[0]) == 1 and bool(plan.token_keep[0].all())
    assert sum(mix.values()) == n and len([v for v in mix.values() if v]) >= 3


def test_tune_variants_cover_warps_stages_and_split_counts():
    """--tune times every warp x stage pair at the suggested split count and its halves and multiples, within 1..64."""
    from bench.decode_speed import TUNE_STAGES, TUNE_WARPS, tune_variants

    v = tune_variants(8)
    assert len(v) == len(set(v)) == len(TUNE_WARPS) * len(TUNE_STAGES) * 4
    assert {n for _, _, n in v} == {4, 8, 16, 32} and (4, 2, 8) in v
    assert {n for _, _, n in tune_variants(1)} == {1, 2, 4}
    assert {n for _, _, n in tune_variants(32)} == {16, 32, 64}
    with pytest.raises(ValueError, match="splits: expected an integer >= 1, got 0"):
        tune_variants(0)


def _tune_rows() -> list:
    """The first row of the 2026-12-01 H200 tune (``bench.decode_speed --tune``'s JSON), as ``markdown`` takes it."""
    path = Path(__file__).resolve().parents[1] / "bench/results/served-2026-12-01-g/kernel-tune/tune.json"
    return json.loads(path.read_text())["rows"][:1]


def test_markdown_chan_mode_table_marks_a_wrong_mode_and_never_calls_it_fastest():
    """The chan-mode table lists every mode at the best launch, stars the default, and a mode whose output differed
    from the default's is flagged and left out of "fastest" (rows of the 2026-12-01 H200 tune, chan times added)."""
    from bench.decode_speed import markdown

    rows = _tune_rows()
    rows[0]["tune_chan"] = [
        dict(chan_mode=0, name="ptr-gather", ms=0.30, default=True, tbps=0.4),
        dict(chan_mode=1, name="tl-gather", ms=0.40, default=False, tbps=0.3),
        dict(chan_mode=2, name="popcount", ms=0.10, default=False, tbps=1.2, mismatch=True),
        dict(chan_mode=3, name="row-compact", ms=0.20, default=False, tbps=0.6),
    ]
    text = markdown(rows, {}, 4.0e12, "test")
    line = [ln for ln in text.splitlines() if ln.startswith("| llama-3.1-8b | 8192 | 16 | 4/1/16 |")]
    assert line == ["| llama-3.1-8b | 8192 | 16 | 4/1/16 | 0.300* | 0.400 | 0.100 (WRONG) | 0.200 | row-compact | 0.60 |"]


def test_markdown_register_cap_table_names_the_fastest_cap():
    """The register-cap table lists every cap of TUNE_MAXNREG at the best launch ("none": ptxas chooses) and names the
    fastest (rows of the 2026-12-01 H200 tune, cap times added)."""
    from bench.decode_speed import TUNE_MAXNREG, markdown

    rows = _tune_rows()
    assert "register caps" not in markdown(rows, {}, 4.0e12, "test")
    rows[0]["tune_maxnreg"] = [dict(maxnreg=c, ms=ms, tbps=1.0) for c, ms in zip(TUNE_MAXNREG, (0.30, 0.25, 0.27))]
    text = markdown(rows, {}, 4.0e12, "test")
    assert "| shape | context | batch | none | 168 | 128 | fastest |" in text
    assert "| llama-3.1-8b | 8192 | 16 | 0.300 | 0.250 | 0.270 | 168 |" in text
    rows[0]["tune_maxnreg"][1] = dict(maxnreg=168, ms=None, failed="RuntimeError('no')")
    assert "| llama-3.1-8b | 8192 | 16 | 0.300 | failed | 0.270 | 128 |" in markdown(rows, {}, 4.0e12, "test")


def test_markdown_selection_table_compares_the_two_selections():
    """The selection table gives each case's two selection times and their ratio, and is absent from rows without
    them (rows of the 2026-12-01 H200 tune, selection times added)."""
    from bench.decode_speed import markdown

    rows = _tune_rows()
    assert "the selection alone" not in markdown(rows, {}, 4.0e12, "test")
    rows[0].update(select_ms=0.025, select_topk_ms=0.035)
    text = markdown(rows, {}, 4.0e12, "test")
    segs, budget = rows[0]["segments_per_head"], rows[0]["read_budget_tokens"] // SEG
    assert f"| llama-3.1-8b | 8192 | 16 | {segs} | {budget} | 0.0250 | 0.0350 | 1.40x |" in text


def _selection_case(seed: int, bsz: int, h_kv: int, max_segs: int, budget: int):
    """Random scores with ties over distinct ids, and the top-``budget`` ids by a stable sort."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (bsz, h_kv, max_segs), generator=gen).float()  # many ties
    ids = torch.randperm(bsz * h_kv * max_segs, generator=gen).to(torch.int32).view(bsz, h_kv, max_segs)
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :budget]
    return scores, ids, torch.gather(ids, -1, order)


@pytest.mark.parametrize("seed", range(4))
def test_same_selection_scores_accepts_a_tie_swapped_and_reordered_selection(seed):
    from bench.decode_speed import same_selection_scores

    scores, ids, top = _selection_case(seed, 3, 4, 37, 9)
    # the same scores, ties broken the other way (a stable sort of the reversed columns), in another order
    rev = torch.sort(scores.flip(-1), dim=-1, descending=True, stable=True).indices[..., :9]
    other = torch.gather(ids.flip(-1), -1, rev).flip(-1)
    assert not torch.equal(top.sort(-1).values, other.sort(-1).values)  # the ids differ among ties
    assert same_selection_scores(top, other, scores, ids)


@pytest.mark.parametrize("seed", range(4))
def test_same_selection_scores_rejects_a_lower_score_or_a_stranger(seed):
    from bench.decode_speed import same_selection_scores

    scores, ids, top = _selection_case(seed, 2, 3, 29, 7)
    worst = torch.gather(ids, -1, scores.argmin(-1, keepdim=True))
    lower = top.clone()
    b, h = seed % 2, seed % 3
    lower[b, h, 0] = worst[b, h, 0]  # the best kept segment replaced by the worst (scores 0-5: lower unless all tie)
    if scores[b, h].max() > scores[b, h].min():
        assert not same_selection_scores(top, lower, scores, ids)
    stranger = top.clone()
    stranger[b, h, -1] = int(ids.max()) + 1  # not a candidate
    assert not same_selection_scores(top, stranger, scores, ids)
    padded = top.clone()
    padded[b, h, -1] = -1
    assert not same_selection_scores(top, padded, scores, ids)
    assert same_selection_scores(padded, padded.flip(-1), scores, ids)
    assert not same_selection_scores(top, top[..., :-1], scores, ids)
