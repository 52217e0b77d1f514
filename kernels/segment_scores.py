# SPDX-License-Identifier: Apache-2.0
"""Segment selection for the 2-D sparse decode: Quest-style upper-bound scores and a fixed-budget top-k.

:func:`segment_scores_fwd` launches the scores kernel of ``mosaickv_sglang.kernels._triton.segment_scores``;
:func:`select_top_segments` (its top-k kernel) or :func:`select_segments` (``torch.topk``) turn scores into the
``sel_ids`` read by :func:`mosaickv_sglang.kernels.sparse_decode.sparse_decode_fwd`; :func:`score_and_select` is the
pair the decode launches, two kernels a layer. A request with no more candidates than the budget keeps them all: it
is then neither scored nor sorted. All are CUDA-graph safe: fixed shapes, no host synchronization, no allocation in
the Triton launchers (``torch.topk`` allocates its outputs through the caching allocator, which graph capture
supports).
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import triton

from . import _checks
from ._triton.segment_scores import _segment_scores_main_kernel, _segment_select_kernel
from .format import KERNEL_HEAD_DIMS

logger = logging.getLogger(__name__)

__all__ = ["segment_scores_fwd", "select_segments", "select_top_segments", "score_and_select", "select_tile",
           "select_block", "MAX_SELECT_TILE", "SELECT_NUM_WARPS"]

_BLOCK_S = 64
_MIN_SELECT_TILE = 64
MAX_SELECT_TILE = 1024
"""Largest budget (segments) :func:`select_top_segments` sorts for; :func:`score_and_select` takes ``torch.topk``
above it."""
_SELECT_BLOCK = 1024  # scores sorted at a time: one block up to 65,536 tokens of context at S = 64
SELECT_NUM_WARPS = 4


def segment_scores_fwd(
    q: torch.Tensor,
    desc: torch.Tensor,
    bounds: torch.Tensor,
    seg_ids_padded: torch.Tensor,
    seg_counts: torch.Tensor,
    out_scores: torch.Tensor,
    sm_scale: Optional[float] = None,
    *,
    skip_counts_upto: int = -1,
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
    skip_counts_upto : int
        Requests with at most this many candidates are not scored: their rows of ``out_scores`` are left as they
        were (a selection of that budget keeps them all, see :func:`select_top_segments`). ``-1``: every request is
        scored.

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
    _checks.check_int(skip_counts_upto, "skip_counts_upto", lo=-1)
    if bsz == 0 or max_segs == 0:
        return out_scores
    if _checks.debug_checks_enabled():
        _checks.debug_check_index_range(seg_ids_padded, "seg_ids_padded", 0, desc.shape[0], allow_minus_one=True)
    grid = (bsz, h_kv, triton.cdiv(max_segs, _BLOCK_S))
    _segment_scores_main_kernel[grid](
        q, *q.stride(), desc, desc.stride(0), bounds, *bounds.stride(),
        seg_ids_padded, *seg_ids_padded.stride(), seg_counts,
        out_scores, *out_scores.stride(), max_segs, skip_counts_upto, scale,
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


def select_tile(budget: int, max_segs: int) -> int:
    """Sort tile (a compile-time constant) of :func:`select_top_segments` for ``budget`` of ``max_segs`` columns: 64
    when every request fits the budget (nothing is sorted), else ``budget`` rounded up to a power of two, at least
    64. Above :data:`MAX_SELECT_TILE` the top-k kernel does not serve."""
    if budget >= max_segs:
        return _MIN_SELECT_TILE
    return max(_MIN_SELECT_TILE, triton.next_power_of_2(budget))


def select_block(tile: int) -> int:
    """Scores :func:`select_top_segments`' kernel sorts at a time for a sort tile (a compile-time constant)."""
    return max(tile, _SELECT_BLOCK)


def select_top_segments(
    scores: torch.Tensor, seg_ids_padded: torch.Tensor, seg_counts: torch.Tensor, budget: int, out: torch.Tensor
) -> torch.Tensor:
    """Keep the ``budget`` best-scoring segments of every request and KV head, in one Triton kernel.

    A request with at most ``budget`` candidates keeps them all, in table order, and its scores are not read (so
    :func:`segment_scores_fwd` may skip it: ``skip_counts_upto=budget``). Otherwise its ``budget`` best come in
    descending score order, ties in table order: a stable sort's first ``budget``.

    Parameters
    ----------
    scores : torch.Tensor
        shape ``[B, H_kv, MAX_SEGS]``, dtype ``torch.float32``; from :func:`segment_scores_fwd`.
    seg_ids_padded : torch.Tensor
        shape ``[B, H_kv, MAX_SEGS]``, dtype ``torch.int32``; the candidates the scores refer to.
    seg_counts : torch.Tensor
        shape ``[B]``, dtype ``torch.int32``; valid entries per request (entries at ``>= count`` are not candidates,
        whatever they hold).
    budget : int
        Segments read per request and head, ``1 <= budget <= MAX_SEGS``; unless it is ``MAX_SEGS``, at most
        :data:`MAX_SELECT_TILE`.
    out : torch.Tensor
        shape ``[B, H_kv, budget]``, dtype ``torch.int32``; written whole: the selected ids, ``-1`` where fewer than
        ``budget`` candidates (or a ``-inf`` score) exist.

    Returns
    -------
    torch.Tensor
        ``out``.
    """
    _checks.check_tensor(scores, "scores", ndim=3, dtype=torch.float32)
    dev = scores.device
    shape = tuple(scores.shape)
    _checks.check_tensor(seg_ids_padded, "seg_ids_padded", shape=shape, dtype=torch.int32, device=dev)
    _checks.check_tensor(seg_counts, "seg_counts", shape=shape[:1], dtype=torch.int32, device=dev)
    _checks.check_int(budget, "budget", lo=1, hi=shape[2])
    _checks.check_tensor(out, "out", shape=(*shape[:2], budget), dtype=torch.int32, device=dev)
    tile = select_tile(budget, shape[2])
    if tile > MAX_SELECT_TILE:
        raise ValueError(f"budget: expected at most {MAX_SELECT_TILE} or MAX_SEGS ({shape[2]}), got {budget}")
    if out.numel() == 0:
        return out
    _segment_select_kernel[shape[:2]](
        scores, *scores.stride(), seg_ids_padded, *seg_ids_padded.stride(), seg_counts, out, *out.stride(),
        shape[2], budget, TILE=tile, BLOCK=select_block(tile), num_warps=SELECT_NUM_WARPS,
    )  # fmt: skip
    return out


def score_and_select(
    q: torch.Tensor,
    desc: torch.Tensor,
    bounds: torch.Tensor,
    seg_ids_padded: torch.Tensor,
    seg_counts: torch.Tensor,
    scores: torch.Tensor,
    budget: int,
    out: torch.Tensor,
    sm_scale: Optional[float] = None,
) -> torch.Tensor:
    """The decode's selection: :func:`segment_scores_fwd` into ``scores`` (scratch), then the ``budget`` best
    segments into ``out``; arguments as there. Requests with at most ``budget`` candidates are neither scored nor
    sorted (:func:`select_top_segments`); above :data:`MAX_SELECT_TILE` segments, ``torch.topk``
    (:func:`select_segments`). The same ids either way, in an order that may differ."""
    _checks.check_tensor(scores, "scores", ndim=3, dtype=torch.float32)
    _checks.check_int(budget, "budget", lo=1)
    fused = select_tile(budget, scores.shape[2]) <= MAX_SELECT_TILE
    segment_scores_fwd(q, desc, bounds, seg_ids_padded, seg_counts, scores, sm_scale,
                       skip_counts_upto=budget if fused else -1)  # fmt: skip
    if fused:
        return select_top_segments(scores, seg_ids_padded, seg_counts, budget, out)
    return select_segments(scores, seg_ids_padded, budget, out=out)
