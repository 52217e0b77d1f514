# SPDX-License-Identifier: Apache-2.0
"""Launchers of the pack kernel: compress planned segments from an SGLang KV pool buffer into the packed arena.

:func:`pack_segments_fwd` packs one layer; :func:`pack_layers_fwd` packs the same pages in every layer of a seal in
one launch (the scheduler waits for a seal's launches and their argument checks: with one launch per layer, the pack
held it about 14 ms a seal of the 8B shape on an H200, ``bench/RESULTS.md``).

The Triton code is in ``mosaickv_sglang.kernels._triton.pack``; the plain-PyTorch oracle is
:func:`mosaickv_sglang.kernels.reference.ref_pack_segments`. Packing runs when a plan lands (off the decode path), so
it may be slower than decode, but it allocates nothing: the arena, descriptor and bounds tables are the caller's.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional, Sequence, Tuple

import torch

from . import _checks
from ._triton import pack as _tpack
from ._triton.pack import _pack_segments_main_kernel
from .format import GRANULE_ELEMS, KERNEL_HEAD_DIMS, SegmentPlan

logger = logging.getLogger(__name__)

__all__ = ["pack_layers_fwd", "pack_segments_fwd"]

LAYER_ALIGN_MAX = 16
"""Largest alignment (in elements) the kernel is told the layers' offsets have."""


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
    n = _check_shared(plan, 1, k_src, v_src, seg_token_index, seg_heads, arena, desc, bounds, seg_ids,
                      ("k_src", "v_src", "arena", "desc", "bounds"))  # fmt: skip
    dev = arena.device
    _checks.check_tensor(k_offsets, "k_offsets", shape=(n,), dtype=(torch.int32, torch.int64), device=dev)
    _checks.check_tensor(v_offsets, "v_offsets", shape=(n,), dtype=(torch.int32, torch.int64), device=dev)
    if n == 0:
        return
    if _checks.debug_checks_enabled():
        _debug_check_pack(k_src, seg_token_index, seg_heads, plan, arena, seg_ids, desc.shape[0], k_offsets, v_offsets)
    if k_offsets.dtype != v_offsets.dtype:
        k_offsets, v_offsets = k_offsets.long(), v_offsets.long()
    offsets = torch.stack((k_offsets, v_offsets), dim=-1)[None]
    _launch([k_src], [v_src], seg_token_index, seg_heads, plan, [arena], [desc], [bounds], seg_ids, offsets)


def pack_layers_fwd(
    k_srcs: Sequence[torch.Tensor],
    v_srcs: Sequence[torch.Tensor],
    seg_token_index: torch.Tensor,
    seg_heads: torch.Tensor,
    plan: SegmentPlan,
    arenas: Sequence[torch.Tensor],
    descs: Sequence[torch.Tensor],
    bounds: Sequence[torch.Tensor],
    seg_ids: torch.Tensor,
    offsets: torch.Tensor,
) -> None:
    """Compress the same ``N`` segments (token slots and heads) in each of ``L`` layers, in place, in one launch.

    Parameters
    ----------
    k_srcs, v_srcs : sequence of torch.Tensor
        ``L`` layers' pool buffers, each as ``k_src``/``v_src`` of :func:`pack_segments_fwd`; every layer's with the
        strides of layer 0's (the pool size, dim 0, may differ).
    seg_token_index, seg_heads, seg_ids : torch.Tensor
        As in :func:`pack_segments_fwd`, shared by the layers.
    plan : SegmentPlan
        ``L * N`` segments, layer-major: row ``j * N + n`` plans segment ``n`` of layer ``j``
        (:func:`~mosaickv_sglang.kernels.format.concat_plans` joins per-layer plans).
    arenas, descs, bounds : sequence of torch.Tensor
        ``L`` layers' tables, each as in :func:`pack_segments_fwd` and like layer 0's (strides, dtype; dim 0 may
        differ).
    offsets : torch.Tensor
        shape ``[L, N, 2]``, dtype ``torch.int32`` or ``torch.int64``, unit stride on the last dim; granule offsets of
        the K (``[..., 0]``) and V (``[..., 1]``) payloads of each layer's segments.

    Notes
    -----
    The kernel reaches layer ``j``'s tensors by their element offsets from layer 0's (a small table, cached by the
    tensors' addresses), so the tensors of one list must be of one dtype and their addresses a whole number of
    elements apart (the arenas' a multiple of 4 bytes: the kernel also reads them as int32).
    ``MOSAICKV_DEBUG_CHECKS=1`` checks each layer as :func:`pack_segments_fwd` does.
    """
    lists = {"k_srcs": k_srcs, "v_srcs": v_srcs, "arenas": arenas, "descs": descs, "bounds": bounds}
    for name, ts in lists.items():
        if isinstance(ts, torch.Tensor) or not isinstance(ts, Sequence):
            raise TypeError(f"{name}: expected a sequence of torch.Tensor (one per layer), got {type(ts).__name__}")
    num_layers = len(k_srcs)
    if num_layers == 0 or any(len(ts) != num_layers for ts in lists.values()):
        raise ValueError(f"k_srcs/v_srcs/arenas/descs/bounds: expected one tensor per layer each (at least one), got "
                         f"lengths {[len(ts) for ts in lists.values()]}")  # fmt: skip
    n = _check_shared(plan, num_layers, k_srcs[0], v_srcs[0], seg_token_index, seg_heads, arenas[0], descs[0],
                      bounds[0], seg_ids, tuple(f"{name}[0]" for name in lists))  # fmt: skip
    _checks.check_tensor(offsets, "offsets", shape=(num_layers, n, 2), dtype=(torch.int32, torch.int64),
                         device=arenas[0].device)  # fmt: skip
    if offsets.stride(2) != 1:
        raise ValueError(f"offsets: expected unit stride on dim 2, got strides {tuple(offsets.stride())}")
    for name, ts in lists.items():
        _check_like_first(ts, name)
    for j in range(1, num_layers):
        if bounds[j].shape[0] != descs[j].shape[0]:
            raise ValueError(
                f"bounds[{j}]: expected {descs[j].shape[0]} rows (as descs[{j}]), got {bounds[j].shape[0]}"
            )
    if n == 0:
        return
    if _checks.debug_checks_enabled():
        for j in range(num_layers):
            _debug_check_pack(k_srcs[j], seg_token_index, seg_heads, plan.segment_slice(j * n, (j + 1) * n),
                              arenas[j], seg_ids, descs[j].shape[0], offsets[j, :, 0], offsets[j, :, 1])  # fmt: skip
    _launch(k_srcs, v_srcs, seg_token_index, seg_heads, plan, arenas, descs, bounds, seg_ids, offsets)


def _check_shared(plan, num_layers, k_src, v_src, seg_token_index, seg_heads, arena, desc, bounds, seg_ids, names):
    """Checks of both launchers on layer 0's tensors (``names``: theirs in messages); returns ``N``."""
    k_name, v_name, arena_name, desc_name, bounds_name = names
    if not isinstance(plan, SegmentPlan):
        raise TypeError(f"plan: expected SegmentPlan, got {type(plan).__name__}")
    arena = _checks.check_arena(arena, arena_name)
    dev = arena.device
    s, d = plan.seg_size, plan.head_dim
    _checks.check_head_dim(d, "plan.head_dim", KERNEL_HEAD_DIMS)
    if plan.device != dev and not _checks.same_device(plan.device, dev):
        raise ValueError(f"plan: expected device {dev}, got {plan.device}")
    if plan.num_segments % num_layers:
        raise ValueError(f"plan: expected N segments for each of {num_layers} layers (layer-major), got "
                         f"{plan.num_segments}")  # fmt: skip
    n = plan.num_segments // num_layers
    _checks.check_tensor(k_src, k_name, shape=(None, None, d), dtype=arena.dtype, device=dev)
    h_kv = k_src.shape[1]
    _checks.check_tensor(v_src, v_name, shape=(k_src.shape[0], h_kv, d), dtype=arena.dtype, device=dev)
    _checks.check_tensor(seg_token_index, "seg_token_index", shape=(n, s), dtype=(torch.int32, torch.int64), device=dev)
    _checks.check_tensor(seg_heads, "seg_heads", shape=(n,), dtype=torch.int32, device=dev)
    _checks.check_desc(desc, desc_name, device=dev)
    _checks.check_tensor(bounds, bounds_name, shape=(desc.shape[0], 2, d), dtype=arena.dtype, device=dev)
    _checks.check_tensor(seg_ids, "seg_ids", shape=(n,), dtype=torch.int32, device=dev)
    return n


def _launch(k_srcs, v_srcs, seg_token_index, seg_heads, plan, arenas, descs, bounds, seg_ids, offsets) -> None:
    """One launch of the kernel on checked arguments: ``N`` segments in each of ``len(k_srcs)`` layers."""
    n, num_layers = seg_token_index.shape[0], len(k_srcs)
    k_src, v_src, arena, desc, b = k_srcs[0], v_srcs[0], arenas[0], descs[0], bounds[0]
    if num_layers == 1:  # a one-layer table is zeros: one per device, not one per set of tensors
        ptrs = ((0,),) * 5
    else:
        ptrs = tuple(tuple(t.data_ptr() for t in ts) for ts in (k_srcs, v_srcs, arenas, descs, bounds))
    layer_offs, layer_align, ready = _layer_table(ptrs, arena.element_size(), arena.device)
    if ready is not None:  # the table's copy, on the stream that first made it
        torch.cuda.current_stream(arena.device).wait_event(ready)
    # The kernel indexes these 1-D tables by segment number without strides: make views (e.g. a column of a table)
    # contiguous, which is free for tensors that already are.
    seg_heads, seg_ids = seg_heads.contiguous(), seg_ids.contiguous()
    k_form, k_param, v_form, v_param, flags = (
        t.contiguous() for t in (plan.k_form, plan.k_param, plan.v_form, plan.v_param, plan.flags)
    )
    factor_args, has_factors = _factor_args(plan, arena)
    s, d = plan.seg_size, plan.head_dim
    r_pad = min(s, d)  # SegmentPlan's bound on a low-rank r: at most min(S, d, factor width); S, d powers of two
    block_m = min(s, 64 if d <= 64 else 32)
    keep_u8 = plan.token_keep.view(torch.uint8)
    _pack_segments_main_kernel[(n, num_layers)](
        k_src, v_src, *k_src.stride(), *v_src.stride(),
        seg_token_index, *seg_token_index.stride(), seg_heads,
        keep_u8, *keep_u8.stride(),
        k_form, k_param, v_form, v_param, flags,
        plan.k_chan_weight, *plan.k_chan_weight.stride(), plan.v_chan_weight, *plan.v_chan_weight.stride(),
        *factor_args,
        arena, arena.view(torch.int32), desc, desc.stride(0), b, *b.stride(),
        seg_ids, offsets, offsets.stride(0), offsets.stride(1), layer_offs,
        SEG_SIZE=s, HEAD_DIM=d, BLOCK_M=block_m, R_PAD=r_pad, HAS_FACTORS=has_factors, LAYER_ALIGN=layer_align,
        num_warps=4,
    )  # fmt: skip


def _check_like_first(ts: Sequence[torch.Tensor], name: str) -> None:
    """Every tensor of ``ts`` has the strides, trailing shape (all but dim 0), dtype and device of ``ts[0]``: the
    kernel reads each layer's with layer 0's strides."""
    ref = ts[0]
    tail, stride, dtype, dev = ref.shape[1:], ref.stride(), ref.dtype, ref.device
    for j in range(1, len(ts)):
        t = ts[j]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{j}]: expected torch.Tensor, got {type(t).__name__}")
        if t.shape[1:] != tail or t.stride() != stride or t.dtype != dtype or t.device != dev:
            raise ValueError(
                f"{name}[{j}]: expected the strides, shape past dim 0, dtype and device of {name}[0] ({stride}, "
                f"{list(tail)}, {dtype}, {dev}), got {t.stride()}, {list(t.shape[1:])}, {t.dtype}, {t.device}"
            )


@functools.lru_cache(maxsize=64)
def _layer_table(
    ptrs: Tuple[Tuple[int, ...], ...], elem: int, device: torch.device
) -> Tuple[torch.Tensor, int, Optional["torch.cuda.Event"]]:
    """The kernel's layer table for the data pointers ``ptrs`` (per list: k_srcs, v_srcs, arenas, descs, bounds;
    ``elem``: bytes of the arena dtype): ``[L, LAYER_COLS]`` int64 element offsets from layer 0 on ``device``, the
    largest power of two up to :data:`LAYER_ALIGN_MAX` that divides them all, and on CUDA an event recorded after
    the table's copy (a later launch on another stream waits for it)."""
    k, v, arena, desc, bounds = ptrs
    cols = [None] * _tpack.LAYER_COLS.value
    for col, name, addrs, size, unit in (
        (_tpack.LAYER_K_SRC, "k_srcs", k, elem, elem), (_tpack.LAYER_V_SRC, "v_srcs", v, elem, elem),
        (_tpack.LAYER_ARENA, "arenas", arena, elem, 4),  # the kernel also indexes the arena as int32
        (_tpack.LAYER_DESC, "descs", desc, 4, 4), (_tpack.LAYER_BOUNDS, "bounds", bounds, elem, elem),
    ):  # fmt: skip
        diffs = [a - addrs[0] for a in addrs]
        bad = [j for j, x in enumerate(diffs) if x % unit]
        if bad:
            raise ValueError(f"{name}: expected layers whose addresses are a multiple of {unit} bytes apart, got "
                             f"{name}[{bad[0]}] {diffs[bad[0]]} bytes from {name}[0]")  # fmt: skip
        cols[col.value] = [x // size for x in diffs]
    table = torch.tensor(list(zip(*cols)), dtype=torch.int64)
    common = functools.reduce(lambda a, x: a | abs(x), (x for c in cols for x in c), LAYER_ALIGN_MAX)
    align = common & -common
    if device.type != "cuda":
        return table.to(device), align, None
    table = table.pin_memory().to(device, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(device))
    return table, align, ready


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
