# SPDX-License-Identifier: Apache-2.0
"""Arena compaction: slide one layer's live payload runs to the front of its arena, in address order.

Payloads differ in size and pages are freed in any order, so an arena's free granules end up in many small extents:
the eighth run's soak had 17,322 free granules in one arena whose largest extent was 60, too small for one dense
segment, and sealing failed although the ledger (and so the scheduler) counted room. Compaction makes the free
space one extent again. Every run moves to a lower or equal address, so copying the packed destination range in
increasing chunks, each gathered into a temporary before it is written, never overwrites a source that a later chunk
still reads (a later chunk's sources lie at or above its destinations, beyond the chunk just written).
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch

from mosaickv_sglang.kernels.format import GRANULE_ELEMS
from mosaickv_sglang.pool.device import to_device

__all__ = ["COPY_CHUNK_GRANULES", "packed_offsets", "move_runs"]

# granules copied per gather: 32 MiB of temporary at 128-byte granules
COPY_CHUNK_GRANULES = 1 << 18


def packed_offsets(offsets: np.ndarray, sizes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Where each run goes when the runs are packed from granule 0 in address order.

    Parameters
    ----------
    offsets, sizes : numpy.ndarray
        shape ``[n]``, int64; disjoint runs (any order).

    Returns
    -------
    tuple of numpy.ndarray
        ``(order, new_offsets)``: ``order`` sorts the runs by address; ``new_offsets[i]`` (input order) is run
        ``i``'s new first granule, never above ``offsets[i]``.
    """
    order = np.argsort(offsets, kind="stable")
    sz = sizes[order]
    new_sorted = np.cumsum(sz) - sz
    if (offsets[order] < new_sorted).any() or (offsets[order][1:] < (offsets[order] + sz)[:-1]).any():
        raise ValueError("offsets: expected disjoint runs, got overlapping ones")
    new = np.empty_like(offsets)
    new[order] = new_sorted
    return order, new


def move_runs(arena: torch.Tensor, src: np.ndarray, dst: np.ndarray, sizes: np.ndarray,
              chunk_granules: int = COPY_CHUNK_GRANULES) -> None:  # fmt: skip
    """Copy granule runs ``src -> dst`` inside ``arena`` (on its device, in stream order).

    Parameters
    ----------
    arena : torch.Tensor
        shape ``[G * GRANULE_ELEMS]``; one layer's arena.
    src, dst, sizes : numpy.ndarray
        shape ``[n]``, int64; runs sorted by ``dst``, packed (``dst[i + 1] == dst[i] + sizes[i]``), and
        ``dst <= src``.
    chunk_granules : int
        Granules gathered per copy (the temporary's size).
    """
    if src.size == 0:
        return
    if (dst > src).any() or (np.diff(dst) != sizes[:-1]).any():
        raise ValueError("dst: expected packed runs at or below their sources, got another layout")
    grid = arena.view(-1, GRANULE_ELEMS)
    dev = arena.device
    ends = dst + sizes
    lo, hi = int(dst[0]), int(ends[-1])
    for a in range(lo, hi, chunk_granules):
        b = min(hi, a + chunk_granules)
        i0 = int(np.searchsorted(ends, a, side="right"))
        i1 = int(np.searchsorted(dst, b, side="left"))
        counts = np.minimum(ends[i0:i1], b) - np.maximum(dst[i0:i1], a)
        delta = to_device(torch.from_numpy(src[i0:i1] - dst[i0:i1]), dev)
        idx = torch.repeat_interleave(delta, to_device(torch.from_numpy(counts), dev), output_size=b - a)
        idx += torch.arange(a, b, dtype=torch.int64, device=dev)
        grid[a:b] = grid.index_select(0, idx)
