# SPDX-License-Identifier: Apache-2.0
"""Extend attention over a compressed prefix vs the float64 ``ref_extend``."""

import math

import pytest
import torch

from mkv_kernel_cases import build_packed, gpu_only, ragged_indices, random_selection
from mosaickv_sglang.kernels.extend import extend_fwd
from mosaickv_sglang.kernels.reference import ref_extend

H_KV = 2

# (seed, head_dim, group, dtype, seg size, extend lengths, prefix tail lengths, segments per request, causal)
EXTEND_CASES = [
    (0, 64, 1, torch.float16, 16, [5, 1, 70], [0, 17, 5], [2, 0, 3], True),
    (1, 128, 3, torch.float32, 32, [17, 3], [97, 0], [1, 3], True),
    (2, 128, 4, torch.float32, 16, [9], [1], [4], False),
    (3, 64, 8, torch.float16, 64, [2, 33], [0, 0], [2, 0], True),
]


class ExtendInputs:
    def __init__(self, seed, d, group, dt, s, ext_lens, tail_lens, seg_counts, device, max_segs=4, n_seg=10):
        pool = n_seg * s + sum(tail_lens) + 5
        self.case = build_packed(seed, n=n_seg, seg_size=s, head_dim=d, h_kv=H_KV, pool=pool, device=device)
        gen = torch.Generator().manual_seed(seed + 1)
        bsz, h_q = len(ext_lens), H_KV * group
        t = sum(ext_lens)
        self.qo = torch.tensor([0] + [int(x) for x in torch.tensor(ext_lens).cumsum(0)], dtype=torch.int32).to(device)
        self.max_len = max(ext_lens)
        self.q = torch.randn(t, h_q, d, generator=gen).to(dt).to(device)
        self.k = torch.randn(t, H_KV, d, generator=gen).to(dt).to(device)
        self.v = torch.randn(t, H_KV, d, generator=gen).to(dt).to(device)
        self.out = torch.full((t, h_q, d), float("nan"), dtype=dt, device=device)
        self.seg_ids = random_selection(gen, n_seg, bsz, H_KV, seg_counts, max_segs, device)
        self.indptr, self.indices = ragged_indices(gen, tail_lens, pool, device, dtype=torch.int32)
        scratch_dt = torch.float32 if dt == torch.float32 else self.case.arena.dtype
        self.ks = torch.full((bsz, H_KV, max_segs, s, d), float("nan"), dtype=scratch_dt, device=device)
        self.vs = torch.full_like(self.ks, float("nan"))

    def args(self):
        c = self.case
        return (self.q, self.k, self.v, self.out, self.qo, self.max_len, c.arena, c.desc, self.seg_ids, c.k_src,
                c.v_src, self.indptr, self.indices, self.ks, self.vs)  # fmt: skip


@pytest.mark.parametrize("seed, d, group, dt, s, ext, tails, segs, causal", EXTEND_CASES)
def test_extend_matches_reference(seed, d, group, dt, s, ext, tails, segs, causal, device, tol):
    """New tokens attend to all prefix segments (mixed forms, any m), the dense prefix tail and the new tokens
    (causal or not): output matches fp64 for ragged extend lengths (1, 5, 17, 70) and tails (0, 1, 17, 97)."""
    x = ExtendInputs(seed, d, group, dt, s, ext, tails, segs, device)
    assert extend_fwd(*x.args(), sm_scale=0.11, causal=causal) is x.out
    ref = ref_extend(*x.args(), sm_scale=0.11, causal=causal)
    torch.testing.assert_close(x.out.double().cpu(), ref, **tol(dt))


@pytest.mark.parametrize("max_segs", [0, 4])
def test_extend_without_prefix_is_causal_attention(max_segs, device, tol):
    """With no segments (none listed, or MAX_SEGS = 0) and no tail, extend is plain causal self-attention."""
    x = ExtendInputs(5, 64, 3, torch.float32, 16, [13, 4], [0, 0], [0, 0], device, max_segs=max_segs)
    extend_fwd(*x.args())
    d = 64
    for b in range(2):
        q0, q1 = int(x.qo[b]), int(x.qo[b + 1])
        for hq in range(6):
            q = x.q[q0:q1, hq].double()
            k = x.k[q0:q1, hq // 3].double()
            v = x.v[q0:q1, hq // 3].double()
            s = (q @ k.T) / math.sqrt(d)
            s = s.masked_fill(~torch.ones_like(s, dtype=torch.bool).tril(), float("-inf"))
            torch.testing.assert_close(x.out[q0:q1, hq].double(), torch.softmax(s, -1) @ v, **tol(torch.float32))


@pytest.mark.parametrize(
    "idx, bad, match",
    [
        (1, lambda t: torch.cat([t, t[:, :1]], 1), r"k_extend: expected H_kv \(dim 1\) dividing H_q=2, got 3"),
        (4, lambda t: t.float(), "qo_indptr: expected dtype"),
        (5, lambda t: -1, "max_extend_len: expected >= 0"),
        (8, lambda t: t[:1], r"seg_ids: expected shape \[3, 2, \*\]"),
        (13, lambda t: t[:, :, :2], r"k_scratch: expected shape \[3, 2, 4, \*, 64\]"),
        (14, lambda t: t[..., :32], r"v_scratch: expected shape"),
        (3, lambda t: t[:2], r"out: expected shape"),
    ],
)
def test_extend_rejects_bad_arguments(idx, bad, match, device):
    x = ExtendInputs(6, 64, 1, torch.float16, 16, [2, 1, 3], [0, 1, 0], [1, 0, 1], device)
    args = list(x.args())
    extend_fwd(*args)
    args[idx] = bad(args[idx])
    with pytest.raises(ValueError, match=match):
        extend_fwd(*args)


@gpu_only
@pytest.mark.parametrize("d, group", [(128, 4), (64, 8)])
def test_extend_bf16_gpu(d, group):
    dev = torch.device("cuda")
    x = ExtendInputs(11, d, group, torch.bfloat16, 64, [1, 97, 300], [0, 513, 17], [3, 6, 0], dev, max_segs=6,
                     n_seg=20)  # fmt: skip
    x.case = build_packed(11, n=20, seg_size=64, head_dim=d, h_kv=H_KV, pool=x.case.k_src.shape[0], device=dev,
                          dtype=torch.bfloat16, rmax=32)  # fmt: skip
    x.ks = torch.empty(x.ks.shape, dtype=torch.bfloat16, device=dev)
    x.vs = torch.empty_like(x.ks)
    extend_fwd(*x.args())
    ref = ref_extend(*x.args())
    torch.testing.assert_close(x.out.double().cpu(), ref, atol=2e-2, rtol=2e-2)
