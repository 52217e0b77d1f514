# SPDX-License-Identifier: Apache-2.0
"""Page states and the sealing rule of the compressed pool (pure functions, no store state).

A logical page is ``S`` consecutive tokens of one request (SGLang ``page_size == S``). Its state, per layer:

* :data:`PAGE_FREE`   - not allocated by SGLang;
* :data:`PAGE_DENSE`  - allocated, tokens in the dense hot buffers (the recent window, or not yet complete);
* :data:`PAGE_SEALED` - compressed into the arena; its dense slots may be reused once it is sealed in every layer.

Sinks
-----
The first ``ceil(sink_tokens / S)`` pages of a request are attention sinks. They are **sealed as soon as they are
complete**, as lossless ``dense``-form segments (``m = S``) with ``FLAG_ALWAYS_READ``, rather than being kept in the
dense pool: this way the dense hot buffers only ever hold each request's recent window, a shared prefix's sinks are
shared in the arena like any other segment, and decode needs no second tail range per request. The caller plans them
with ``always_dense`` (:func:`sealable_pages` returns the mask; ``plan_fast(..., always_dense=...)`` then gives
them the dense form and the flag). ``select_segments`` ranks them first (score ``+inf``), so its budget must cover
the sink segments.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from mosaickv_sglang.pool.checks import check_int

logger = logging.getLogger(__name__)

__all__ = ["PAGE_FREE", "PAGE_DENSE", "PAGE_SEALED", "SealablePages", "sealable_pages"]

PAGE_FREE = 0
PAGE_DENSE = 1
PAGE_SEALED = 2


class SealablePages(NamedTuple):
    """Pages of one request that may be sealed now.

    Attributes
    ----------
    pages : torch.Tensor
        shape ``[P]``, dtype ``torch.int64``; logical page ids, in request order.
    always_dense : torch.Tensor
        shape ``[P]``, dtype ``torch.bool``; ``True`` for sink pages (plan them dense with ``FLAG_ALWAYS_READ``).
    """

    pages: torch.Tensor
    always_dense: torch.Tensor


def sealable_pages(
    req_pages: torch.Tensor, seq_len: int, hot_window: int, sink_tokens: int, *, page_size: int
) -> SealablePages:
    """Which pages of a request are complete and may be compressed.

    Page ``i`` (0-based position in the request) is sealable when it is complete, ``(i + 1) * S <= seq_len``, and
    either it is a sink page, ``i < ceil(sink_tokens / S)``, or it has left the hot window, i.e. all its tokens are
    older than the last ``hot_window`` tokens: ``(i + 1) * S <= seq_len - hot_window``. Pages already sealed are
    included (see ``CompressedKVStore.pages_to_seal`` for the filtered list).

    Parameters
    ----------
    req_pages : torch.Tensor
        shape ``[n_pages]``, integer dtype, any device; the request's logical pages in order.
    seq_len : int
        Tokens of the request whose K/V are written (``<= n_pages * S``).
    hot_window : int
        Most recent tokens kept dense (``>= 0``).
    sink_tokens : int
        Leading tokens treated as attention sinks (``>= 0``).
    page_size : int
        ``S``, tokens per page (= segment size).

    Returns
    -------
    SealablePages
        On the device of ``req_pages``.
    """
    if not isinstance(req_pages, torch.Tensor) or req_pages.dim() != 1 or req_pages.dtype.is_floating_point:
        got = f"dtype {req_pages.dtype} shape {list(req_pages.shape)}" if isinstance(req_pages, torch.Tensor) else (
            type(req_pages).__name__
        )
        raise ValueError(f"req_pages: expected a 1-D integer tensor, got {got}")
    for name, val, lo in (("seq_len", seq_len, 0), ("hot_window", hot_window, 0), ("sink_tokens", sink_tokens, 0),
                          ("page_size", page_size, 1)):  # fmt: skip
        check_int(val, name, lo)
    n = req_pages.shape[0]
    if seq_len > n * page_size:
        raise ValueError(f"seq_len: expected <= n_pages * page_size = {n * page_size}, got {seq_len}")
    n_full = seq_len // page_size
    n_sink = min(-(-sink_tokens // page_size), n_full)
    n_cold = max(0, (seq_len - hot_window) // page_size)
    n_seal = max(n_sink, min(n_cold, n_full))
    pages = req_pages[:n_seal].to(torch.int64)
    always_dense = torch.arange(n_seal, device=req_pages.device) < n_sink
    return SealablePages(pages, always_dense)
