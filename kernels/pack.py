# SPDX-License-Identifier: Apache-2.0
"""Launcher of the pack kernel: compress planned segments from an SGLang KV pool buffer into the packed arena.

The Triton code is in ``mosaickv_sglang.kernels._triton.pack``; the plain-PyTorch oracle is
:func:`mosaickv_sglang.kernels.reference.ref_pack_segments`. Packing runs when a plan lands (off the decode path), so
it may be slower than decode, but it allocates nothing: the arena, descriptor and bounds tables are the caller's.
"""

from __future__ import annotations

import logging
from typing import Tuple

import torch

from . import _checks
from ._triton.pack import _pack_segments_main_kernel
from .format import GRANULE_ELEMS, KERNEL_HEAD_DIMS, SegmentPlan

logger = logging.getLogger(__name__)

__all__ = ["pack_segments_fwd"]


def _factor_args(plan: SegmentPlan, dummy: torch.Tensor) -> Tuple[tuple, bool]:
    """The factor pointers and strides of both sides, and whether any side has factors. A side without factors gets
    the other side's (same dtype, never read: its segments are not low-rank), so the compiled variant does not
    depend on which sides have factors."""
    kf, vf = plan.k_factors, plan.v_factors
    if kf is None and vf is None:
        return (dummy, 0, 0, 0, dummy, 0, 0, 0) * 2, False
    kf, vf = kf or vf, vf or kf
    return tuple(x for a, b in (kf, vf) for x in (a, *a.stride(), b, *b.stride())), True


def pack_segments_fwd(
    k_src: torch.Tensor,
    v_src: torch.Tensor,
    seg_token_index: torch.Tensor,
    seg_heads: torch.Tensor,
    plan: SegmentPlan,
    arena: torch.Tensor,
    desc: torch.Tensor,
    bounds: torch.Tensor,
    seg_ids: torch.Tensor,
    k_offsets: torch.Tensor,
    v_offsets: torch.Tensor,
) -> None:
    """Compress ``N`` segments of one layer into the arena, in place.

    Parameters
    ----------
    k_src, v_src : torch.Tensor
        shape ``[pool_size, H_kv, d]``, dtype = ``arena.dtype`` (``torch.float16`` or ``torch.bfloat16``); the
        layer's SGLang KV pool buffers (any strides).
    seg_token_index : torch.Tensor
        shape ``[N, S]``, dtype ``torch.int64`` or ``torch.int32``; pool slot of each of the segment's ``S`` tokens.
    seg_heads : torch.Tensor
        shape ``[N]``, dtype ``torch.int32``; KV head of each segment.
    plan : SegmentPlan
        The plan of the ``N`` segments (token keep mask, forms, channel weights, low-rank factors, flags);
        ``plan.seg_size == S`` and ``plan.head_dim == d``.
    arena : torch.Tensor
        shape ``[arena_elems]``, dtype ``torch.float16`` or ``torch.bfloat16``, contiguous; written at the payloads.
    desc : torch.Tensor
        shape ``[num_segments, 8]``, dtype ``torch.int32``; rows ``seg_ids`` are written.
    bounds : torch.Tensor
        shape ``[num_segments, 2, d]``, dtype = ``arena.dtype``; rows ``seg_ids`` get the per-channel min/max of the
        segment's ``S`` original K rows.
    seg_ids : torch.Tensor
        shape ``[N]``, dtype ``torch.int32``; descriptor row of each segment (distinct).
    k_offsets, v_offsets : torch.Tensor
        shape ``[N]``, dtype ``torch.int32`` or ``torch.int64``; granule offsets of the K and V payloads, each
        followed by ``payload_granules(...)`` free granules (e.g. from :meth:`SegmentPlan.bump_offsets`).

    Notes
    -----
    Offsets are trusted on the fast path; with ``MOSAICKV_DEBUG_CHECKS=1`` the launcher also checks that payloads
    fit in the arena and do not overlap, and that indices are in range (this synchronizes).
    """
    if not isinstance(plan, SegmentPlan):
        raise TypeError(f"plan: expected SegmentPlan, got {type(plan).__name__}")
    _checks.check_arena(arena)
    dev = arena.device
    n, s, d = plan.num_segments, plan.seg_size, plan.head_dim
    _checks.check_head_dim(d, "plan.head_dim", KERNEL_HEAD_DIMS)
    if plan.device != dev and not _checks.same_device(plan.device, dev):
        raise ValueError(f"plan: expected device {dev}, got {plan.device}")
    _checks.check_tensor(k_src, "k_src", shape=(None, None, d), dtype=arena.dtype, device=dev)
    h_kv = k_src.shape[1]
    _checks.check_tensor(v_src, "v_src", shape=(k_src.shape[0], h_kv, d), dtype=arena.dtype, device=dev)
    _checks.check_tensor(seg_token_index, "seg_token_index", shape=(n, s), dtype=(torch.int32, torch.int64), device=dev)
    _checks.check_tensor(seg_heads, "seg_heads", shape=(n,), dtype=torch.int32, device=dev)
    _checks.check_desc(desc, device=dev)
    num_segments = desc.shape[0]
    _checks.check_tensor(bounds, "bounds", shape=(num_segments, 2, d), dtype=arena.dtype, device=dev)
    _checks.check_tensor(seg_ids, "seg_ids", shape=(n,), dtype=torch.int32, device=dev)
    _checks.check_tensor(k_offsets, "k_offsets", shape=(n,), dtype=(torch.int32, torch.int64), device=dev)
    _checks.check_tensor(v_offsets, "v_offsets", shape=(n,), dtype=(torch.int32, torch.int64), device=dev)
    if n == 0:
        return
    if _checks.debug_checks_enabled():
        _debug_check_pack(k_src, seg_token_index, seg_heads, plan, arena, seg_ids, num_segments, k_offsets, v_offsets)

    # The kernel indexes these 1-D tables by segment number without strides: make views (e.g. ``offs[:, 0]``)
    # contiguous, which is free for tensors that already are.
    seg_heads, seg_ids, k_offsets, v_offsets = (t.contiguous() for t in (seg_heads, seg_ids, k_offsets, v_offsets))
    k_form, k_param, v_form, v_param, flags = (
        t.contiguous() for t in (plan.k_form, plan.k_param, plan.v_form, plan.v_param, plan.flags)
    )
    factor_args, has_factors = _factor_args(plan, arena)
    r_pad = min(s, d)  # SegmentPlan's bound on a low-rank r: at most min(S, d, factor width); S, d powers of two
    block_m = min(s, 64 if d <= 64 else 32)
    keep_u8 = plan.token_keep.view(torch.uint8)
    _pack_segments_main_kernel[(n,)](
        k_src, v_src, *k_src.stride(), *v_src.stride(),
        seg_token_index, *seg_token_index.stride(), seg_heads,
        keep_u8, *keep_u8.stride(),
        k_form, k_param, v_form, v_param, flags,
        plan.k_chan_weight, *plan.k_chan_weight.stride(), plan.v_chan_weight, *plan.v_chan_weight.stride(),
        *factor_args,
        arena, arena.view(torch.int32), desc, desc.stride(0), bounds, *bounds.stride(),
        seg_ids, k_offsets, v_offsets,
        SEG_SIZE=s, HEAD_DIM=d, BLOCK_M=block_m, R_PAD=r_pad, HAS_FACTORS=has_factors,
        num_warps=4,
    )  # fmt: skip


def _debug_check_pack(k_src, seg_token_index, seg_heads, plan, arena, seg_ids, num_segments, k_offsets, v_offsets):
    _checks.debug_check_index_range(seg_token_index, "seg_token_index", 0, k_src.shape[0])
    _checks.debug_check_index_range(seg_heads, "seg_heads", 0, k_src.shape[1])
    _checks.debug_check_index_range(seg_ids, "seg_ids", 0, num_segments)
    if torch.unique(seg_ids).numel() != seg_ids.numel():
        raise ValueError("seg_ids: expected distinct descriptor rows, got duplicates")
    kg, vg = plan.granules()
    starts = torch.cat([k_offsets.to(torch.int64), v_offsets.to(torch.int64)]).cpu()
    ends = starts + torch.cat([kg, vg]).cpu()
    total = arena.numel() // GRANULE_ELEMS
    if int(starts.min()) < 0 or int(ends.max()) > total:
        raise ValueError(f"k_offsets/v_offsets: expected payloads within the arena's {total} granules, "
                         f"got granules [{int(starts.min())}, {int(ends.max())})")
    order = torch.argsort(starts)
    if bool((starts[order][1:] < ends[order][:-1]).any()):
        raise ValueError("k_offsets/v_offsets: expected non-overlapping payloads, got overlapping granule ranges")
