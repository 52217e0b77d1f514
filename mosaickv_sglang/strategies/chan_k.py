# SPDX-License-Identifier: Apache-2.0
"""``chan-k``: every vector keeps its own top-k channels (per-vector element selection).

The channel axis is the one pruned by ThinK (Xu et al., "ThinK: Thinner Key Cache by Query-Driven Pruning",
arXiv 2407.21018): channels are scored by query magnitude times key magnitude. **Difference:** ThinK chooses one
channel set per head (a mask shared by all tokens) and, in its reference implementation, zeroes the pruned channels
without saving memory. Here each vector ``x`` keeps the ``k`` channels of largest ``|x_c| * w_c`` *of that vector*,
because the heavy channels of one token are not those of another, and stores them packed (a ``d``-bit mask plus
``k`` values per row, see ``FORM_CHAN``), so the bytes are really saved.

Weights: for K, ``w_c = sqrt(E[q_c^2])`` over recent queries of the GQA group (the error ``q_c k_c`` of dropping
``k_c`` scales with it); for V, ``w_c = 1`` (see :mod:`mosaickv_sglang.importance`). Limitations: the mask costs
``d / 16`` elements per row, so small ``k`` saves less than ``k / d`` suggests; the weights are second moments,
blind to the sign and cross-channel correlation of the queries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from mosaickv_sglang.kernels import format as fmt
from mosaickv_sglang.kernels._checks import check_int, check_tensor

from .base import Selection, Strategy, chan_scores, check_segment_shape, descending_rank

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChanKStrategy(Strategy):
    """Keep the top-``k`` elements of every vector by ``|x_c| * w_c`` (ties: lower channel index).

    Parameters
    ----------
    k : int
        Channels kept per vector, in ``[1, head_dim - 1]``.
    segment_size : int
        ``S``, tokens per segment.
    head_dim : int
        ``d``, a multiple of 32.
    """

    k: int
    segment_size: int = fmt.DEFAULT_SEG_SIZE
    head_dim: int = 128

    def __post_init__(self) -> None:
        check_segment_shape(self.segment_size, self.head_dim)
        check_int(self.k, "k", lo=1, hi=self.head_dim - 1)

    @property
    def form(self) -> int:
        return fmt.FORM_CHAN

    @property
    def param(self) -> int:
        return self.k

    def select(
        self,
        x: torch.Tensor,
        *,
        token_score: Optional[torch.Tensor] = None,
        chan_weight: Optional[torch.Tensor] = None,
        token_keep: Optional[torch.Tensor] = None,
    ) -> Selection:
        """Per-vector top-k of ``x`` (shape ``[N, S, d]``); ``chan_weight`` shape ``[N, d]`` (default ones)."""
        n, _, d = self._check_x(x)
        if self.k >= d:
            raise ValueError(f"k: expected < head_dim of x ({d}), got {self.k}")
        if chan_weight is not None:
            check_tensor(chan_weight, "chan_weight", shape=(n, d), device=x.device)
        keep = self._keep_or_all(x, token_keep)
        chan_keep = descending_rank(chan_scores(x, chan_weight)) < self.k
        return Selection(token_keep=keep, form=fmt.FORM_CHAN, param=self.k, chan_keep=chan_keep)
