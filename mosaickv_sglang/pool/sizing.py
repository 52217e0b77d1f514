# SPDX-License-Identifier: Apache-2.0
"""Sizing helpers of the compressed pool: bytes per token, tokens per byte budget, arena granules.

All sizes are per KV-pool (all layers), in bytes, for 16-bit K/V elements unless ``dtype`` says otherwise.

Capacity formula
----------------
Let ``e`` be the element size (2 bytes), ``L`` layers, ``H`` KV heads, head dim ``d``, segment (page) size ``S`` and
target ratio ``r`` (dense payload bytes / arena payload bytes, as the planner's ``ratio``). Then

* a dense token costs ``D = 2 * L * H * d * e`` bytes (K and V), in the dense hot buffers;
* a sealed token costs ``D / r`` bytes of arena;
* every *logical* page owns a static descriptor row (32 bytes) and bounds (``2 * d * e`` bytes) per layer and head,
  i.e. ``M = L * H * (32 + 2 * d * e) / S`` bytes per logical token, sealed or not.

With ``dense_tokens`` slots of dense hot buffer (hot windows, sinks not yet sealed, extend chunks), a budget ``B``
holds::

    tokens = floor((B - dense_tokens * D) / (D / r + M))      rounded down to a multiple of S

logical tokens. The planner's ratio already counts granule rounding; allocator fragmentation is not modelled, so
leave a few percent of slack in ``r`` or in the arena.
"""

from __future__ import annotations

import logging
import math

import torch

from mosaickv_sglang.kernels.format import DESC_WIDTH, GRANULE_BYTES

logger = logging.getLogger(__name__)

__all__ = ["dense_bytes_per_token", "metadata_bytes_per_token", "capacity_tokens", "arena_granules_for"]


def _pos_int(x: object, name: str, lo: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < lo:
        raise ValueError(f"{name}: expected an integer >= {lo}, got {x!r}")
    return x


def _ratio(ratio: object) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 1:
        raise ValueError(f"ratio: expected a finite number >= 1, got {ratio!r}")
    return float(ratio)


def _elem_bytes(dtype: torch.dtype) -> int:
    if not isinstance(dtype, torch.dtype) or dtype.is_complex or not dtype.is_floating_point:
        raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    return torch.empty((), dtype=dtype).element_size()


def dense_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float16) -> int:
    """``D = 2 * L * H * d * e``: bytes of one uncompressed token's K and V over all layers."""
    return 2 * _pos_int(num_layers, "num_layers") * _pos_int(num_kv_heads, "num_kv_heads") * _pos_int(
        head_dim, "head_dim"
    ) * _elem_bytes(dtype)


def metadata_bytes_per_token(
    num_layers: int, num_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype = torch.float16
) -> float:
    """``M = L * H * (32 + 2 * d * e) / S``: descriptor and bounds bytes per logical token (static tables)."""
    per_seg = DESC_WIDTH * 4 + 2 * _pos_int(head_dim, "head_dim") * _elem_bytes(dtype)
    return _pos_int(num_layers, "num_layers") * _pos_int(num_kv_heads, "num_kv_heads") * per_seg / _pos_int(
        page_size, "page_size"
    )


def capacity_tokens(
    budget_bytes: int,
    ratio: float,
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dense_tokens: int = 0,
    dtype: torch.dtype = torch.float16,
) -> int:
    """Logical tokens that fit in ``budget_bytes`` (see the module docstring for the formula).

    Parameters
    ----------
    budget_bytes : int
        Bytes available for the whole KV pool (dense hot buffers, arenas, descriptor and bounds tables).
    ratio : float
        Target compression ratio ``>= 1`` of sealed segments (dense payload bytes / arena bytes).
    num_layers, num_kv_heads, head_dim, page_size : int
        Model and pool shape; ``page_size`` is the segment size ``S``.
    dense_tokens : int
        Slots of the dense hot buffers, charged at the dense cost.
    dtype : torch.dtype
        K/V element dtype (2-byte types in practice).

    Returns
    -------
    int
        Logical tokens (a multiple of ``page_size``; 0 when the dense buffers alone exceed the budget).
    """
    _pos_int(budget_bytes, "budget_bytes", lo=0)
    _pos_int(dense_tokens, "dense_tokens", lo=0)
    r = _ratio(ratio)
    d_tok = dense_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype)
    m_tok = metadata_bytes_per_token(num_layers, num_kv_heads, head_dim, page_size, dtype)
    avail = budget_bytes - dense_tokens * d_tok
    if avail <= 0:
        return 0
    tokens = int(math.floor(avail / (d_tok / r + m_tok)))
    return tokens - tokens % page_size


def arena_granules_for(
    tokens: int, ratio: float, *, num_kv_heads: int, head_dim: int, dtype: torch.dtype = torch.float16
) -> int:
    """Granules of one layer's arena holding ``tokens`` sealed tokens at ``ratio``:
    ``ceil(tokens * H * 2 * d * e / ratio / 128)``."""
    _pos_int(tokens, "tokens", lo=0)
    per_layer = tokens * dense_bytes_per_token(1, num_kv_heads, head_dim, dtype)
    return int(math.ceil(per_layer / _ratio(ratio) / GRANULE_BYTES))
