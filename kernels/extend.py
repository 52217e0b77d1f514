# SPDX-License-Identifier: Apache-2.0
"""Extend (prefill) attention over a compressed prefix: decompress to a dense scratch, then flash attention.

New tokens of each request attend to (a) all of the request's packed prefix segments (no skipping: selection is a
decode-time read saving), (b) the dense prefix tail still in the SGLang pool, and (c) the new tokens themselves,
causally.

Why decompress-to-scratch rather than decoding packed rows inside the attention loop (as the decode kernel does):
extend is compute-bound - every key row is used by a whole ``BLOCK_M`` tile of queries, for each of the ``G``
query heads of its KV head and for each of the ``cdiv(T, BLOCK_M)`` query blocks - so rebuilding chan/low-rank rows
in the inner loop would repeat the reconstruction ``G * cdiv(T, BLOCK_M)`` times and stall the tensor-core
pipeline on gathers and scans. Decoding each segment once (:func:`~mosaickv_sglang.kernels.unpack.unpack_segments_fwd`,
memory-bound, ``O(prefix)``) keeps the attention loop a plain dense tensor-core loop. The cost is the scratch
(``2 * B * H_kv * MAX_SEGS * S * d`` elements, caller-owned, reusable across layers) and one extra write+read of
the prefix. This trade-off is argued, not yet measured: the GPU measurement (decompress+dense vs fused) is still
to come.

Triton code: ``mosaickv_sglang.kernels._triton.unpack`` and ``..._triton.extend``; oracle:
:func:`mosaickv_sglang.kernels.reference.ref_extend`. Fixed heuristics: ``BLOCK_M = 64``, ``BLOCK_N = min(S, 64)``,
``num_warps = 4``, ``num_stages = 2``.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _checks
from ._triton.extend import _extend_attn_main_kernel
from .format import KERNEL_HEAD_DIMS
from .unpack import unpack_segments_fwd

logger = logging.getLogger(__name__)

__all__ = ["extend_fwd"]

_BLOCK_M = 64
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def extend_fwd(
    q_extend: torch.Tensor,
    k_extend: torch.Tensor,
    v_extend: torch.Tensor,
    out: torch.Tensor,
    qo_indptr: torch.Tensor,
    max_extend_len: int,
    arena: torch.Tensor,
    desc: torch.Tensor,
    seg_ids: torch.Tensor,
    k_tail_buf: torch.Tensor,
    v_tail_buf: torch.Tensor,
    tail_indptr: torch.Tensor,
    tail_indices: torch.Tensor,
    k_scratch: torch.Tensor,
    v_scratch: torch.Tensor,
    sm_scale: Optional[float] = None,
    causal: bool = True,
) -> torch.Tensor:
    """Attention of new tokens over (compressed prefix segments) + (dense prefix tail) + (new tokens).

    Parameters
    ----------
    q_extend : torch.Tensor
        shape ``[T, H_q, d]``, dtype ``torch.float16``, ``torch.bfloat16`` or ``torch.float32``; queries of the new
        tokens of all requests, ragged by ``qo_indptr``.
    k_extend, v_extend : torch.Tensor
        shape ``[T, H_kv, d]``, dtype ``torch.float16``, ``torch.bfloat16`` or ``torch.float32``; keys/values of the
        new tokens (RoPE applied).
    out : torch.Tensor
        shape ``[T, H_q, d]``, dtype ``torch.float16``, ``torch.bfloat16`` or ``torch.float32``; written.
    qo_indptr : torch.Tensor
        shape ``[B + 1]``, dtype ``torch.int32`` or ``torch.int64``; new tokens of request ``b`` are
        ``qo_indptr[b]:qo_indptr[b + 1]``.
    max_extend_len : int
        An upper bound of ``qo_indptr[b + 1] - qo_indptr[b]`` (sets the grid; no device read).
    arena : torch.Tensor
        shape ``[arena_elems]``, dtype ``torch.float16`` or ``torch.bfloat16``; packed payloads.
    desc : torch.Tensor
        shape ``[num_segments, 8]``, dtype ``torch.int32``; descriptor table.
    seg_ids : torch.Tensor
        shape ``[B, H_kv, MAX_SEGS]``, dtype ``torch.int32``, contiguous; the request's prefix segments per KV head,
        ``-1`` padded. All listed segments are attended.
    k_tail_buf, v_tail_buf : torch.Tensor
        shape ``[pool_size, H_kv, d]``, dtype ``torch.float16``, ``torch.bfloat16`` or ``torch.float32``; the layer's
        SGLang pool buffers holding the dense prefix tail.
    tail_indptr : torch.Tensor
        shape ``[B + 1]``, dtype ``torch.int32`` or ``torch.int64``.
    tail_indices : torch.Tensor
        shape ``[num_tail_tokens]``, dtype ``torch.int32`` or ``torch.int64``; pool slots of the dense prefix tail.
    k_scratch, v_scratch : torch.Tensor
        shape ``[B, H_kv, MAX_SEGS, S, d]``, dtype ``torch.float16``, ``torch.bfloat16`` or ``torch.float32``,
        contiguous; overwritten with the decoded prefix (``S`` = segment size).
    sm_scale : float, optional
        Softmax scale, default ``1 / sqrt(d)``.
    causal : bool
        Causal mask among the new tokens (prefix keys are always visible).

    Returns
    -------
    torch.Tensor
        ``out``.
    """
    _checks.check_tensor(q_extend, "q_extend", ndim=3, dtype=_FLOAT_DTYPES)
    dev = q_extend.device
    t, h_q, d = q_extend.shape
    _checks.check_head_dim(d, "q_extend", KERNEL_HEAD_DIMS)
    _checks.check_tensor(k_extend, "k_extend", shape=(t, None, d), dtype=_FLOAT_DTYPES, device=dev)
    h_kv = k_extend.shape[1]
    if h_kv == 0 or h_q % h_kv != 0:
        raise ValueError(f"k_extend: expected H_kv (dim 1) dividing H_q={h_q}, got {h_kv}")
    _checks.check_tensor(v_extend, "v_extend", shape=(t, h_kv, d), dtype=_FLOAT_DTYPES, device=dev)
    _checks.check_tensor(out, "out", shape=(t, h_q, d), dtype=_FLOAT_DTYPES, device=dev)
    _checks.check_tensor(qo_indptr, "qo_indptr", ndim=1, dtype=(torch.int32, torch.int64), device=dev)
    bsz = qo_indptr.shape[0] - 1
    if bsz < 0:
        raise ValueError("qo_indptr: expected shape [B + 1], got an empty tensor")
    _checks.check_int(max_extend_len, "max_extend_len", lo=0)
    _checks.check_arena(arena)
    _checks.check_tensor(arena, "arena", device=dev)
    _checks.check_desc(desc, device=dev)
    _checks.check_tensor(seg_ids, "seg_ids", shape=(bsz, h_kv, None), dtype=torch.int32, device=dev, contiguous=True)
    max_segs = seg_ids.shape[2]
    _checks.check_kv_buffer(k_tail_buf, "k_tail_buf", h_kv, d, dev)
    _checks.check_kv_buffer(v_tail_buf, "v_tail_buf", h_kv, d, dev)
    _checks.check_indptr(tail_indptr, "tail_indptr", bsz, dev)
    _checks.check_tensor(tail_indices, "tail_indices", ndim=1, dtype=(torch.int32, torch.int64), device=dev)
    _checks.check_tensor(k_scratch, "k_scratch", shape=(bsz, h_kv, max_segs, None, d), dtype=_FLOAT_DTYPES,
                         device=dev, contiguous=True)  # fmt: skip
    seg_size = k_scratch.shape[3]
    _checks.check_tensor(v_scratch, "v_scratch", shape=tuple(k_scratch.shape), dtype=_FLOAT_DTYPES, device=dev,
                         contiguous=True)  # fmt: skip
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"sm_scale: expected a positive finite float, got {sm_scale}")
    if _checks.debug_checks_enabled():
        _checks.debug_check_indptr(qo_indptr, "qo_indptr", t)
        lens = (qo_indptr[1:] - qo_indptr[:-1]).cpu()
        if lens.numel() and int(lens.max()) > max_extend_len:
            raise ValueError(
                f"max_extend_len: expected >= every extend length, got {max_extend_len} < {int(lens.max())}"
            )
        _checks.debug_check_indptr(tail_indptr, "tail_indptr", tail_indices.numel())
        _checks.debug_check_index_range(tail_indices, "tail_indices", 0, k_tail_buf.shape[0])
    if bsz == 0 or t == 0 or max_extend_len == 0:
        return out

    if max_segs > 0:
        unpack_segments_fwd(arena, desc, seg_ids, k_scratch, v_scratch)

    compute = tl.float32 if q_extend.dtype == torch.float32 else _TL_DTYPES[q_extend.dtype]
    precision = "ieee" if q_extend.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(max_extend_len, _BLOCK_M), bsz, h_q)
    _extend_attn_main_kernel[grid](
        q_extend, *q_extend.stride(), k_extend, *k_extend.stride(), v_extend, *v_extend.stride(),
        out, *out.stride(), qo_indptr, desc, desc.stride(0), seg_ids, *seg_ids.stride(), max_segs,
        k_scratch, *k_scratch.stride(), v_scratch, *v_scratch.stride(),
        k_tail_buf, *k_tail_buf.stride(), v_tail_buf, *v_tail_buf.stride(), tail_indptr, tail_indices,
        scale * 1.4426950408889634,
        GROUP=h_q // h_kv, HEAD_DIM=d, BLOCK_M=_BLOCK_M, BLOCK_N=min(seg_size, 64), COMPUTE_DTYPE=compute,
        DOT_PRECISION=precision, CAUSAL=bool(causal), num_warps=4, num_stages=2,
    )  # fmt: skip
    return out
