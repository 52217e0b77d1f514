# SPDX-License-Identifier: Apache-2.0
"""Per-segment compression strategies of MosaicKV and the planner's candidate menu.

Each strategy is a small frozen dataclass with one pure :meth:`~.base.Strategy.select` (style rule R6). The registry
:data:`STRATEGIES` maps the menu names of the design brief to the classes:

========================  =====================================================================
``dense``                 :class:`DenseStrategy`: keep as is (sinks, recent window)
``chan-k``                :class:`ChanKStrategy`: per-vector top-k channels (ThinK axis, per vector)
``tok-m``                 :class:`TokMStrategy`: the m most attended tokens (SnapKV axis)
``tok-m/chan-k``          :class:`ComposedStrategy`: both at once (the 2-D case)
``lowrank-r``             :class:`LowRankStrategy`: truncated SVD factors ``A @ B``
========================  =====================================================================

A third axis, lower precision (fp8/int8) of what is kept, is part of the method but not of the packed format yet,
so it has no strategy and is not in the menu.
"""

from __future__ import annotations

from typing import Dict, Type

from .base import (
    Selection,
    Strategy,
    dense_segment_bytes,
    descending_rank,
    overhead_bytes,
    segment_bytes,
)
from .chan_k import ChanKStrategy
from .dense import DenseStrategy
from .lowrank import LowRankStrategy
from .menu import AXES, RATIO_MARGIN, Candidate, axes_menu, default_menu, dense_index, menu_max_ratio, restrict_menu
from .tok_chan import ComposedStrategy
from .tok_m import TokMStrategy

STRATEGIES: Dict[str, Type[Strategy]] = {
    "dense": DenseStrategy,
    "chan-k": ChanKStrategy,
    "tok-m": TokMStrategy,
    "tok-m/chan-k": ComposedStrategy,
    "lowrank-r": LowRankStrategy,
}

__all__ = [
    "AXES",
    "RATIO_MARGIN",
    "STRATEGIES",
    "Candidate",
    "ChanKStrategy",
    "ComposedStrategy",
    "DenseStrategy",
    "LowRankStrategy",
    "Selection",
    "Strategy",
    "TokMStrategy",
    "axes_menu",
    "default_menu",
    "dense_index",
    "dense_segment_bytes",
    "menu_max_ratio",
    "descending_rank",
    "overhead_bytes",
    "restrict_menu",
    "segment_bytes",
]
