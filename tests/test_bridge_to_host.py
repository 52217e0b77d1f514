# SPDX-License-Identifier: Apache-2.0
"""``to_host``: the sidecar bridge's batched device-to-host copy (one transfer per dtype, every tensor intact)."""

from __future__ import annotations

import pytest
import torch

from mosaickv_sglang.sidecar.bridge import to_host

DTYPES = [torch.float16, torch.float32, torch.int64, torch.bfloat16]


def _random(gen: torch.Generator, dtype: torch.dtype, shape) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-1000, 1000, shape, generator=gen, dtype=dtype)


@pytest.mark.parametrize("seed", range(6))
def test_every_tensor_comes_back_equal_in_order_with_one_transfer_per_dtype(seed, monkeypatch):
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for _ in range(int(torch.randint(1, 12, (1,), generator=gen))):
        dtype = DTYPES[int(torch.randint(len(DTYPES), (1,), generator=gen))]
        rank = int(torch.randint(0, 4, (1,), generator=gen))
        shape = tuple(int(x) for x in torch.randint(0, 7, (rank,), generator=gen))
        t = _random(gen, dtype, shape)
        if rank >= 2 and t.numel() and seed % 2:
            t = t.transpose(0, 1)  # not contiguous: gathered views come like that
        tensors.append(t)
    calls = []
    original = torch.Tensor.cpu

    def counting_cpu(self, *args, **kwargs):
        calls.append(self.dtype)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    out = to_host(tensors)
    monkeypatch.undo()
    assert sorted(calls, key=str) == sorted({t.dtype for t in tensors}, key=str)
    assert len(out) == len(tensors)
    for got, want in zip(out, tensors):
        assert got.device.type == "cpu" and got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_nothing_to_copy():
    assert to_host([]) == []
