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
from dataclasses import dataclass
from typing import Optional

import torch

from mosaickv_sglang.kernels.format import DESC_WIDTH, GRANULE_BYTES
from mosaickv_sglang.pool.checks import check_int

logger = logging.getLogger(__name__)

__all__ = [
    "dense_bytes_per_token",
    "metadata_bytes_per_token",
    "capacity_tokens",
    "arena_granules_for",
    "hot_tokens_for",
    "max_requests_for_hot",
    "layout_for_budget",
    "cap_layout",
    "PoolLayout",
]


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
    return 2 * check_int(num_layers, "num_layers", 1) * check_int(num_kv_heads, "num_kv_heads", 1) * check_int(
        head_dim, "head_dim", 1
    ) * _elem_bytes(dtype)


def metadata_bytes_per_token(
    num_layers: int, num_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype = torch.float16
) -> float:
    """``M = L * H * (32 + 2 * d * e) / S``: descriptor and bounds bytes per logical token (static tables)."""
    per_seg = DESC_WIDTH * 4 + 2 * check_int(head_dim, "head_dim", 1) * _elem_bytes(dtype)
    return check_int(num_layers, "num_layers", 1) * check_int(num_kv_heads, "num_kv_heads", 1) * per_seg / check_int(
        page_size, "page_size", 1
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
    check_int(budget_bytes, "budget_bytes", 0)
    check_int(dense_tokens, "dense_tokens", 0)
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
    check_int(tokens, "tokens", 0)
    per_layer = tokens * dense_bytes_per_token(1, num_kv_heads, head_dim, dtype)
    return int(math.ceil(per_layer / _ratio(ratio) / GRANULE_BYTES))


def hot_tokens_for(
    max_running_requests: int, hot_window: int, page_size: int, chunk_tokens: int, limit_tokens: int
) -> int:
    """Dense hot-pool slots for ``max_running_requests`` requests and one prefill chunk, at most ``limit_tokens``.

    Each request keeps its hot window plus its partial page and one new page dense (``hot_window + 2 * S``,
    pages rounded up); one forward writes at most ``chunk_tokens`` new tokens. Under pressure the hot window gives
    way (the sealer seals least recently written pages first), so the hard floor is one chunk plus two pages per
    request of a minimal batch: ``chunk_tokens + 4 * S``.

    Returns
    -------
    int
        A multiple of ``page_size``.

    Raises
    ------
    ValueError
        ``limit_tokens`` is below the floor (the message says what to change).
    """
    s = check_int(page_size, "page_size", 1)
    check_int(max_running_requests, "max_running_requests", 1)
    check_int(hot_window, "hot_window", 0)
    check_int(chunk_tokens, "chunk_tokens", 1)
    check_int(limit_tokens, "limit_tokens", 0)
    per_req = -(-hot_window // s) * s + 2 * s
    chunk = -(-chunk_tokens // s) * s
    want = max_running_requests * per_req + chunk
    floor = chunk + 4 * s
    limit = limit_tokens - limit_tokens % s
    if limit < floor:
        raise ValueError(
            f"hot pool: expected room for one prefill chunk ({chunk} tokens) plus 4 pages dense, got {limit} tokens; "
            "lower --chunked-prefill-size or raise --mem-fraction-static"
        )
    return max(floor, min(want, limit))


def max_requests_for_hot(hot_tokens: int, page_size: int, chunk_tokens: int) -> int:
    """Running requests a hot pool of ``hot_tokens`` can always serve: each needs its partial page and one new page
    dense while one prefill chunk is in flight (``(hot_tokens - chunk) // (2 * S)``, at least 1)."""
    s = check_int(page_size, "page_size", 1)
    chunk = -(-check_int(chunk_tokens, "chunk_tokens", 1) // s) * s
    return max(1, (check_int(hot_tokens, "hot_tokens", 1) - chunk) // (2 * s))


# The arenas get this much more room than the target ratio needs: granule rounding of each payload and the dense
# sink pages are charged to them, and an arena that fills first leaves pages dense in the hot pool.
ARENA_SLACK = 1.05
# Share of the KV budget the dense hot pool may take.
HOT_POOL_MAX_SHARE = 0.25
# Requests whose hot windows are planned for when --max-running-requests is not given.
DEFAULT_HOT_REQUESTS = 64


def _arena_ratio(ratio: float) -> float:
    """The ratio the arenas are sized at: the target less :data:`ARENA_SLACK` (at least 1)."""
    return _ratio(ratio) / ARENA_SLACK if ratio > ARENA_SLACK else 1.0


@dataclass(frozen=True)
class PoolLayout:
    """How one KV budget splits between the dense hot pool and the compressed arenas.

    Attributes
    ----------
    logical_tokens : int
        ``max_total_num_tokens``: token slots SGLang's allocator hands out (a multiple of the page size): the
        tokens the arenas hold at the target ratio plus the hot pool's.
    hot_tokens : int
        Dense hot-pool slots (without the padding page).
    arena_granules_per_layer : int
        Granules of each layer's arena.
    chunk_tokens : int
        Largest number of tokens one forward writes (the prefill chunk).
    max_running_requests : int
        Requests the hot pool can always serve (:func:`max_requests_for_hot`).
    """

    logical_tokens: int
    hot_tokens: int
    arena_granules_per_layer: int
    chunk_tokens: int
    max_running_requests: int


def layout_for_budget(
    budget_bytes: int,
    ratio: float,
    *,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    hot_window: int,
    chunk_tokens: int,
    max_running_requests: Optional[int] = None,
    dtype: torch.dtype = torch.float16,
) -> PoolLayout:
    """Split ``budget_bytes`` into a hot pool sized for ``max_running_requests`` (default
    :data:`DEFAULT_HOT_REQUESTS`) hot windows plus one chunk, capped at :data:`HOT_POOL_MAX_SHARE` of the budget, and
    arenas that hold the rest of the budget at ``ratio / ARENA_SLACK``. The logical tokens are the arenas' tokens plus
    the hot pool's: all of them fit when the hot pool is full; when it is not, the arenas fill first and
    :meth:`~mosaickv_sglang.kv_pool.MosaicMHATokenToKVPool.admissible_tokens` holds the scheduler back.

    Raises
    ------
    ValueError
        The budget cannot hold the hot pool's floor (see :func:`hot_tokens_for`).
    """
    check_int(budget_bytes, "budget_bytes", 0)
    d_tok = dense_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype)
    reqs = DEFAULT_HOT_REQUESTS if max_running_requests is None else max_running_requests
    hot = hot_tokens_for(reqs, hot_window, page_size, chunk_tokens, int(budget_bytes * HOT_POOL_MAX_SHARE) // d_tok)
    eff = _arena_ratio(ratio)
    # the hot pool's slots are logical tokens too: their descriptor and bounds rows come out of the budget
    hot_meta = math.ceil(hot * metadata_bytes_per_token(num_layers, num_kv_heads, head_dim, page_size, dtype))
    sealed = capacity_tokens(
        max(0, budget_bytes - hot_meta), eff, num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
        page_size=page_size, dense_tokens=hot + page_size, dtype=dtype,
    )  # fmt: skip
    granules = arena_granules_for(sealed, eff, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype)
    logical = sealed + hot if sealed else 0
    return PoolLayout(logical, hot, granules, chunk_tokens, max_requests_for_hot(hot, page_size, chunk_tokens))


def cap_layout(
    layout: PoolLayout,
    max_tokens: int,
    ratio: float,
    *,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype = torch.float16,
) -> PoolLayout:
    """``layout`` with at most ``max_tokens`` logical tokens (rounded down to a page) and arenas sized, at ``ratio``
    as :func:`layout_for_budget` sizes them, for the tokens beyond the hot pool (at least one page), so that a token
    cap (``--max-total-tokens``) also caps the memory the arenas take and a full hot pool plus full arenas is exactly
    the cap. The hot pool, and so the running-request limit, stays as planned for the budget."""
    s = check_int(page_size, "page_size", 1)
    logical = min(layout.logical_tokens, check_int(max_tokens, "max_tokens", 0) // s * s)
    eff = _arena_ratio(ratio)
    sealed = max(logical - layout.hot_tokens, s)
    granules = arena_granules_for(sealed, eff, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype)
    return PoolLayout(logical, layout.hot_tokens, min(granules, layout.arena_granules_per_layer), layout.chunk_tokens,
                      layout.max_running_requests)  # fmt: skip
