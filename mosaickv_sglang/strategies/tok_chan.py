# SPDX-License-Identifier: Apache-2.0
"""``tok-m/chan-k``: the 2-D case, token dropping composed with a per-vector form.

MosaicKV (arXiv 2607.00760) cuts both axes at once: keep the ``m`` most attended tokens of the segment (SnapKV axis,
:mod:`.tok_m`) and, of each kept vector, its own top-``k`` channels (ThinK axis made per-vector, :mod:`.chan_k`).
:class:`ComposedStrategy` chains one token member with one per-vector member (``chan-k`` or ``lowrank-r``, the latter
factoring only the kept rows). It refuses incompatible members at construction (kvpress ``ComposedPress`` pattern):
two token members, two per-vector members, ``dense`` (compose nothing: use the other member alone), nested
compositions, or members built for different segment shapes. Limitation: the two axes are chosen greedily, tokens
first; the planner compares the composition against each axis alone on measured error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from mosaickv_sglang.kernels import format as fmt

from .base import Selection, Strategy
from .chan_k import ChanKStrategy
from .dense import DenseStrategy
from .lowrank import LowRankStrategy
from .tok_m import TokMStrategy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ComposedStrategy(Strategy):
    """One :class:`TokMStrategy` followed by one :class:`ChanKStrategy` or :class:`LowRankStrategy`.

    Parameters
    ----------
    members : tuple of Strategy
        Exactly two members, in any order: a token strategy and a per-vector strategy.
    """

    members: Tuple[Strategy, ...]

    def __post_init__(self) -> None:
        members = tuple(self.members) if isinstance(self.members, (tuple, list)) else None
        if members is None or len(members) != 2:
            raise ValueError(
                f"members: expected a tuple of 2 strategies (tok-m, chan-k or lowrank-r), got {self.members!r}"
            )
        object.__setattr__(self, "members", members)
        for m in members:
            if isinstance(m, (ComposedStrategy, DenseStrategy)) or not isinstance(m, Strategy):
                raise ValueError(
                    f"members: expected TokMStrategy, ChanKStrategy or LowRankStrategy, got {type(m).__name__}"
                )
        tok = [m for m in members if isinstance(m, TokMStrategy)]
        vec = [m for m in members if isinstance(m, (ChanKStrategy, LowRankStrategy))]
        if len(tok) != 1 or len(vec) != 1:
            names = [type(m).__name__ for m in members]
            raise ValueError(f"members: expected one token and one per-vector strategy, got {names}")
        shapes = {(m.segment_size, m.head_dim) for m in members}
        if len(shapes) != 1:
            raise ValueError(f"members: expected one (segment_size, head_dim) for all members, got {sorted(shapes)}")

    @classmethod
    def tok_chan(
        cls, m: int, k: int, segment_size: int = fmt.DEFAULT_SEG_SIZE, head_dim: int = 128
    ) -> "ComposedStrategy":
        """The ``tok-m/chan-k`` composition."""
        return cls((TokMStrategy(m, segment_size, head_dim), ChanKStrategy(k, segment_size, head_dim)))

    @property
    def token_member(self) -> TokMStrategy:
        return next(m for m in self.members if isinstance(m, TokMStrategy))

    @property
    def vector_member(self) -> Strategy:
        return next(m for m in self.members if not isinstance(m, TokMStrategy))

    @property  # type: ignore[override]
    def segment_size(self) -> int:
        return self.members[0].segment_size

    @property  # type: ignore[override]
    def head_dim(self) -> int:
        return self.members[0].head_dim

    @property
    def form(self) -> int:
        return self.vector_member.form

    @property
    def param(self) -> int:
        return self.vector_member.param

    def rows(self, seg_size: int) -> int:
        return self.token_member.rows(seg_size)

    def select(
        self,
        x: torch.Tensor,
        *,
        token_score: Optional[torch.Tensor] = None,
        chan_weight: Optional[torch.Tensor] = None,
        token_keep: Optional[torch.Tensor] = None,
    ) -> Selection:
        """Tokens first (by ``token_score``, shape ``[N, S]``), then the per-vector member on the kept rows."""
        tok = self.token_member.select(x, token_score=token_score, token_keep=token_keep)
        return self.vector_member.select(x, chan_weight=chan_weight, token_keep=tok.token_keep)
