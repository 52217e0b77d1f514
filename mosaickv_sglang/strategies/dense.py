# SPDX-License-Identifier: Apache-2.0
"""``dense``: keep the segment as is.

Used for attention sinks, the recent window and segments whose loss would cost more than the bytes are worth. It is
the exactness oracle: a plan where every segment is dense reproduces the uncompressed attention bit for bit.
Limitation: none in quality; it saves no memory (its packed bytes are the reference of every compression ratio).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from mosaickv_sglang.kernels import format as fmt

from .base import Selection, Strategy, check_segment_shape

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DenseStrategy(Strategy):
    """Keep every token and every channel.

    Parameters
    ----------
    segment_size : int
        ``S``, tokens per segment (a power of two in ``[16, 256]``).
    head_dim : int
        ``d``, a multiple of 32.
    """

    segment_size: int = fmt.DEFAULT_SEG_SIZE
    head_dim: int = 128

    def __post_init__(self) -> None:
        check_segment_shape(self.segment_size, self.head_dim)

    @property
    def form(self) -> int:
        return fmt.FORM_DENSE

    def select(
        self,
        x: torch.Tensor,
        *,
        token_score: Optional[torch.Tensor] = None,
        chan_weight: Optional[torch.Tensor] = None,
        token_keep: Optional[torch.Tensor] = None,
    ) -> Selection:
        """Keep all rows of ``x`` (shape ``[N, S, d]``) allowed by ``token_keep`` (default all), every channel."""
        self._check_x(x)
        return Selection(token_keep=self._keep_or_all(x, token_keep), form=fmt.FORM_DENSE, param=0)
