# SPDX-License-Identifier: Apache-2.0
"""Shared test data of the sidecar tests (imported by name; see conftest.py)."""

from __future__ import annotations

from typing import Any, Tuple

import torch

from mosaickv_sglang.planner import PlanResult
from mosaickv_sglang.sidecar import SidecarConfig

S, D, G, W = 16, 64, 2, 4
READY_TIMEOUT_S = 180.0  # two spawned workers importing torch on a loaded 2-core machine
"""Generous: a spawned worker imports torch, seconds on a busy CI machine."""


def tiny_config(**overrides: Any) -> SidecarConfig:
    kw: dict = dict(seg_size=S, head_dim=D, group_size=G, window=W, num_slots=2, max_segments=8)
    kw.update(overrides)
    return SidecarConfig(**kw)


def make_segments(n: int, seed: int, w: int = W) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``K, V`` ``[n, S, d]`` and queries ``[n, w, G, d]``; odd segments are rank 4, so low-rank candidates win some
    segments and plans carry SVD factors."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(n, S, D, generator=gen)
    v = torch.randn(n, S, D, generator=gen)
    a = torch.randn(n, S, 4, generator=gen)
    k_low = a @ torch.randn(n, 4, D, generator=gen) / 2
    v_low = a @ torch.randn(n, 4, D, generator=gen) / 2
    k[1::2], v[1::2] = k_low[1::2], v_low[1::2]
    q = torch.randn(n, w, G, D, generator=gen)
    return k, v, q


def plan_tensors(result: PlanResult) -> dict:
    """Every tensor of a plan result, by name (factors flattened), for exact comparisons."""
    p = result.plan
    out = {
        "choice": result.choice, "est_error": result.est_error, "seg_bytes": result.seg_bytes,
        "token_keep": p.token_keep, "k_form": p.k_form, "k_param": p.k_param, "v_form": p.v_form,
        "v_param": p.v_param, "k_chan_weight": p.k_chan_weight, "v_chan_weight": p.v_chan_weight, "flags": p.flags,
    }
    for side, f in (("k", p.k_factors), ("v", p.v_factors)):
        if f is not None:
            out[f"{side}_a"], out[f"{side}_b"] = f
    return out
