# SPDX-License-Identifier: Apache-2.0
"""``tok-m``: keep the ``m`` most attended tokens of the segment (whole K and V vectors).

Token dropping by attention received from recent queries, pooled over the GQA group, as in SnapKV (Li et al.,
"SnapKV: LLM Knows What You are Looking for Before Generation", arXiv 2404.14469). Differences: the selection is
local to a segment (``m`` of ``S`` tokens, ``m`` chosen per segment by the planner) instead of a global top-k per head,
the observation window is the ring buffer of recent decode queries rather than the prompt's last tokens, and there is
no pooling (max-pool clustering) of scores. Limitation: a dropped token is gone for good; a later query that would
attend to it cannot (the planner keeps segments with diffuse attention dense or chan-compressed instead).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from mosaickv_sglang.kernels import format as fmt
from mosaickv_sglang.kernels._checks import check_int, check_tensor

from .base import Selection, Strategy, check_segment_shape, descending_rank

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokMStrategy(Strategy):
    """Keep the ``m`` tokens of largest ``token_score`` (ties: lower position); kept rows stay dense.

    Parameters
    ----------
    m : int
        Tokens kept per segment, in ``[1, segment_size]``.
    segment_size : int
        ``S``, tokens per segment.
    head_dim : int
        ``d``, a multiple of 32.
    """

    m: int
    segment_size: int = fmt.DEFAULT_SEG_SIZE
    head_dim: int = 128

    def __post_init__(self) -> None:
        check_segment_shape(self.segment_size, self.head_dim)
        check_int(self.m, "m", lo=1, hi=self.segment_size)

    @property
    def form(self) -> int:
        return fmt.FORM_DENSE

    def rows(self, seg_size: int) -> int:
        if self.m > seg_size:
            raise ValueError(f"m: expected <= segment size {seg_size}, got {self.m}")
        return self.m

    def select(
        self,
        x: torch.Tensor,
        *,
        token_score: Optional[torch.Tensor] = None,
        chan_weight: Optional[torch.Tensor] = None,
        token_keep: Optional[torch.Tensor] = None,
    ) -> Selection:
        """Top-``m`` tokens of each segment of ``x`` (shape ``[N, S, d]``) by ``token_score`` (shape ``[N, S]``).

        Rows excluded by ``token_keep`` are never selected (a segment then keeps fewer than ``m`` rows only if
        ``token_keep`` allowed fewer).
        """
        n, s, _ = self._check_x(x)
        if token_score is None:
            raise ValueError("token_score: expected a [N, S] tensor of token importance for tok-m, got None")
        check_tensor(token_score, "token_score", shape=(n, s), device=x.device)
        self.rows(s)
        score = token_score.float()
        if token_keep is not None:
            allowed = self._keep_or_all(x, token_keep)
            score = score.masked_fill(~allowed, float("-inf"))
            keep = (descending_rank(score) < self.m) & allowed
        else:
            keep = descending_rank(score) < self.m
        return Selection(token_keep=keep, form=fmt.FORM_DENSE, param=0)
