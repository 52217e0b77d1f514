# SPDX-License-Identifier: Apache-2.0
"""The per-segment candidate menu: one entry per (kept tokens ``m``, K form, V form) the planner may choose.

K and V share the token axis (the packed format drops a token from both) but may use different forms, e.g. a
segment may keep ``m = S/2`` tokens with K as per-vector top-``d/4`` channels and V as rank-16 factors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Sequence, Tuple

from mosaickv_sglang.kernels import format as fmt
from mosaickv_sglang.kernels._checks import check_int

from .base import Strategy, check_segment_shape, dense_segment_bytes, segment_bytes
from .chan_k import ChanKStrategy
from .dense import DenseStrategy
from .lowrank import LowRankStrategy
from .tok_chan import ComposedStrategy
from .tok_m import TokMStrategy

logger = logging.getLogger(__name__)

DEFAULT_TOKEN_FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.125)
DEFAULT_CHAN_FRACTIONS = (0.5, 0.25, 0.125)
DEFAULT_RANKS = (8, 16, 32)


@dataclass(frozen=True)
class Candidate:
    """One menu entry.

    Attributes
    ----------
    m : int
        Kept tokens (shared by K and V), ``1 <= m <= S``.
    k_form, k_param, v_form, v_param : int
        Packed forms and parameters (``k`` for chan, ``r`` for lowrank, 0 for dense) of K and V.
    """

    m: int
    k_form: int = fmt.FORM_DENSE
    k_param: int = 0
    v_form: int = fmt.FORM_DENSE
    v_param: int = 0

    def __post_init__(self) -> None:
        check_int(self.m, "m", lo=1)
        for side in ("k", "v"):
            form, param = getattr(self, f"{side}_form"), getattr(self, f"{side}_param")
            if form not in fmt.FORM_NAMES:
                raise ValueError(f"{side}_form: expected one of {sorted(fmt.FORM_NAMES)}, got {form}")
            if form == fmt.FORM_DENSE and param != 0:
                raise ValueError(f"{side}_param: expected 0 for the dense form, got {param}")
            if form != fmt.FORM_DENSE:
                check_int(param, f"{side}_param", lo=1)

    def bytes(self, head_dim: int) -> int:
        """Packed bytes of a segment with this candidate (payloads granule-rounded, metadata included)."""
        return int(segment_bytes(self.m, self.k_form, self.k_param, self.v_form, self.v_param, head_dim))

    @property
    def name(self) -> str:
        def side(form: int, param: int) -> str:
            return {fmt.FORM_DENSE: "dense", fmt.FORM_CHAN: f"chan-{param}", fmt.FORM_LOWRANK: f"lowrank-{param}"}[form]

        return f"tok-{self.m}|K:{side(self.k_form, self.k_param)}|V:{side(self.v_form, self.v_param)}"

    def strategies(self, seg_size: int, head_dim: int) -> Tuple[Strategy, Strategy]:
        """The K and V strategies of this candidate for segments of shape ``(seg_size, head_dim)``."""

        def one(form: int, param: int) -> Strategy:
            vec: Strategy
            if form == fmt.FORM_CHAN:
                vec = ChanKStrategy(param, seg_size, head_dim)
            elif form == fmt.FORM_LOWRANK:
                vec = LowRankStrategy(param, seg_size, head_dim)
            else:
                vec = DenseStrategy(seg_size, head_dim)
            if self.m == seg_size:
                return vec
            tok = TokMStrategy(self.m, seg_size, head_dim)
            return tok if form == fmt.FORM_DENSE else ComposedStrategy((tok, vec))

        return one(self.k_form, self.k_param), one(self.v_form, self.v_param)


def default_menu(
    seg_size: int,
    head_dim: int,
    *,
    token_fractions: Sequence[float] = DEFAULT_TOKEN_FRACTIONS,
    chan_fractions: Sequence[float] = DEFAULT_CHAN_FRACTIONS,
    ranks: Iterable[int] = DEFAULT_RANKS,
    lowrank: bool = True,
) -> Tuple[Candidate, ...]:
    """The concrete menu for segments of ``seg_size`` tokens and ``head_dim`` channels.

    Every combination of ``m`` in ``S * token_fractions`` and per-side form in {dense, chan-``k`` for ``k`` in
    ``d * chan_fractions``, lowrank-``r`` for ``r`` in ``ranks``} (K and V independently). Low-rank forms are kept only
    where ``r < min(m, d)`` and their payload is smaller than the dense one; duplicates are removed. The all-dense
    candidate (``m = S``) is always first. Defaults: ``m`` in {S, 3S/4, S/2, S/4, S/8} (S/8 gives headroom for
    ratios above 12), ``k`` in {d/2, d/4, d/8}, ``r`` in {8, 16, 32}.

    Returns
    -------
    tuple of Candidate
        Sorted by decreasing bytes (ties by name), the dense candidate first.
    """
    check_segment_shape(seg_size, head_dim)
    ms = sorted({max(1, min(seg_size, int(round(seg_size * f)))) for f in token_fractions}, reverse=True)
    if not ms or ms[0] != seg_size:
        ms = [seg_size] + [m for m in ms if m != seg_size]
    ks = sorted({int(round(head_dim * f)) for f in chan_fractions if 1 <= int(round(head_dim * f)) < head_dim})
    rs = sorted({int(r) for r in ranks}) if lowrank else []
    out = set()
    for m in ms:
        forms = [(fmt.FORM_DENSE, 0)] + [(fmt.FORM_CHAN, k) for k in ks]
        dense_elems = m * head_dim
        for r in rs:
            if 1 <= r < min(m, head_dim) and fmt.payload_elems(fmt.FORM_LOWRANK, r, m, head_dim) < dense_elems:
                forms.append((fmt.FORM_LOWRANK, r))
        for kf, kp in forms:
            for vf, vp in forms:
                out.add(Candidate(m, kf, kp, vf, vp))
    dense = Candidate(seg_size)
    rest = sorted(out - {dense}, key=lambda c: (-c.bytes(head_dim), c.name))
    return (dense, *rest)


AXES = ("both", "token", "channel")
"""The compression axes a menu may use (``--mosaic-axes``): ``"both"`` (2-D, every candidate), ``"token"`` (tokens
dropped, every kept vector dense: a SnapKV-like baseline) or ``"channel"`` (every token kept, channels pruned per
vector, no low-rank forms: a ThinK-like baseline)."""


def dense_index(menu: Sequence[Candidate], seg_size: int) -> int:
    """The index of ``Candidate(seg_size)``, the dense one, in ``menu``, by reading fields: code that
    :func:`torch.compile` traces can read a frozen dataclass but not build one."""
    for i, c in enumerate(menu):
        if c.m == seg_size and c.k_form == fmt.FORM_DENSE and c.v_form == fmt.FORM_DENSE:
            return i
    raise ValueError(f"menu: expected the dense candidate of {seg_size} tokens, got none")


def restrict_menu(menu: Sequence[Candidate], axes: str, seg_size: int) -> Tuple[Candidate, ...]:
    """The candidates of ``menu`` that use only the compression ``axes`` (one of :data:`AXES`), in menu order."""
    if axes not in AXES:
        raise ValueError(f"axes: expected one of {AXES}, got {axes!r}")
    if axes == "token":
        return tuple(c for c in menu if c.k_form == fmt.FORM_DENSE and c.v_form == fmt.FORM_DENSE)
    if axes == "channel":
        return tuple(c for c in menu
                     if c.m == seg_size and fmt.FORM_LOWRANK not in (c.k_form, c.v_form))  # fmt: skip
    return tuple(menu)


def axes_menu(axes: str, seg_size: int, head_dim: int, *, lowrank: bool) -> Tuple[Candidate, ...]:
    """:func:`default_menu` (with or without low-rank forms) restricted to the compression ``axes``
    (:func:`restrict_menu`): the menu a planner uses under ``--mosaic-axes``."""
    return restrict_menu(default_menu(seg_size, head_dim, lowrank=lowrank), axes, seg_size)


RATIO_MARGIN = 0.999
"""A ratio is planned only up to this fraction of :func:`menu_max_ratio` (byte budgets are rounded down)."""


def menu_max_ratio(menu: Sequence[Candidate], seg_size: int, head_dim: int) -> float:
    """The highest compression ratio ``menu`` reaches: a dense segment's bytes over its smallest candidate's."""
    if not menu:
        raise ValueError("menu: expected at least one candidate, got none")
    return dense_segment_bytes(seg_size, head_dim) / min(c.bytes(head_dim) for c in menu)
