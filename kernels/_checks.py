# SPDX-License-Identifier: Apache-2.0
"""Argument checks shared by the kernel launchers.

Messages follow ``"<arg>: expected <x>, got <y>"`` and format shapes, dtypes and devices, never tensor values.
Non-tensors raise :class:`TypeError`; wrong shapes, dtypes, devices or values raise :class:`ValueError`.

Launchers check O(1) metadata only. Checks that read tensor contents (index bounds, overlaps, monotone indptr) run
only under :func:`debug_checks_enabled`, i.e. when the environment variable ``MOSAICKV_DEBUG_CHECKS=1`` is set. This
module is the only place in ``kernels/`` that reads the environment: ``kernels/`` cannot import the project config
(layering rule R1).
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, Optional, Sequence, Tuple, Union

import torch

logger = logging.getLogger(__name__)

DEBUG_ENV = "MOSAICKV_DEBUG_CHECKS"

DTypes = Union[torch.dtype, Tuple[torch.dtype, ...]]


def debug_checks_enabled() -> bool:
    """True when ``MOSAICKV_DEBUG_CHECKS=1``: launchers then also validate tensor contents (slow, syncs)."""
    return os.environ.get(DEBUG_ENV, "0") == "1"


def _fmt_shape(shape: Sequence[Optional[int]]) -> str:
    return "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"


def _fmt_dtypes(dtype: DTypes) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype)
    return " or ".join(str(d) for d in dtype)


def check_tensor(
    x: object,
    name: str,
    *,
    shape: Optional[Sequence[Optional[int]]] = None,
    ndim: Optional[int] = None,
    dtype: Optional[DTypes] = None,
    device: Optional[torch.device] = None,
    contiguous: bool = False,
) -> torch.Tensor:
    """Check a tensor argument's metadata and return it.

    Parameters
    ----------
    x : object
        The argument.
    name : str
        Argument name used in messages.
    shape : sequence of int or None, optional
        Expected shape; ``None`` entries match any size.
    ndim : int, optional
        Expected number of dimensions (implied by ``shape``).
    dtype : torch.dtype or tuple of torch.dtype, optional
        Allowed dtypes.
    device : torch.device, optional
        Expected device (compared by type and index).
    contiguous : bool
        Require ``x.is_contiguous()``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected torch.Tensor, got {type(x).__name__}")
    if shape is not None:
        ok = x.dim() == len(shape) and all(e is None or e == g for e, g in zip(shape, x.shape))
        if not ok:
            raise ValueError(f"{name}: expected shape {_fmt_shape(shape)}, got {list(x.shape)}")
    elif ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {list(x.shape)}")
    if dtype is not None:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if x.dtype not in allowed:
            raise ValueError(f"{name}: expected dtype {_fmt_dtypes(dtype)}, got {x.dtype}")
    if device is not None and not same_device(x.device, device):
        raise ValueError(f"{name}: expected device {device}, got {x.device}")
    if contiguous and not x.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {tuple(x.stride())}")
    return x


def same_device(a: torch.device, b: torch.device) -> bool:
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cuda":
        ia = a.index if a.index is not None else torch.cuda.current_device()
        ib = b.index if b.index is not None else torch.cuda.current_device()
        return ia == ib
    return True


def check_int(x: object, name: str, *, lo: Optional[int] = None, hi: Optional[int] = None) -> int:
    """Check a Python integer argument (``bool`` refused) within ``[lo, hi]`` and return it."""
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name}: expected int, got {type(x).__name__}")
    if lo is not None and x < lo:
        raise ValueError(f"{name}: expected >= {lo}, got {x}")
    if hi is not None and x > hi:
        raise ValueError(f"{name}: expected <= {hi}, got {x}")
    return x


def check_head_dim(d: int, name: str, supported: Iterable[int]) -> None:
    sup = tuple(supported)
    if d not in sup:
        raise ValueError(f"{name}: expected head_dim in {sup}, got {d}")


def check_arena(arena: object, name: str = "arena") -> torch.Tensor:
    """The packed arena: a contiguous 1-D fp16/bf16 tensor whose length is a multiple of 64 elements."""
    from .format import ARENA_DTYPES, GRANULE_ELEMS

    arena = check_tensor(arena, name, ndim=1, dtype=ARENA_DTYPES, contiguous=True)
    if arena.numel() % GRANULE_ELEMS != 0:
        raise ValueError(
            f"{name}: expected a length that is a multiple of {GRANULE_ELEMS} elements, got {arena.numel()}"
        )
    if arena.storage_offset() % 2 != 0:
        raise ValueError(f"{name}: expected an even storage offset (int32 view), got {arena.storage_offset()}")
    return arena


def check_desc(desc: object, name: str = "desc", device: Optional[torch.device] = None) -> torch.Tensor:
    """The descriptor table: int32 ``[num_segments, DESC_WIDTH]`` with unit stride on the last dim."""
    from .format import DESC_WIDTH

    desc = check_tensor(desc, name, shape=(None, DESC_WIDTH), dtype=torch.int32, device=device)
    if desc.stride(1) != 1:
        raise ValueError(f"{name}: expected unit stride on dim 1, got strides {tuple(desc.stride())}")
    return desc


def check_kv_buffer(buf: object, name: str, num_kv_heads: Optional[int], head_dim: int, device: torch.device) -> None:
    """An SGLang-style per-layer KV pool buffer ``[pool_size, H_kv, d]``."""
    buf = check_tensor(buf, name, shape=(None, num_kv_heads, head_dim), device=device)
    if buf.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name}: expected dtype torch.float16 or torch.bfloat16 or torch.float32, got {buf.dtype}")


def check_indptr(indptr: object, name: str, batch: int, device: torch.device) -> None:
    check_tensor(indptr, name, shape=(batch + 1,), dtype=(torch.int32, torch.int64), device=device)


def debug_check_indptr(indptr: torch.Tensor, name: str, num_indices: int) -> None:
    """Deep check (debug only): ``indptr`` starts >= 0, is non-decreasing and ends within ``num_indices``."""
    ip = indptr.detach().to("cpu", torch.int64)
    if ip.numel() and (int(ip[0]) < 0 or bool((ip[1:] < ip[:-1]).any()) or int(ip[-1]) > num_indices):
        raise ValueError(f"{name}: expected a non-decreasing indptr within [0, {num_indices}], got {ip.tolist()[:16]}")


def debug_check_index_range(idx: torch.Tensor, name: str, lo: int, hi: int, allow_minus_one: bool = False) -> None:
    """Deep check (debug only): every entry in ``[lo, hi)`` (or ``-1`` when allowed)."""
    v = idx.detach().to("cpu", torch.int64).reshape(-1)
    if allow_minus_one:
        v = v[v != -1]
    if v.numel() and (int(v.min()) < lo or int(v.max()) >= hi):
        raise ValueError(f"{name}: expected entries in [{lo}, {hi}), got range [{int(v.min())}, {int(v.max())}]")
