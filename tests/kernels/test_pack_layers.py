# SPDX-License-Identifier: Apache-2.0
"""``pack_layers_fwd`` (every layer of a seal in one launch) vs ``ref_pack_segments`` layer by layer, and
``concat_plans``, which joins the per-layer plans it packs."""

import pytest
import torch

from mkv_kernel_cases import build_packed, gpu_only, plan_to, random_plan
from mosaickv_sglang.kernels import pack as pack_mod
from mosaickv_sglang.kernels.format import GRANULE_ELEMS, SegmentPlan, concat_plans
from mosaickv_sglang.kernels.pack import pack_layers_fwd
from mosaickv_sglang.kernels.reference import ref_pack_segments

# (seed, head_dim, seg_size, segments per layer, KV heads, layers, factor columns (K, V), 0: none)
LAYER_CASES = [
    (0, 64, 16, 11, 1, 3, (16, 0)),
    (1, 128, 32, 9, 3, 2, (8, 8)),
    (2, 64, 64, 5, 4, 4, (0, 32)),
    (3, 128, 16, 13, 8, 3, (12, 5)),
]


def _layers(seed, d, s, n, h_kv, num_layers, rmax, device, per_layer_plans=True, dtype=torch.float16):
    """``num_layers`` packed cases (``pack="none"``) sharing the token slots, heads and descriptor rows, each with its
    own pool buffers, plan, offsets and NaN-filled tables; with ``per_layer_plans=False`` the plans are slices of one
    random plan of ``num_layers * n`` segments."""
    gen = torch.Generator().manual_seed(seed + 1000)
    pool = 3 * s + 7
    tok = torch.stack([torch.randperm(pool, generator=gen)[:s] for _ in range(n)])
    heads = torch.randint(0, h_kv, (n,), generator=gen, dtype=torch.int32)
    cases = [build_packed(seed * 10 + j, n=n, seg_size=s, head_dim=d, h_kv=h_kv, pool=pool, device=device,
                          dtype=dtype, rmax=rmax, always_read_frac=0.3, token_index=tok, seg_heads=heads, pack="none")
             for j in range(num_layers)]  # fmt: skip
    for c in cases[1:]:
        c.seg_ids = cases[0].seg_ids
    if not per_layer_plans:
        whole = plan_to(random_plan(gen, num_layers * n, s, d, forms="mixed", rmax=rmax), device)
        for j, c in enumerate(cases):
            c.plan = whole.segment_slice(j * n, (j + 1) * n)
            k_off, v_off, end = c.plan.bump_offsets(2)
            c.k_offsets, c.v_offsets = k_off.to(device), v_off.to(device)
            c.arena = torch.full(((end + 1) * GRANULE_ELEMS,), float("nan"), dtype=c.arena.dtype, device=device)
    return cases


def _reference(cases):
    """Each layer packed by the reference into copies of its tables."""
    out = []
    for c in cases:
        a, dsc, b = c.arena.clone(), c.desc.clone(), c.bounds.clone()
        ref_pack_segments(c.k_src, c.v_src, c.seg_token_index, c.seg_heads, c.plan, a, dsc, b, c.seg_ids,
                          c.k_offsets, c.v_offsets)  # fmt: skip
        out.append((a, dsc, b))
    return out


def _pack_all(cases, plan=None):
    c0 = cases[0]
    offsets = torch.stack([torch.stack([c.k_offsets, c.v_offsets], -1) for c in cases])
    pack_layers_fwd([c.k_src for c in cases], [c.v_src for c in cases], c0.seg_token_index, c0.seg_heads,
                    plan if plan is not None else concat_plans([c.plan for c in cases]), [c.arena for c in cases],
                    [c.desc for c in cases], [c.bounds for c in cases], c0.seg_ids, offsets)  # fmt: skip


def _same_bits(a, b):
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def _assert_matches(cases, ref):
    for j, (c, (a, dsc, b)) in enumerate(zip(cases, ref)):
        assert _same_bits(c.arena, a), f"layer {j}: arena"
        assert torch.equal(c.desc, dsc), f"layer {j}: descriptors"
        assert _same_bits(c.bounds, b), f"layer {j}: bounds"


@pytest.mark.parametrize("seed, d, s, n, h_kv, num_layers, rmax", LAYER_CASES)
def test_pack_layers_matches_reference_layer_by_layer(seed, d, s, n, h_kv, num_layers, rmax, device):
    """One launch writes each layer's reference bytes: payloads, descriptor rows, bounds (and nothing else: the
    tables start NaN / -7), from per-layer plans joined by concat_plans (factors of different widths padded)."""
    cases = _layers(seed, d, s, n, h_kv, num_layers, rmax, device)
    ref = _reference(cases)
    _pack_all(cases)
    _assert_matches(cases, ref)


@pytest.mark.parametrize("seed, d, s, n, h_kv, num_layers, rmax", LAYER_CASES[:2])
def test_pack_layers_of_one_plans_slices(seed, d, s, n, h_kv, num_layers, rmax, device):
    """The planners' per-layer plans are slices of one plan: concat_plans gives that plan back without a copy, and the
    launch packs each layer's reference bytes."""
    cases = _layers(seed, d, s, n, h_kv, num_layers, rmax, device, per_layer_plans=False)
    whole = concat_plans([c.plan for c in cases])
    first = cases[0].plan
    assert whole.num_segments == num_layers * n
    for f in ("token_keep", "k_form", "k_chan_weight", "flags"):
        assert getattr(whole, f).data_ptr() == getattr(first, f).data_ptr()
    assert whole.k_factors[0].data_ptr() == first.k_factors[0].data_ptr()
    ref = _reference(cases)
    _pack_all(cases, whole)
    _assert_matches(cases, ref)


@gpu_only
@pytest.mark.parametrize("seed, d, s, n, h_kv, num_layers, rmax", LAYER_CASES)
def test_pack_layers_bf16_matches_reference_gpu(seed, d, s, n, h_kv, num_layers, rmax):
    """bf16 pools and arenas: one launch writes each layer's reference bytes on the GPU."""
    cases = _layers(seed, d, s, n, h_kv, num_layers, rmax, torch.device("cuda"), dtype=torch.bfloat16)
    ref = _reference(cases)
    _pack_all(cases)
    _assert_matches(cases, ref)


def test_pack_layers_of_tensors_few_elements_apart(device):
    """Layers whose tensors are views of one buffer at odd element offsets (the kernel is told a smaller alignment)
    pack each layer's reference bytes."""
    cases = _layers(7, 64, 16, 6, 2, 3, (4, 0), device)
    ref = _reference(cases)

    def views_of_one(ts, pad):
        """Copies of ``ts`` (same shapes) placed ``pad`` elements apart in one buffer."""
        size = max(t.numel() for t in ts) + pad
        big = torch.empty(len(ts) * size + pad, dtype=ts[0].dtype, device=device)
        out = []
        for j, t in enumerate(ts):
            v = big[pad + j * size: pad + j * size + t.numel()].view(t.shape)
            v.copy_(t)
            out.append(v)
        return out

    for name, pad in (("k_src", 3), ("v_src", 1), ("arena", 2), ("desc", 1), ("bounds", 5)):
        for c, v in zip(cases, views_of_one([getattr(c, name) for c in cases], pad)):
            setattr(c, name, v)
    pack_mod._layer_table.cache_clear()
    _pack_all(cases)
    ptrs = tuple(tuple(getattr(c, f).data_ptr() for c in cases) for f in ("k_src", "v_src", "arena", "desc", "bounds"))
    assert pack_mod._layer_table(ptrs, 2, cases[0].arena.device)[1] == 1  # offsets of 3 and 5 elements: odd
    _assert_matches(cases, ref)


def test_pack_layers_without_segments_writes_nothing(device):
    cases = _layers(8, 64, 16, 4, 2, 2, (0, 0), device)
    empty = [c.plan.segment_slice(0, 0) for c in cases]
    before = [(c.arena.clone(), c.desc.clone()) for c in cases]
    pack_layers_fwd([c.k_src for c in cases], [c.v_src for c in cases], cases[0].seg_token_index[:0],
                    cases[0].seg_heads[:0], concat_plans(empty), [c.arena for c in cases], [c.desc for c in cases],
                    [c.bounds for c in cases], cases[0].seg_ids[:0],
                    torch.zeros(2, 0, 2, dtype=torch.int64, device=device))  # fmt: skip
    for c, (a, dsc) in zip(cases, before):
        assert _same_bits(c.arena, a) and torch.equal(c.desc, dsc)


def _args(cases):
    c0 = cases[0]
    offsets = torch.stack([torch.stack([c.k_offsets, c.v_offsets], -1) for c in cases])
    return [[c.k_src for c in cases], [c.v_src for c in cases], c0.seg_token_index, c0.seg_heads,
            concat_plans([c.plan for c in cases]), [c.arena for c in cases], [c.desc for c in cases],
            [c.bounds for c in cases], c0.seg_ids, offsets]  # fmt: skip


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda a: a.__setitem__(1, a[1][:1]), ValueError, "expected one tensor per layer each"),
        (lambda a: a.__setitem__(0, a[0][0]), TypeError, "k_srcs: expected a sequence of torch.Tensor"),
        (lambda a: a.__setitem__(0, [a[0][0], a[0][1].transpose(0, 1).contiguous().transpose(0, 1)]), ValueError,
         r"k_srcs\[1\]: expected the strides"),
        (lambda a: a.__setitem__(5, [a[5][0], a[5][1].float()]), ValueError, r"arenas\[1\]: expected the strides"),
        (lambda a: a.__setitem__(7, [a[7][0], a[7][1][:-1]]), ValueError, r"bounds\[1\]: expected \d+ rows"),
        (lambda a: a.__setitem__(4, a[4].segment_slice(0, a[4].num_segments - 1)), ValueError,
         "plan: expected N segments for each of 2 layers"),
        (lambda a: a.__setitem__(9, a[9][:, :, 0]), ValueError, r"offsets: expected shape \[2, 5, 2\]"),
        (lambda a: a.__setitem__(9, a[9].transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
         "offsets: expected unit stride on dim 2"),
        (lambda a: a.__setitem__(2, a[2][:, :8]), ValueError, r"seg_token_index: expected shape \[5, 16\]"),
        (lambda a: a.__setitem__(0, [a[0][0].float(), a[0][1].float()]), ValueError,
         r"k_srcs\[0\]: expected dtype torch.float16"),
    ],
)
def test_pack_layers_rejects_bad_arguments(mutate, error, match, device):
    """Bad arguments raise naming the argument and layer (positive control: the unmodified call works)."""
    cases = _layers(9, 64, 16, 5, 2, 2, (4, 4), device)
    args = _args(cases)
    pack_layers_fwd(*args)
    mutate(args)
    with pytest.raises(error, match=match):
        pack_layers_fwd(*args)


def test_pack_layers_debug_checks_each_layer(device, monkeypatch):
    """With MOSAICKV_DEBUG_CHECKS=1, overlapping payloads in any layer (here the last) are refused."""
    cases = _layers(10, 64, 16, 5, 2, 3, (0, 0), device)
    monkeypatch.setenv("MOSAICKV_DEBUG_CHECKS", "1")
    args = _args(cases)
    pack_layers_fwd(*args)
    args[9] = args[9].clone()
    args[9][2, :, 1] = args[9][2, :, 0]  # layer 2's V payloads on top of its K payloads
    with pytest.raises(ValueError, match="non-overlapping payloads"):
        pack_layers_fwd(*args)


def test_concat_plans_copies_what_is_not_one_plans_slices(device):
    """Plans made apart are concatenated: every vector and the factors (zero-padded to the widest, zeros for a plan
    without them) hold each plan's values at its rows."""
    gen = torch.Generator().manual_seed(11)
    plans = [plan_to(random_plan(gen, n, 16, 64, forms="mixed", rmax=r), device)
             for n, r in ((3, (4, 0)), (5, (9, 0)), (2, (0, 0)))]  # fmt: skip
    whole = concat_plans(plans)
    assert whole.num_segments == 10 and whole.v_factors is None
    assert whole.k_form.data_ptr() != plans[0].k_form.data_ptr()
    rows = 0
    for p in plans:
        part = whole.segment_slice(rows, rows + p.num_segments)
        for f in ("token_keep", "k_form", "k_param", "v_form", "v_param", "k_chan_weight", "v_chan_weight", "flags"):
            assert torch.equal(getattr(part, f), getattr(p, f)), f
        a, b = part.k_factors
        assert a.shape[2] == 9 and b.shape[1] == 9
        if p.k_factors is None:
            assert not a.any() and not b.any()
        else:
            r = p.k_factors[0].shape[2]
            assert torch.equal(a[:, :, :r], p.k_factors[0]) and not a[:, :, r:].any()
            assert torch.equal(b[:, :r], p.k_factors[1]) and not b[:, r:].any()
        rows += p.num_segments


def test_concat_plans_rejects_bad_input(device):
    with pytest.raises(ValueError, match="plans: expected at least one plan"):
        concat_plans([])
    with pytest.raises(TypeError, match="plans: expected SegmentPlan items"):
        concat_plans([SegmentPlan.uniform(2, 16, 64, device=device), "plan"])
    with pytest.raises(ValueError, match="plans: expected one segment size, head dim and device"):
        concat_plans([SegmentPlan.uniform(2, 16, 64, device=device), SegmentPlan.uniform(2, 32, 64, device=device)])
    one = SegmentPlan.uniform(2, 16, 64, device=device)
    assert concat_plans([one]) is one


def test_concat_plans_views_only_consecutive_slices_of_one_plan(device):
    """Consecutive slices of one plan (slices of slices too) join into that plan's slice, a view; slices out of order
    or of two plans are copied in the order given."""
    gen = torch.Generator().manual_seed(12)
    whole = plan_to(random_plan(gen, 10, 16, 64, forms="mixed", rmax=(6, 3)), device)
    other = plan_to(random_plan(gen, 4, 16, 64, forms="mixed", rmax=(6, 3)), device)
    joined = concat_plans([whole.segment_slice(0, 3), whole.segment_slice(3, 10).segment_slice(0, 4)])
    assert joined.num_segments == 7 and joined.k_form.data_ptr() == whole.k_form.data_ptr()
    assert joined.v_factors[1].data_ptr() == whole.v_factors[1].data_ptr()
    assert concat_plans([whole.segment_slice(0, 5), whole.segment_slice(5, 10)]) is whole
    for parts in ([whole.segment_slice(3, 5), whole.segment_slice(0, 3)],
                  [whole.segment_slice(0, 2), other.segment_slice(2, 4)]):  # fmt: skip
        got = concat_plans(parts)
        assert got.k_form.data_ptr() not in (whole.k_form.data_ptr(), other.k_form.data_ptr())
        rows = 0
        for p in parts:
            part = got.segment_slice(rows, rows + p.num_segments)
            assert torch.equal(part.token_keep, p.token_keep) and torch.equal(part.k_param, p.k_param)
            assert torch.equal(part.v_chan_weight, p.v_chan_weight) and torch.equal(part.k_factors[0], p.k_factors[0])
            rows += p.num_segments


def test_pack_layers_refuses_arenas_not_a_whole_int32_apart(device):
    """The kernel also reads each layer's arena as int32: an arena an odd number of elements from layer 0's is
    refused by name (layer 0's own alignment is check_arena's)."""
    cases = _layers(13, 64, 16, 3, 2, 2, (0, 0), device)
    big = torch.full((cases[1].arena.numel() + 1,), float("nan"), dtype=cases[1].arena.dtype, device=device)
    args = _args(cases)
    args[5] = [args[5][0], big[1:]]
    pack_mod._layer_table.cache_clear()
    with pytest.raises(ValueError, match=r"arenas: expected layers whose addresses are a multiple of 4 bytes apart"):
        pack_layers_fwd(*args)
