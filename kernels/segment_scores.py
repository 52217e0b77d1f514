# SPDX-License-Identifier: Apache-2.0
"""Segment selection for the 2-D sparse decode: Quest-style upper-bound scores and a fixed-budget top-k.

:func:`segment_scores_fwd` launches the Triton kernel of ``mosaickv_sglang.kernels._triton.segment_scores``;
:func:`select_segments` turns scores into the ``sel_ids`` read by
:func:`mosaickv_sglang.kernels.sparse_decode.sparse_decode_fwd`. Both are CUDA-graph safe: fixed shapes, no host
synchronization, no allocation in the launcher (``torch.topk`` allocates its outputs through the caching allocator,
which graph capture supports).
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import triton

from . import _checks
from ._triton.segment_scores import _segment_scores_main_kernel
from .format import KERNEL_HEAD_DIMS

logger = logging.getLogger(__name__)

__all__ = ["segment_scores_fwd", "select_segments"]

_BLOCK_S = 64


def segment_scores_fwd(
    q: torch.Tensor,
    desc: torch.Tensor,
    bounds: torch.Tensor,
    seg_ids_padded: torch.Tensor,
    seg_counts: torch.Tensor,
    out_scores: torch.Tensor,
    sm_scale: Optional[float] = None,
) -> torch.Tensor:
    """Upper-bound attention score of every candidate segment, per request and KV head.

    Parameters
    ----------
    q : torch.Tensor
        shape ``[B, H_q, d]``, dtype ``torch.float16``, ``torch.bfloat16`` or ``torch.float32``; decode queries.
        ``H_q`` is a multiple of ``H_kv``; q head ``i`` belongs to KV head ``i // (H_q / H_kv)``.
    desc : torch.Tensor
        shape ``[num_segments, 8]``, dtype ``torch.int32``; descriptor table (only ``FLAGS`` is read).
    bounds : torch.Tensor
        shape ``[num_segments, 2, d]``, dtype ``torch.float16``/``torch.bfloat16``/``torch.float32``; per-channel
        K min (``[:, 0]``) and max (``[:, 1]``).
    seg_ids_padded : torch.Tensor
        shape ``[B, H_kv, MAX_SEGS]``, dtype ``torch.int32``; candidate segments, ``-1`` padded.
    seg_counts : torch.Tensor
        shape ``[B]``, dtype ``torch.int32``; valid entries per request (entries at ``>= count`` are padding).
    out_scores : torch.Tensor
        shape ``[B, H_kv, MAX_SEGS]``, dtype ``torch.float32``; written: ``max_g ub(q_g) * sm_scale``, ``+inf`` for
        ``FLAG_ALWAYS_READ`` segments, ``-inf`` for padding.
    sm_scale : float, optional
        Softmax scale, default ``1 / sqrt(d)``; must be positive (the ranking is that of ``q . k``).

    Returns
    -------
    torch.Tensor
        ``out_scores``.
    """
    _checks.check_tensor(q, "q", ndim=3, dtype=(torch.float16, torch.bfloat16, torch.float32))
    dev = q.device
    bsz, h_q, d = q.shape
    _checks.check_head_dim(d, "q", KERNEL_HEAD_DIMS)
    _checks.check_desc(desc, device=dev)
    _checks.check_tensor(
        bounds, "bounds", shape=(desc.shape[0], 2, d), dtype=(torch.float16, torch.bfloat16, torch.float32), device=dev
    )
    _checks.check_tensor(seg_ids_padded, "seg_ids_padded", shape=(bsz, None, None), dtype=torch.int32, device=dev)
    h_kv, max_segs = seg_ids_padded.shape[1], seg_ids_padded.shape[2]
    if h_kv == 0 or h_q % h_kv != 0:
        raise ValueError(f"seg_ids_padded: expected H_kv (dim 1) dividing H_q={h_q}, got {h_kv}")
    _checks.check_tensor(seg_counts, "seg_counts", shape=(bsz,), dtype=torch.int32, device=dev)
    _checks.check_tensor(out_scores, "out_scores", shape=(bsz, h_kv, max_segs), dtype=torch.float32, device=dev)
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    if not scale > 0:
        raise ValueError(f"sm_scale: expected a positive float, got {sm_scale}")
    if bsz == 0 or max_segs == 0:
        return out_scores
    if _checks.debug_checks_enabled():
        _checks.debug_check_index_range(seg_ids_padded, "seg_ids_padded", 0, desc.shape[0], allow_minus_one=True)
    grid = (bsz, h_kv, triton.cdiv(max_segs, _BLOCK_S))
    _segment_scores_main_kernel[grid](
        q, *q.stride(), desc, desc.stride(0), bounds, *bounds.stride(),
        seg_ids_padded, *seg_ids_padded.stride(), seg_counts,
        out_scores, *out_scores.stride(), max_segs, scale,
        GROUP=h_q // h_kv, HEAD_DIM=d, BLOCK_S=_BLOCK_S, num_warps=4,
    )  # fmt: skip
    return out_scores


def select_segments(
    scores: torch.Tensor, seg_ids_padded: torch.Tensor, budget: int, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Keep the ``budget`` best-scoring segments of every request and KV head.

    Parameters
    ----------
    scores : torch.Tensor
        shape ``[B, H_kv, MAX_SEGS]``, dtype ``torch.float32``; from :func:`segment_scores_fwd`.
    seg_ids_padded : torch.Tensor
        shape ``[B, H_kv, MAX_SEGS]``, dtype ``torch.int32``; the candidates the scores refer to.
    budget : int
        Segments read per request and head, ``1 <= budget <= MAX_SEGS`` (fixed: shapes stay static).
    out : torch.Tensor, optional
        shape ``[B, H_kv, budget]``, dtype ``torch.int32``; written in place when given.

    Returns
    -------
    torch.Tensor
        shape ``[B, H_kv, budget]``, dtype ``torch.int32``: selected segment ids in descending score order,
        ``-1`` where fewer than ``budget`` candidates exist. ``FLAG_ALWAYS_READ`` segments (score ``+inf``) come
        first; if they alone exceed the budget, some of them are dropped.
    """
    _checks.check_tensor(scores, "scores", ndim=3, dtype=torch.float32)
    _checks.check_tensor(seg_ids_padded, "seg_ids_padded", shape=tuple(scores.shape), dtype=torch.int32,
                         device=scores.device)  # fmt: skip
    _checks.check_int(budget, "budget", lo=1, hi=scores.shape[2])
    shape = (*scores.shape[:2], budget)
    if out is None:
        out = torch.empty(shape, dtype=torch.int32, device=scores.device)
    else:
        _checks.check_tensor(out, "out", shape=shape, dtype=torch.int32, device=scores.device)
    vals, pos = torch.topk(scores, budget, dim=-1, largest=True, sorted=True)
    # gathered straight into ``out`` and padded in place: two kernels fewer a layer than gather, where and copy
    torch.gather(seg_ids_padded, -1, pos, out=out)
    return out.masked_fill_(vals == float("-inf"), -1)
