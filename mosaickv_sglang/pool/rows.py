# SPDX-License-Identifier: Apache-2.0
"""A batch's logical slots as one matrix: the rows of ``req_to_token`` (``[B, W]``) and each request's length.

The per-request forms (one tensor of slots per request) cost a handful of NumPy calls per request and step; these
functions do the same work with a few calls per batch. Row ``b`` holds request ``b``'s slots in its first
``lens[b]`` columns; the columns after are ignored.

With ``step = page_size`` a row holds only the first slot of each page (``req_to_token[b, ::page_size]``): column
``j`` is token ``j * step``. The slots within a page are then taken to follow its first one, as SGLang's paged
allocator lays them out; only the page starts are checked. A decode step reads ``page_size`` times fewer slots.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

__all__ = ["as_rows", "in_range", "page_starts", "pages_aligned", "ragged", "sealable_counts", "whole_rows"]


def ragged(counts: np.ndarray, width: int) -> np.ndarray:
    """shape ``[B, width]`` bool: ``True`` in the first ``counts[b]`` columns of row ``b``."""
    return np.arange(width)[None, :] < counts[:, None]


def page_starts(
    rows: np.ndarray, num_pages: np.ndarray, page_size: int, step: int = 1
) -> Tuple[np.ndarray, np.ndarray]:
    """Pages of each request as the reference reads them (``slots[::S] // S``); ``step``: slots per column (1 or
    ``S``, see the module docstring).

    Returns
    -------
    tuple of numpy.ndarray
        ``(pages, valid)``: shape ``[B, P]`` (``P = max(num_pages)``), int64 pages and the mask of the first
        ``num_pages[b]`` of row ``b``. ``rows`` must have at least ``((P - 1) * S) / step + 1`` columns.
    """
    width = int(num_pages.max()) if num_pages.size else 0
    per = page_size // step
    pages = rows[:, : width * per : per].astype(np.int64) // page_size
    return pages, ragged(num_pages, width)


def pages_aligned(rows: np.ndarray, lens: np.ndarray, pages: np.ndarray, page_size: int, step: int = 1) -> bool:
    """Whether slot ``j < lens[b]`` of every row is ``pages[b, j // S] * S + j % S`` (page-aligned, as SGLang's paged
    allocator lays slots out), for the tokens the columns hold (every ``step``-th). ``rows`` has
    ``pages.shape[1] * S / step`` columns or more."""
    b, width = pages.shape
    s = page_size
    if b == 0 or width == 0:
        return True
    per = s // step
    expect = (pages.astype(rows.dtype, copy=False) * s)[:, :, None] + np.arange(0, s, step, dtype=rows.dtype)
    eq = rows[:, : width * per] == expect.reshape(b, width * per)
    first = eq.argmin(1)  # the first mismatch of each row, or 0 when there is none
    return not (~eq[np.arange(b), first] & (first * step < lens)).any()


def whole_rows(rows: np.ndarray, page_size: int, step: int) -> np.ndarray:
    """``rows`` with a column per token: as they are for ``step = 1``; for page-start rows (``step = page_size``),
    shape ``[B, P * S]`` with slot ``start + j % S`` at column ``j``, as the paged allocator would have laid them out.
    For error paths, which read whole rows."""
    if step == 1:
        return rows
    b, width = rows.shape
    return (rows[:, :, None] + np.arange(page_size, dtype=rows.dtype)).reshape(b, width * page_size)


def sealable_counts(
    lens: np.ndarray, page_size: int, hot_window: int, sink_tokens: int
) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`~mosaickv_sglang.pool.pages.sealable_pages` of every row at once: ``(n_seal, n_sink)``, int64 ``[B]``;
    the first ``n_seal[b]`` pages of row ``b`` may be sealed, the first ``n_sink[b]`` of them as sinks."""
    n_full = lens // page_size
    n_sink = np.minimum(-(-sink_tokens // page_size), n_full)
    n_cold = np.maximum(0, (lens - hot_window) // page_size)
    return np.maximum(n_sink, np.minimum(n_cold, n_full)), n_sink


def in_range(values: np.ndarray, hi: int, lo: int = 0) -> bool:
    return values.size == 0 or (int(values.min()) >= lo and int(values.max()) < hi)


def as_rows(rows: object, lens: object, name: str = "rows", step: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """``(rows, lens)`` as a 2-D integer array and int64 lengths in ``[0, W * step]``; raises ``ValueError``
    otherwise."""
    r = np.asarray(rows)
    n = np.asarray(lens)
    if r.ndim != 2 or not np.issubdtype(r.dtype, np.integer):
        raise ValueError(f"{name}: expected a 2-D integer array, got dtype {r.dtype} shape {list(r.shape)}")
    if n.ndim != 1 or n.shape[0] != r.shape[0] or not np.issubdtype(n.dtype, np.integer):
        raise ValueError(f"lens: expected {r.shape[0]} integer lengths, got dtype {n.dtype} shape {list(n.shape)}")
    n = n.astype(np.int64, copy=False)
    if not in_range(n, r.shape[1] * step + 1):
        raise ValueError(
            f"lens: expected lengths in [0, {r.shape[1] * step}], got [{int(n.min())}, {int(n.max())}]"
        )
    return r, n

