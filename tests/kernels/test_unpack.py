# SPDX-License-Identifier: Apache-2.0
"""Unpack kernel (packed segments -> dense slots) vs ``ref_unpack_segments``."""

import pytest
import torch

from mkv_kernel_cases import build_packed, gpu_only
from mosaickv_sglang.kernels.reference import ref_unpack_segments
from mosaickv_sglang.kernels.sparse_decode import CHAN_MODE_NAMES
from mosaickv_sglang.kernels.unpack import unpack_segments_fwd


@pytest.mark.parametrize("seed, d, s, out_dtype", [(0, 64, 16, torch.float32), (1, 128, 32, torch.float16),
                                                   (2, 64, 64, torch.float16)])  # fmt: skip
def test_unpack_matches_reference(seed, d, s, out_dtype, device):
    """Slots get the decoded rows (dense and chan exactly, low-rank products rounded once), rows >= m are zero,
    and -1 slots are left untouched."""
    case = build_packed(seed, n=11, seg_size=s, head_dim=d, h_kv=2, pool=12 * s, device=device)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, 11, (3, 5), generator=gen, dtype=torch.int32).to(device)
    ids[0, 0] = -1
    k_out = torch.full((3, 5, s, d), 7.0, dtype=out_dtype, device=device)
    v_out = torch.full_like(k_out, 7.0)
    k_ref, v_ref = k_out.clone(), v_out.clone()
    unpack_segments_fwd(case.arena, case.desc, ids, k_out, v_out)
    ref_unpack_segments(case.arena, case.desc, ids, k_ref, v_ref)
    atol = 1e-6 if out_dtype == torch.float32 else 2e-3
    torch.testing.assert_close(k_out, k_ref, atol=atol, rtol=1e-3)
    torch.testing.assert_close(v_out, v_ref, atol=atol, rtol=1e-3)
    assert (k_out[0, 0] == 7.0).all()


@pytest.mark.parametrize("mode", list(CHAN_MODE_NAMES))
@pytest.mark.parametrize(
    "seed, d, s, out_dtype",
    [(50, 64, 16, torch.float32), (51, 128, 64, torch.float16), (52, 128, 32, torch.float32),
     (53, 64, 64, torch.float16)],
)
def test_unpack_chan_modes_bit_identical(mode, seed, d, s, out_dtype, device):
    """Every chan reconstruction mode rebuilds exactly the reference's rows (chan/dense only: no rounding), on
    chan-heavy segments with k of 1, d - 1, d/4, d/2, one above each and random, and ragged kept rows."""
    case = build_packed(seed, n=18, seg_size=s, head_dim=d, h_kv=2, pool=20 * s, device=device, forms="chan", rmax=0)
    ids = torch.arange(-1, 18, dtype=torch.int32, device=device)
    k_out = torch.full((19, s, d), 7.0, dtype=out_dtype, device=device)
    v_out = torch.full_like(k_out, 7.0)
    k_ref, v_ref = k_out.clone(), v_out.clone()
    unpack_segments_fwd(case.arena, case.desc, ids, k_out, v_out, chan_mode=mode)
    ref_unpack_segments(case.arena, case.desc, ids, k_ref, v_ref)
    assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)


def test_unpack_rejects_bad_arguments(device):
    case = build_packed(3, n=4, seg_size=16, head_dim=64, h_kv=2, pool=80, device=device)
    ids = torch.arange(4, dtype=torch.int32, device=device)
    k_out = torch.empty(4, 16, 64, dtype=torch.float16, device=device)
    unpack_segments_fwd(case.arena, case.desc, ids, k_out, k_out.clone())
    with pytest.raises(ValueError, match=r"k_out: expected shape \[4, \*, \*\]"):
        unpack_segments_fwd(case.arena, case.desc, ids, k_out[:3], k_out[:3])
    odd = torch.empty(4, 12, 64, dtype=torch.float16, device=device)
    with pytest.raises(ValueError, match=r"k_out: expected S \(dim -2\) a power of two in \[16, 256\], got 12"):
        unpack_segments_fwd(case.arena, case.desc, ids, odd, odd.clone())
    with pytest.raises(ValueError, match="v_out: expected a contiguous tensor"):
        unpack_segments_fwd(case.arena, case.desc, ids, k_out, torch.empty(4, 64, 16, dtype=torch.float16,
                                                                           device=device).transpose(1, 2))
    with pytest.raises(ValueError, match="seg_ids: expected dtype torch.int32"):
        unpack_segments_fwd(case.arena, case.desc, ids.long(), k_out, k_out.clone())
    with pytest.raises(ValueError, match="chan_mode: expected one of 0 .*, got 9"):
        unpack_segments_fwd(case.arena, case.desc, ids, k_out, k_out.clone(), chan_mode=9)


@gpu_only
def test_unpack_bf16_gpu():
    dev = torch.device("cuda")
    case = build_packed(4, n=20, seg_size=64, head_dim=128, h_kv=2, pool=1500, device=dev, dtype=torch.bfloat16,
                        rmax=32)  # fmt: skip
    ids = torch.arange(-1, 19, dtype=torch.int32, device=dev)
    k_out = torch.zeros(20, 64, 128, dtype=torch.bfloat16, device=dev)
    v_out = torch.zeros_like(k_out)
    k_ref, v_ref = k_out.clone(), v_out.clone()
    unpack_segments_fwd(case.arena, case.desc, ids, k_out, v_out)
    ref_unpack_segments(case.arena, case.desc, ids, k_ref, v_ref)
    torch.testing.assert_close(k_out, k_ref, atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(v_out, v_ref, atol=2e-2, rtol=1e-2)
