# SPDX-License-Identifier: Apache-2.0
"""Per-row descending channel rank vs ``ref_chan_rank`` and ``descending_rank``; the planner's drop masks with it."""

import pytest
import torch

from mkv_kernel_cases import gpu_only
from mosaickv_sglang.kernels.chan_rank import ALGO_COUNT, ALGO_SORT, chan_rank_fwd
from mosaickv_sglang.kernels.reference import ref_chan_rank
from mosaickv_sglang.planner import _chan_drop_masks
from mosaickv_sglang.strategies import descending_rank

# (seed, leading shape, d, algo, launch overrides): every d, ragged row counts (not multiples of BLOCK_R), one or a few
# programs each (the interpreter's sort takes about half a second per program)
RANK_CASES = [
    (0, (13,), 64, ALGO_SORT, {}),
    (1, (2, 5), 128, ALGO_SORT, dict(block_r=8)),
    (2, (70,), 16, ALGO_SORT, {}),
    (3, (3,), 256, ALGO_SORT, dict(block_r=2)),
    (4, (5,), 32, ALGO_SORT, dict(block_r=4, num_warps=2)),
    (5, (37,), 64, ALGO_COUNT, {}),
    (6, (3, 3), 128, ALGO_COUNT, dict(block_r=4, block_j=8)),
    (7, (3,), 16, ALGO_COUNT, dict(block_r=2, block_j=16)),
    (8, (5,), 256, ALGO_COUNT, dict(block_r=4, block_j=32, unroll=False)),
    (9, (50,), 32, ALGO_COUNT, dict(block_r=16, block_j=4, num_warps=2)),
]


def _tied_scores(gen: torch.Generator, shape, d: int) -> torch.Tensor:
    """Scores with many exact ties: rows drawn from a few values (zeros of both signs, infinities, negatives), from
    rounded normals, or continuous; NaN-free."""
    n = int(torch.tensor(shape).prod())
    few = torch.tensor([0.0, -0.0, 0.5, 1.0, 2.0, -1.0, float("inf"), -float("inf"), 1e-40, -1e-40])
    pick = few[torch.randint(0, len(few), (n, d), generator=gen)]
    rounded = (torch.randn(n, d, generator=gen) * 2).round() / 2
    smooth = torch.randn(n, d, generator=gen).abs() * torch.rand(n, 1, generator=gen)
    kind = torch.randint(0, 3, (n, 1), generator=gen)
    s = torch.where(kind == 0, pick, torch.where(kind == 1, rounded, smooth))
    zeros = s == 0
    s[zeros] = torch.where(torch.rand(int(zeros.sum()), generator=gen) < 0.5, -0.0, 0.0)
    return s.view(*shape, d)


@pytest.mark.parametrize("seed, lead, d, algo, launch", RANK_CASES)
def test_chan_rank_matches_reference(seed, lead, d, algo, launch, device):
    """rank_i = #{j: s_j > s_i} + #{j < i: s_j == s_i} exactly, for every row: equal to the reference and to the
    planner's descending_rank (a stable sort), with ties among zeros of both signs, infinities and denormals."""
    gen = torch.Generator().manual_seed(seed)
    s = _tied_scores(gen, lead, d)
    rank = chan_rank_fwd(s.to(device), algo=algo, **launch)
    assert rank.dtype == torch.uint8 and rank.shape == s.shape
    assert torch.equal(rank.cpu(), ref_chan_rank(s))
    assert torch.equal(rank.cpu().long(), descending_rank(s))


@pytest.mark.parametrize("algo", [ALGO_SORT, ALGO_COUNT])
def test_chan_rank_orders_nan_by_bits_and_writes_out(algo, device):
    """NaNs rank as the planner's int64 keys order them (a positive NaN above +inf, a negative one below -inf); -0.0
    ties with +0.0 (the lower index first); a given ``out`` is written and returned."""
    d = 16
    s = torch.zeros(2, d)
    s[0, :6] = torch.tensor([0.0, float("nan"), float("inf"), -0.0, -float("inf"), 3.0])
    s[0, 6] = -float("nan")
    s[1] = torch.linspace(-1, 1, d)
    out = torch.full((2, d), 77, dtype=torch.uint8, device=device)
    res = chan_rank_fwd(s.to(device), out, algo=algo, block_r=1)
    assert res is out
    assert torch.equal(out.cpu(), ref_chan_rank(s))
    assert out[0, 1] == 0 and out[0, 2] == 1 and out[0, 5] == 2 and out[0, 0] == 3 and out[0, 3] == 4
    assert out[0, 4] == d - 2 and out[0, 6] == d - 1
    assert torch.equal(out[1].cpu().long(), torch.arange(d - 1, -1, -1))


def test_chan_rank_rejects_bad_arguments(device):
    """Wrong dtype, layout, head dim, out or launch knob raise with "<arg>: expected <x>, got <y>"; a valid call
    passes (positive control)."""
    s = torch.rand(4, 64, device=device)
    chan_rank_fwd(s[:1], algo=ALGO_COUNT)
    with pytest.raises(TypeError, match="score: expected torch.Tensor"):
        chan_rank_fwd(s.tolist())
    with pytest.raises(ValueError, match="score: expected dtype torch.float32, got torch.float16"):
        chan_rank_fwd(s.half())
    with pytest.raises(ValueError, match="score: expected a contiguous tensor"):
        chan_rank_fwd(s.t())
    with pytest.raises(ValueError, match="score: expected a tensor of at least 1 dimension"):
        chan_rank_fwd(s[0, 0])
    for d in (48, 8, 512):
        with pytest.raises(ValueError, match=rf"score: expected last dim in \(16, 32, 64, 128, 256\), got {d}"):
            chan_rank_fwd(torch.rand(2, d, device=device))
    with pytest.raises(ValueError, match="out: expected dtype torch.uint8, got torch.int64"):
        chan_rank_fwd(s, torch.empty(4, 64, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match=r"out: expected shape \[4, 64\], got \[4, 32\]"):
        chan_rank_fwd(s, torch.empty(4, 32, dtype=torch.uint8, device=device))
    with pytest.raises(ValueError, match="algo: expected 'sort' or 'count', got 'radix'"):
        chan_rank_fwd(s, algo="radix")
    with pytest.raises(ValueError, match="block_r: expected a power of two, got 3"):
        chan_rank_fwd(s, block_r=3)
    with pytest.raises(ValueError, match="block_j: expected <= 64, got 128"):
        chan_rank_fwd(s, block_j=128)
    with pytest.raises(ValueError, match=r"num_warps: expected one of \(1, 2, 4, 8, 16\), got 3"):
        chan_rank_fwd(s, num_warps=3)
    assert chan_rank_fwd(torch.empty(0, 3, 64, device=device)).shape == (0, 3, 64)


@pytest.mark.parametrize("d, ks", [(64, [1, 8, 17, 63, 64]), (32, [4, 16, 32])])
def test_chan_drop_masks_kernel_and_sort_paths_equal_topk_path(d, ks, device):
    """_chan_drop_masks gives the same masks bit for bit through the rank kernel and through a full sort of the
    int64 keys as through their topk, on fp16-rounded vectors (tied |x| within a vector), zero rows, signed zeros
    and tied weights; an unknown method is refused."""
    gen = torch.Generator().manual_seed(d)
    n, s = 3, 5
    x = (torch.randn(n, s, d, generator=gen) * 4).round().half().float()
    x[0, 0] = 0.0
    x[1, 1, ::2] = -0.0
    w = torch.randint(1, 4, (n, d), generator=gen).float()
    x, w = x.to(device), w.to(device)
    topk = _chan_drop_masks(x, w, ks, method="topk")
    for method in ("kernel", "sort"):
        got = _chan_drop_masks(x, w, ks, method=method)
        assert sorted(got) == sorted(ks)
        for k in ks:
            assert torch.equal(got[k], topk[k]), (method, k)
            assert torch.equal(got[k].sum(-1), torch.full((n, s), d - k, device=device))
    with pytest.raises(ValueError, match=r"method: expected one of \('topk', 'sort', 'kernel'\), got 'radix'"):
        _chan_drop_masks(x, w, ks, method="radix")


@gpu_only
@pytest.mark.parametrize("algo", [ALGO_SORT, ALGO_COUNT])
@pytest.mark.parametrize("d", [64, 128])
def test_chan_rank_large_on_gpu(algo, d):
    """Many programs on the GPU (a seal's row count, > 2**31 / d rows not needed): equal to the reference; the
    planner's default path on CUDA and its sort and kernel paths equal its topk path."""
    gen = torch.Generator().manual_seed(d)
    s = _tied_scores(gen, (4099, 64), d).cuda()
    assert torch.equal(chan_rank_fwd(s, algo=algo), ref_chan_rank(s))
    x = torch.randn(512, 64, d, device="cuda").half().float()
    w = torch.rand(512, d, device="cuda")
    ks = [d // 8, d // 4, d // 2]
    topk = _chan_drop_masks(x, w, ks, method="topk")
    for method in (None, "sort", "kernel"):
        got = _chan_drop_masks(x, w, ks, method=method)
        assert all(torch.equal(got[k], topk[k]) for k in ks), method


def test_every_launch_variant_of_the_bench_is_valid_and_exact(device):
    """bench.chan_rank times these variants on the GPU: each is a launch chan_rank_fwd accepts and ranks exactly (one
    short row block each, d 64, ties included)."""
    from bench.chan_rank import variants

    gen = torch.Generator().manual_seed(11)
    score = _tied_scores(gen, (3,), 64)
    want = ref_chan_rank(score)
    for v in variants(64):
        assert torch.equal(chan_rank_fwd(score.to(device), **v).cpu().long(), want.long()), v
