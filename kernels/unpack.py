# SPDX-License-Identifier: Apache-2.0
"""Launcher of the unpack kernel: decompress packed segments into dense per-segment slots.

Used by :func:`mosaickv_sglang.kernels.extend.extend_fwd` to build its dense prefix scratch, and usable on its own
(e.g. to re-plan a segment from its decoded rows). Triton code: ``mosaickv_sglang.kernels._triton.unpack``; oracle:
:func:`mosaickv_sglang.kernels.reference.ref_unpack_segments`.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from . import _checks
from ._triton.unpack import _unpack_segments_main_kernel
from .format import KERNEL_HEAD_DIMS, MAX_SEG_SIZE, MIN_SEG_SIZE
from .sparse_decode import CHAN_PTR_GATHER, resolve_chan_mode

logger = logging.getLogger(__name__)

__all__ = ["unpack_segments_fwd"]

_R_BLOCK = 16
_CHAN_MODE = CHAN_PTR_GATHER  # how chan rows are rebuilt (see sparse_decode.CHAN_MODE_NAMES)


def unpack_segments_fwd(
    arena: torch.Tensor,
    desc: torch.Tensor,
    seg_ids: torch.Tensor,
    k_out: torch.Tensor,
    v_out: torch.Tensor,
    *,
    chan_mode: Optional[int] = None,
) -> None:
    """Decode segments ``seg_ids`` into dense slots.

    Parameters
    ----------
    arena : torch.Tensor
        shape ``[arena_elems]``, dtype ``torch.float16`` or ``torch.bfloat16``; packed payloads.
    desc : torch.Tensor
        shape ``[num_segments, 8]``, dtype ``torch.int32``; descriptor table.
    seg_ids : torch.Tensor
        shape ``[*L]`` (any shape), dtype ``torch.int32``, contiguous; segment of each slot, ``-1`` = leave the slot
        untouched.
    k_out, v_out : torch.Tensor
        shape ``[*L, S, d]``, dtype ``torch.float16``, ``torch.bfloat16`` or ``torch.float32``, contiguous; rows
        ``[:m]`` of slot ``i`` receive the segment's decoded K / V rows, rows ``[m:]`` zeros. ``S`` (a power of two
        in 16..256) must be at least every decoded segment's ``m``.
    chan_mode : int, optional
        How chan rows are rebuilt (one of :data:`~mosaickv_sglang.kernels.sparse_decode.CHAN_MODE_NAMES`; same
        rows); ``None``: pointer gather.
    """
    _checks.check_arena(arena)
    dev = arena.device
    _checks.check_desc(desc, device=dev)
    _checks.check_tensor(seg_ids, "seg_ids", dtype=torch.int32, device=dev, contiguous=True)
    lead = tuple(seg_ids.shape)
    out_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    _checks.check_tensor(k_out, "k_out", shape=(*lead, None, None), dtype=out_dtypes, device=dev, contiguous=True)
    s, d = k_out.shape[-2], k_out.shape[-1]
    _checks.check_head_dim(d, "k_out", KERNEL_HEAD_DIMS)
    if s < MIN_SEG_SIZE or s > MAX_SEG_SIZE or s & (s - 1):
        raise ValueError(f"k_out: expected S (dim -2) a power of two in [{MIN_SEG_SIZE}, {MAX_SEG_SIZE}], got {s}")
    _checks.check_tensor(v_out, "v_out", shape=tuple(k_out.shape), dtype=out_dtypes, device=dev, contiguous=True)
    chan = resolve_chan_mode(chan_mode, _CHAN_MODE)
    n = seg_ids.numel()
    if n == 0:
        return
    if _checks.debug_checks_enabled():
        _checks.debug_check_index_range(seg_ids, "seg_ids", 0, desc.shape[0], allow_minus_one=True)
        ids = seg_ids.reshape(-1)
        rows = desc[ids[ids >= 0].long(), 0]
        if rows.numel() and int(rows.max()) > s:
            raise ValueError(f"k_out: expected S >= every segment's row count, got S={s} < m={int(rows.max())}")
    ko = k_out.view(n, s, d)
    vo = v_out.view(n, s, d)
    block_m = min(s, 64)
    _unpack_segments_main_kernel[(n, s // block_m)](
        arena, arena.view(torch.int32), desc, desc.stride(0), seg_ids.view(-1),
        ko, *ko.stride(), vo, *vo.stride(),
        HEAD_DIM=d, BLOCK_M=block_m, R_BLOCK=_R_BLOCK, CHAN_MODE=chan, num_warps=4,
    )  # fmt: skip
