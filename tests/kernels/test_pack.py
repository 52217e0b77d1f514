# SPDX-License-Identifier: Apache-2.0
"""Pack kernel vs ``ref_pack_segments``, plus properties of the packed result decoded by ``ref_unpack_segment``."""

import dataclasses

import pytest
import torch

from mkv_kernel_cases import build_packed, gpu_only, pack_args
from mosaickv_sglang.kernels.format import FORM_CHAN, FORM_DENSE, FORM_LOWRANK, GRANULE_ELEMS, SegmentPlan
from mosaickv_sglang.kernels.pack import pack_segments_fwd
from mosaickv_sglang.kernels.reference import ref_pack_segments, ref_unpack_segment

# (seed, head_dim, seg_size, n_segments, rmax): pairwise over head dims and segment sizes
PACK_CASES = [
    (0, 64, 16, 11, 16),
    (1, 128, 16, 9, 8),
    (2, 64, 64, 10, 32),
    (3, 128, 32, 12, 16),
]


def _pack_both(case):
    """Pack the same case with the kernel and with the reference into identical NaN-filled tables."""
    a2, d2, b2 = case.arena.clone(), case.desc.clone(), case.bounds.clone()
    pack_segments_fwd(*pack_args(case))
    ref_pack_segments(case.k_src, case.v_src, case.seg_token_index, case.seg_heads, case.plan, a2, d2, b2,
                      case.seg_ids, case.k_offsets, case.v_offsets)  # fmt: skip
    return a2, d2, b2


def _same_bits(a, b):
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("seed, d, s, n, rmax", PACK_CASES)
def test_pack_matches_reference_bitwise(seed, d, s, n, rmax, device):
    """The kernel writes exactly the reference's bytes: payloads, descriptor rows and bounds (and nothing else)."""
    case = build_packed(seed, n=n, seg_size=s, head_dim=d, h_kv=3, pool=4 * s + 5, device=device, rmax=rmax,
                        always_read_frac=0.3, pack="none")  # fmt: skip
    a2, d2, b2 = _pack_both(case)
    assert _same_bits(case.arena, a2)
    assert torch.equal(case.desc, d2)
    assert _same_bits(case.bounds, b2)


# (seed, head_dim, seg_size, (K, V) factor columns, 0: none): one side only, both with different widths, width 1
# (unit factor strides), widths narrower than R_PAD = min(S, d) and wider
FACTOR_CASES = [
    (60, 64, 64, (8, 0)),
    (61, 128, 32, (0, 16)),
    (62, 128, 64, (32, 8)),
    (63, 64, 16, (1, 48)),
    (64, 128, 128, (12, 64)),
]


@pytest.mark.parametrize("seed, d, s, rmax", FACTOR_CASES)
def test_pack_factors_on_either_side_any_width_match_reference(seed, d, s, rmax, device):
    """Plans with low-rank factors on K only, V only or both, of several widths, pack the reference's bytes."""
    case = build_packed(seed, n=12, seg_size=s, head_dim=d, h_kv=2, pool=2 * s + 3, device=device, rmax=rmax,
                        pack="none")  # fmt: skip
    plan = case.plan
    assert [f is not None for f in (plan.k_factors, plan.v_factors)] == [r > 0 for r in rmax]
    low = [int((f == FORM_LOWRANK).sum()) for f in (plan.k_form, plan.v_form)]
    assert [n > 0 for n in low] == [r > 0 for r in rmax]
    a2, d2, b2 = _pack_both(case)
    assert _same_bits(case.arena, a2) and torch.equal(case.desc, d2) and _same_bits(case.bounds, b2)


def test_pack_strided_factor_views(device):
    """Factors given as column slices of wider buffers (row strides past the rank) pack the same bytes."""
    case = build_packed(65, n=10, seg_size=32, head_dim=64, h_kv=2, pool=70, device=device, rmax=(8, 12), pack="none")
    a_ref, d_ref, b_ref = _pack_both(case)

    def widened(factors):
        a, b = factors
        wa = torch.full((*a.shape[:2], 40), float("nan"), dtype=a.dtype, device=a.device)
        wb = torch.full((b.shape[0], 40, b.shape[2] + 32), float("nan"), dtype=b.dtype, device=b.device)
        wa[..., : a.shape[2]] = a
        wb[:, : b.shape[1], : b.shape[2]] = b
        return wa[..., : a.shape[2]], wb[:, : b.shape[1], : b.shape[2]]

    plan = dataclasses.replace(case.plan, k_factors=widened(case.plan.k_factors),
                               v_factors=widened(case.plan.v_factors))  # fmt: skip
    assert not plan.k_factors[0].is_contiguous() and not plan.v_factors[1].is_contiguous()
    pack_segments_fwd(case.k_src, case.v_src, case.seg_token_index, case.seg_heads, plan, case.arena, case.desc,
                      case.bounds, case.seg_ids, case.k_offsets, case.v_offsets)  # fmt: skip
    assert _same_bits(case.arena, a_ref) and torch.equal(case.desc, d_ref) and _same_bits(case.bounds, b_ref)


def test_pack_noncontiguous_sources_int32_index(device):
    """Strided pool buffers (a head slice of a wider buffer) and int32 token indices give the reference's bytes."""
    d, s, n, pool = 64, 16, 9, 80
    gen = torch.Generator().manual_seed(5)
    wide_k = torch.randn(pool, 6, d, generator=gen).half().to(device)
    wide_v = torch.randn(pool, 6, d, generator=gen).half().to(device)
    k_src, v_src = wide_k[:, 1::2], wide_v[:, 1::2]
    assert not k_src.is_contiguous()
    tok = torch.stack([torch.randperm(pool, generator=gen)[:s] for _ in range(n)]).to(torch.int32)
    case = build_packed(7, n=n, seg_size=s, head_dim=d, h_kv=3, pool=pool, device=device, k_src=k_src, v_src=v_src,
                        token_index=tok, pack="none")  # fmt: skip
    a2, d2, b2 = _pack_both(case)
    assert _same_bits(case.arena, a2) and torch.equal(case.desc, d2) and _same_bits(case.bounds, b2)


def _brute_topk_mask(x, w, k):
    """Independent oracle of the chan selection: channel c is kept iff fewer than k channels beat it, where c'
    beats c when s[c'] > s[c] or (s[c'] == s[c] and c' < c)."""
    s = x.float().abs() * w[None, :]
    d = s.shape[1]
    idx = torch.arange(d)
    beats = (s[:, :, None] > s[:, None, :]) | ((s[:, :, None] == s[:, None, :]) & (idx[:, None] < idx[None, :]))
    return beats.sum(1) < k  # beats[r, c', c]


@pytest.mark.parametrize("seed, d, s", [(11, 64, 32), (12, 128, 16)])
def test_packed_segments_decode_to_the_planned_approximation(seed, d, s, device):
    """Decoding a kernel-packed segment gives: dense -> the kept rows exactly; chan -> each kept row restricted to
    exactly its top-k channels by |x|*w (ties -> lower channel); lowrank -> A[:m,:r] @ B[:r] (16-bit factors).
    Bounds are the min/max over all S original K rows; N_ROWS is the number of kept tokens."""
    case = build_packed(seed, n=9, seg_size=s, head_dim=d, h_kv=2, pool=5 * s, device=device, pack="kernel")
    # make ties likely: quantize the source so many |x| values repeat (re-pack after editing the pool)
    case.k_src.copy_((case.k_src * 2).round() / 2)
    case.v_src.copy_((case.v_src * 2).round() / 2)
    pack_segments_fwd(*pack_args(case))
    plan = case.plan
    for n in range(plan.num_segments):
        sid = int(case.seg_ids[n])
        row = case.desc[sid].cpu()
        keep = plan.token_keep[n].cpu()
        assert int(row[0]) == int(keep.sum())
        k_dec, v_dec = ref_unpack_segment(case.arena.cpu(), row, d)
        tok = case.seg_token_index[n].cpu()
        head = int(case.seg_heads[n])
        k_orig = case.k_src.cpu()[tok, head].float()
        assert torch.equal(case.bounds[sid, 0].cpu().float(), k_orig.min(0).values)
        assert torch.equal(case.bounds[sid, 1].cpu().float(), k_orig.max(0).values)
        for side, dec, src in (("k", k_dec, case.k_src), ("v", v_dec, case.v_src)):
            rows = src.cpu()[tok, head][keep].float()
            form = int(getattr(plan, f"{side}_form")[n])
            p = int(getattr(plan, f"{side}_param")[n])
            if form == FORM_DENSE:
                assert torch.equal(dec, rows)
            elif form == FORM_CHAN:
                mask = _brute_topk_mask(rows, getattr(plan, f"{side}_chan_weight")[n].cpu(), p)
                assert (mask.sum(1) == p).all()
                assert torch.equal(dec, torch.where(mask, rows, torch.zeros_like(rows)))
            else:
                a, b = (t[n].cpu() for t in getattr(plan, f"{side}_factors"))
                m = rows.shape[0]
                expect = a[:m, :p].to(case.arena.dtype).float() @ b[:p].to(case.arena.dtype).float()
                torch.testing.assert_close(dec, expect, atol=1e-5, rtol=1e-5)


def test_pack_payloads_stay_inside_their_granules(device):
    """Granules outside every payload keep their initial (NaN) bits: nothing is written past a payload's end."""
    case = build_packed(21, n=9, seg_size=16, head_dim=64, h_kv=2, pool=60, device=device, pack="kernel")
    kg, vg = case.plan.granules()
    used = torch.zeros(case.arena.numel() // GRANULE_ELEMS, dtype=torch.bool)
    for off, g in zip(torch.cat([case.k_offsets, case.v_offsets]).tolist(), torch.cat([kg, vg]).tolist()):
        used[off : off + g] = True
    untouched = case.arena.view(-1, GRANULE_ELEMS)[~used.to(device)]
    assert torch.isnan(untouched).all()


def _neg_case(device):
    return build_packed(31, n=4, seg_size=16, head_dim=64, h_kv=2, pool=40, device=device, pack="none")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: a.__setitem__(0, a[0].float()), "k_src: expected dtype torch.float16"),
        (lambda a: a.__setitem__(2, a[2][:, :8]), r"seg_token_index: expected shape \[4, 16\]"),
        (lambda a: a.__setitem__(3, a[3].long()), "seg_heads: expected dtype torch.int32"),
        (lambda a: a.__setitem__(5, a[5][:100]), "arena: expected a length that is a multiple of 64"),
        (lambda a: a.__setitem__(6, a[6][:, :6]), r"desc: expected shape \[\*, 8\]"),
        (lambda a: a.__setitem__(7, a[7][:, :, :32]), r"bounds: expected shape"),
        (lambda a: a.__setitem__(9, a[9].float()), "k_offsets: expected dtype"),
    ],
)
def test_pack_rejects_bad_arguments(mutate, match, device):
    """Bad metadata raises ValueError naming the argument (positive control: the unmodified call works)."""
    case = _neg_case(device)
    args = list(pack_args(case))
    pack_segments_fwd(*args)
    mutate(args)
    with pytest.raises(ValueError, match=match):
        pack_segments_fwd(*args)


def test_pack_rejects_plan_type_and_head_dim(device):
    case = _neg_case(device)
    args = list(pack_args(case))
    args[4] = "plan"
    with pytest.raises(TypeError, match="plan: expected SegmentPlan"):
        pack_segments_fwd(*args)
    small = SegmentPlan.uniform(4, 16, 32, device=device)
    args[4] = small
    with pytest.raises(ValueError, match=r"plan.head_dim: expected head_dim in \(64, 128\), got 32"):
        pack_segments_fwd(*args)


def test_pack_debug_checks_find_overlaps(device, monkeypatch):
    """With MOSAICKV_DEBUG_CHECKS=1, overlapping payloads and out-of-range indices are refused."""
    case = _neg_case(device)
    args = list(pack_args(case))
    monkeypatch.setenv("MOSAICKV_DEBUG_CHECKS", "1")
    pack_segments_fwd(*args)
    args[10] = case.k_offsets.clone()  # V payloads on top of the K payloads
    with pytest.raises(ValueError, match="non-overlapping payloads"):
        pack_segments_fwd(*args)
    args = list(pack_args(case))
    args[2] = case.seg_token_index.clone()
    args[2][0, 0] = 10**6
    with pytest.raises(ValueError, match=r"seg_token_index: expected entries in \[0, 40\)"):
        pack_segments_fwd(*args)


@gpu_only
@pytest.mark.parametrize("d", [64, 128])
def test_pack_bf16_matches_reference_gpu(d):
    """bf16 arenas pack bit-identically to the reference on the GPU."""
    case = build_packed(41, n=18, seg_size=64, head_dim=d, h_kv=4, pool=700, device=torch.device("cuda"),
                        dtype=torch.bfloat16, rmax=32, pack="none")  # fmt: skip
    a2, d2, b2 = _pack_both(case)
    assert _same_bits(case.arena, a2) and torch.equal(case.desc, d2) and _same_bits(case.bounds, b2)


def test_pack_accepts_strided_offset_and_id_views(device):
    """Offsets, ids and heads given as strided views (a column of an [N, 2] table) pack the same bytes."""
    case = build_packed(21, n=7, seg_size=16, head_dim=64, h_kv=2, pool=70, device=device, pack="none")
    a_ref, d_ref, b_ref = _pack_both(case)
    offs = torch.stack([case.k_offsets, case.v_offsets], 1)
    ids = torch.stack([case.seg_ids, case.seg_ids], 1)
    heads = torch.stack([case.seg_heads, case.seg_heads], 1)
    assert not offs[:, 1].is_contiguous()
    pack_segments_fwd(case.k_src, case.v_src, case.seg_token_index, heads[:, 0], case.plan, case.arena, case.desc,
                      case.bounds, ids[:, 1], offs[:, 0], offs[:, 1])  # fmt: skip
    assert _same_bits(case.arena, a_ref) and torch.equal(case.desc, d_ref) and _same_bits(case.bounds, b_ref)
