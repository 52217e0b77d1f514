# SPDX-License-Identifier: Apache-2.0
"""The MosaicKV compression planner: one strategy per segment, minimising estimated error under a byte budget.

Input: ``N`` segments (``S`` tokens of one layer and KV head each) as dense ``K``, ``V`` (shape ``[N, S, d]``), the
recent queries of their GQA groups (shape ``[N, W, G, d]``) or their :class:`~mosaickv_sglang.importance.
SegmentImportance`, and a byte budget (``ratio``: budget = all-dense packed bytes / ratio). Output: a
:class:`~mosaickv_sglang.kernels.format.SegmentPlan` for ``pack``, inside a :class:`PlanResult`.

Three steps, all vectorised over segments (Python loops run only over menu entries, bisection rounds and chunks of
segments, never over segments):

1. **Estimate** ``err[n, c]`` for every segment ``n`` and menu candidate ``c`` (see :func:`estimate_errors_exact`
   and :func:`estimate_errors_fast`), and the candidate's packed bytes (the same for every segment). The error is
   the attention-output error on the observed queries plus ``unseen_weight`` times the error of a query that
   retrieves one token, chosen with :func:`retrieval_prior` (by default favouring tokens not repeated in their
   segment; :func:`unseen_query_error`): the observed queries alone price a dropped token by the attention *they*
   paid it, which is close to nothing for a needle the recent queries never looked at.
2. **Choose** (:func:`choose_candidates`): a Lagrangian sweep, i.e. a bisection on ``lambda`` for the smallest
   ``lambda`` whose per-segment choices ``argmin_c err[n, c] + lambda * bytes[c]`` fit the budget, then a greedy
   fix-up that spends the leftover bytes; the estimated error is provably non-increasing in the budget.
3. **Materialise** the plan: the kept tokens (top-``m`` by attention mass), the forms, the channel weights and, for
   low-rank sides, the SVD factors of the kept rows (batched :func:`torch.linalg.svd`).

Always-dense segments (attention sinks, the recent window) are not planned: they get the dense candidate, their
bytes are charged to the budget first, and sinks get ``FLAG_ALWAYS_READ``.

Entry points: :func:`plan_exact` (attention-output error on the observed queries, with low-rank candidates; for
the sidecar, off the critical path), :func:`plan_fast` (cheap proxy, no SVD; the GPU path), and the single-axis
baselines :func:`plan_token_only` (SnapKV-like) and :func:`plan_channel_only` (ThinK-like), which run the same
optimiser on a restricted menu so that a quality comparison is at equal bytes.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from mosaickv_sglang.importance import (
    FLOAT_DTYPES,
    SegmentImportance,
    default_scale,
    flatten_queries,
    group_logsumexp,
    importance_from_queries,
    normalize_group_ids,
    segment_scores,
)
from mosaickv_sglang.kernels import format as fmt
from mosaickv_sglang.kernels._checks import check_int, check_tensor
from mosaickv_sglang.strategies import Candidate, Selection, default_menu, dense_index, descending_rank, restrict_menu
from mosaickv_sglang.strategies.base import chan_scores, check_segment_shape, dense_segment_bytes
from mosaickv_sglang.strategies.lowrank import factors_from_svd, masked_svd

logger = logging.getLogger(__name__)

__all__ = [
    "ErrorEstimate",
    "PlanResult",
    "apply_plan_reference",
    "attention_output_error",
    "budget_from_ratio",
    "choose_candidates",
    "estimate_errors_exact",
    "estimate_errors_fast",
    "unseen_query_error",
    "plan_channel_only",
    "plan_exact",
    "plan_fast",
    "plan_token_only",
]

_EPS = 1e-30
_MIN_KEPT_FRACTION = 1e-3
DEFAULT_CHUNK = 256
# Transient bytes of one chunk of _novelty: 1,638 segments at S=64, d=128, so 128 pages of the 8B shape's 32 layers x
# 8 heads in 21 chunks (in 128 at DEFAULT_CHUNK, seven launches each: the served planner's most sampled ops)
NOVELTY_CHUNK_BYTES = 128 << 20
DEFAULT_UNSEEN_WEIGHT = 1.0
"""Default weight of :func:`unseen_query_error` in the planner's objective (see :class:`ErrorEstimate`).

The observed queries are a few recent ones; a later query may retrieve any token (a needle, a name, a digit the
recent queries never looked at). The weight says how much such a query counts against the observed ones: 1 is an
even mixture of the observed queries and a query that retrieves a uniformly chosen token. With 0 the planner is the
observed-query optimiser of before (token drops priced only by the queries that ignored those tokens)."""


@dataclass(frozen=True, eq=False)
class PlanResult:
    """A plan and how it was chosen.

    Attributes
    ----------
    plan : SegmentPlan
        The plan of the ``N`` segments.
    menu : tuple of Candidate
        The candidates the planner chose from.
    choice : torch.Tensor
        shape ``[N]``, dtype ``torch.int64``; index into ``menu`` per segment.
    est_error : torch.Tensor
        shape ``[N]``, dtype ``torch.float32``; the estimated error of each segment's choice
        (:attr:`ErrorEstimate.err`; 0 for dense segments). Their sum estimates the relative squared error of the
        attention outputs, summed over contexts.
    seg_bytes : torch.Tensor
        shape ``[N]``, dtype ``torch.int64``; packed bytes per segment.
    budget_bytes : int
        The byte budget.
    dense_bytes : int
        Packed bytes of the all-dense plan.
    lagrange : float or torch.Tensor
        The ``lambda`` of the sweep (0 when everything fit without it): a 0-d tensor on the plan's device when the
        one-call planner chose it (:func:`~mosaickv_sglang.plan_layers.plan_fast_layers`: not read to the host
        unless asked for), else a float. :attr:`lagrange_multiplier` reads it as a float.
    """

    plan: fmt.SegmentPlan
    menu: Tuple[Candidate, ...]
    choice: torch.Tensor
    est_error: torch.Tensor
    seg_bytes: torch.Tensor
    budget_bytes: int
    dense_bytes: int
    lagrange: Union[float, torch.Tensor]

    @property
    def lagrange_multiplier(self) -> float:
        """:attr:`lagrange` as a float (reads it from the device when it is a tensor there)."""
        return float(self.lagrange)

    @property
    def total_bytes(self) -> int:
        return int(self.seg_bytes.sum())

    @property
    def ratio(self) -> float:
        """Achieved compression ratio (dense bytes / planned bytes)."""
        return self.dense_bytes / max(self.total_bytes, 1)

    @property
    def total_error(self) -> float:
        return float(self.est_error.double().sum())


@dataclass(frozen=True, eq=False)
class ErrorEstimate:
    """Per (segment, candidate) estimates returned by the estimators.

    Attributes
    ----------
    first_order : torch.Tensor
        shape ``[N, C]``, dtype ``torch.float32``, ``>= 0``; relative squared change of the context's attention
        output caused by this segment alone, to first order and before renormalisation (0 for the dense candidate).
    mass_delta : torch.Tensor
        shape ``[N, C]``, dtype ``torch.float32``; change of the segment's share of its context's attention mass,
        averaged over queries (``<= 0`` when tokens are dropped; 0 for the dense candidate).
    mass_share : torch.Tensor
        shape ``[N]``, dtype ``torch.float32``, ``>= 0``; the segment's share of its context's attention mass.
    unseen : torch.Tensor, optional
        shape ``[N, C]``, dtype ``torch.float32``, ``>= 0``; the error for queries *unlike the observed ones* (see
        :func:`unseen_query_error`); ``None``: not estimated.
    unseen_weight : float
        ``>= 0``; how much those queries count (see :data:`DEFAULT_UNSEEN_WEIGHT`).

    Notes
    -----
    The optimiser minimises :attr:`err`, ``observed_err + unseen_weight * unseen``. :attr:`observed_err` is
    ``first_order / rho^2`` with ``rho = 1 + mass_delta / mass_share`` the
    fraction of the segment's attention mass the candidate keeps (clamped to ``>= 1e-3``). Exactly, compressing
    several segments of a context at once gives ``O' - O = (sum_n delta_n) / F`` with ``F`` the mass kept by the
    whole context; a plan-independent (so separable, so optimisable by the Lagrangian) stand-in for ``F`` is the
    mean-field guess that the rest of the context is compressed like this segment, ``F ~ rho``. Without it a plan
    drops most of the mass of a context through many individually cheap token drops, and every error is then
    amplified by ``1 / F^2``.
    """

    first_order: torch.Tensor
    mass_delta: torch.Tensor
    mass_share: torch.Tensor
    unseen: Optional[torch.Tensor] = None
    unseen_weight: float = 0.0

    @property
    def kept_fraction(self) -> torch.Tensor:
        """``rho``: shape ``[N, C]``, fraction of the segment's attention mass kept (1 where the segment has none)."""
        share = self.mass_share[:, None]
        rho = torch.where(share > 0, 1.0 + self.mass_delta / share.clamp(min=_EPS), torch.ones_like(self.mass_delta))
        return rho.clamp(min=_MIN_KEPT_FRACTION)

    @property
    def observed_err(self) -> torch.Tensor:
        """Error on the observed queries: shape ``[N, C]``, ``first_order / kept_fraction^2``."""
        return self.first_order / self.kept_fraction.pow(2)

    @property
    def err(self) -> torch.Tensor:
        """The error the optimiser minimises: shape ``[N, C]``, ``observed_err + unseen_weight * unseen``."""
        if self.unseen is None or self.unseen_weight == 0:
            return self.observed_err
        return self.observed_err + self.unseen_weight * self.unseen


# --- validation ------------------------------------------------------------------------------------------------------
def _check_kv(keys: torch.Tensor, values: torch.Tensor) -> Tuple[int, int, int]:
    check_tensor(keys, "K", ndim=3, dtype=FLOAT_DTYPES)
    check_tensor(values, "V", shape=tuple(keys.shape), dtype=FLOAT_DTYPES, device=keys.device)
    n, s, d = keys.shape
    check_segment_shape(s, d, s_name="K (dim 1, segment size)", d_name="K (dim 2, head_dim)")
    return n, s, d


def budget_from_ratio(dense_bytes: int, ratio: float) -> int:
    """``floor(dense_bytes / ratio)``; ``ratio`` a finite float ``>= 1``."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio < 1:
        raise ValueError(f"ratio: expected a finite number >= 1, got {ratio!r}")
    return int(math.floor(dense_bytes / float(ratio) + 1e-9))


def _resolve_budget(dense_bytes: int, ratio: Optional[float], budget_bytes: Optional[int]) -> int:
    if (ratio is None) == (budget_bytes is None):
        raise ValueError(
            f"ratio/budget_bytes: expected exactly one of them, got ratio={ratio!r}, budget_bytes={budget_bytes!r}"
        )
    if ratio is not None:
        return budget_from_ratio(dense_bytes, ratio)
    return check_int(budget_bytes, "budget_bytes", lo=0)


def _check_menu(menu: Optional[Sequence[Candidate]], s: int, d: int, lowrank: bool) -> Tuple[Candidate, ...]:
    items = tuple(default_menu(s, d, lowrank=lowrank) if menu is None else menu)
    if not items or not all(isinstance(c, Candidate) for c in items):
        raise ValueError(f"menu: expected a non-empty sequence of Candidate, got {menu!r}")
    for c in items:
        if c.m > s:
            raise ValueError(f"menu: expected m <= S = {s}, got {c.name}")
        for form, p in ((c.k_form, c.k_param), (c.v_form, c.v_param)):
            if form == fmt.FORM_CHAN and not 1 <= p < d:
                raise ValueError(f"menu: expected chan k in [1, {d - 1}], got {c.name}")
            if form == fmt.FORM_LOWRANK and not lowrank:
                raise ValueError(
                    f"menu: expected no lowrank candidates in plan_fast (no SVD on the hot path), got {c.name}"
                )
            if form == fmt.FORM_LOWRANK and not 1 <= p <= min(s, d):
                raise ValueError(f"menu: expected lowrank r in [1, {min(s, d)}], got {c.name}")
    if Candidate(s) not in items:
        raise ValueError(
            f"menu: expected the dense candidate {Candidate(s).name} (always-dense segments need it), got none"
        )
    if len(set(items)) != len(items):
        raise ValueError("menu: expected distinct candidates, got duplicates")
    return items


def _check_mask(mask: Optional[torch.Tensor], n: int, device: torch.device, name: str) -> torch.Tensor:
    if mask is None:
        return torch.zeros(n, dtype=torch.bool, device=device)
    return check_tensor(mask, name, shape=(n,), dtype=torch.bool, device=device)


def _menu_tensors(menu: Sequence[Candidate], d: int, device: torch.device) -> Dict[str, torch.Tensor]:
    def col(vals: List[int]) -> torch.Tensor:
        return torch.tensor(vals, dtype=torch.int64, device=device)

    return {
        "m": col([c.m for c in menu]),
        "k_form": col([c.k_form for c in menu]),
        "k_param": col([c.k_param for c in menu]),
        "v_form": col([c.v_form for c in menu]),
        "v_param": col([c.v_param for c in menu]),
        "bytes": col([c.bytes(d) for c in menu]),
    }


# --- error estimation ------------------------------------------------------------------------------------------------
def _context(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, labels: torch.Tensor, ng: int, scale: float, chunk: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense per-segment attention and its combination per context.

    Returns ``lse`` ``[N, Q]``, ``o`` ``[N, Q, d]`` (segment-local softmax output), context ``L`` ``[ng, Q]`` and
    context output ``O`` ``[ng, Q, d]``.
    """
    n, qn, d = q.shape
    lse = torch.empty(n, qn, device=q.device)
    o = torch.empty(n, qn, d, device=q.device)
    for a in range(0, n, chunk):
        sc = segment_scores(q[a : a + chunk], keys[a : a + chunk], scale)
        lse[a : a + chunk] = torch.logsumexp(sc, dim=2)
        o[a : a + chunk] = torch.bmm(torch.softmax(sc, dim=2), values[a : a + chunk].float())
    ctx = group_logsumexp(lse, labels, ng)
    w = torch.exp(lse - ctx[labels])
    out = torch.zeros(ng, qn, d, device=q.device).index_add_(0, labels, w[:, :, None] * o)
    return lse, o, ctx, out


class _Approximations:
    """Approximated rows of one tensor (chunk of segments) per (form, param), cached across menu entries.

    Chan rows do not depend on the kept tokens (selection is per vector); low-rank rows do and are recomputed for
    each token selection (one SVD per selection, truncated per rank).
    """

    def __init__(self, x: torch.Tensor, chan_weight: torch.Tensor) -> None:
        self.x = x
        self.rank = descending_rank(chan_scores(x, chan_weight))
        self.chan: Dict[int, torch.Tensor] = {}
        self.low: Dict[int, torch.Tensor] = {}
        self.keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        self.svd: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    def set_keep(self, keep: torch.Tensor) -> None:
        self.keep, self.svd, self.low = keep, None, {}

    def get(self, form: int, param: int) -> torch.Tensor:
        if form == fmt.FORM_CHAN:
            if param not in self.chan:
                self.chan[param] = self.x * (self.rank < param)
            return self.chan[param]
        if form == fmt.FORM_LOWRANK:
            if param not in self.low:
                if self.svd is None:
                    self.svd = masked_svd(self.x, self.keep)
                factors = factors_from_svd(self.svd, self.keep, param)
                self.low[param] = Selection(self.keep, fmt.FORM_LOWRANK, param, factors=factors).reconstruct(self.x)
            return self.low[param]
        return self.x


def _row_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of each row's energy an approximation loses, ``||x - x_hat||^2 / ||x||^2`` clamped to ``[0, 1]``.

    ``x``, ``x_hat``: shape ``[N, S, d]``, fp32. Returns shape ``[N, S]``, fp32 (0 for all-zero rows).
    """
    den = x.pow(2).sum(-1)
    return ((x - x_hat).pow(2).sum(-1) / den.clamp(min=_EPS)).clamp(max=1.0) * (den > 0)


def _sq_norms(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``||x_t||^2`` of every row of each ``[N, S, d]`` fp32 tensor of ``xs``, stacked: ``[len(xs), N, S]``."""
    out = torch.empty((len(xs),) + tuple(xs[0].shape[:2]), device=xs[0].device)
    for i, x in enumerate(xs):
        torch.sum(x.pow(2), -1, out=out[i])
    return out


def _lost_fraction(lost: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """:func:`_row_loss` from its parts: ``lost`` ``||x - x_hat||^2`` and ``energy`` ``||x||^2``, shape ``[N, S]``
    (``lost`` may stack several approximations, ``[K, N, S]``; ``energy`` broadcasts)."""
    return (lost / energy.clamp(min=_EPS)).clamp(max=1.0) * (energy > 0)


_CHAN_RANK_HEAD_DIMS = (16, 32, 64, 128, 256)  # kernels.chan_rank.CHAN_RANK_HEAD_DIMS, without importing triton


def _channel_kernels_take(x: torch.Tensor) -> bool:
    """Whether the methods chosen for CUDA (:data:`CHAN_DROP_METHOD_ON_CUDA`, :data:`ESTIMATE_TERMS_ON_CUDA`) apply to
    ``x``: a CUDA tensor of a head dim their kernels support."""
    return x.is_cuda and x.shape[-1] in _CHAN_RANK_HEAD_DIMS

CHAN_DROP_METHODS = ("topk", "sort", "kernel")
CHAN_DROP_METHOD_ON_CUDA = "topk"
"""How :func:`_chan_drop_masks` finds each vector's top-``k`` channels on CUDA tensors by default (on the CPU:
``"topk"``). A server sets it at startup to the fastest on its GPU (:mod:`mosaickv_sglang.chan_drop_select`); the
int64 top-k was 52-59% of a one-call seal's GPU time on an H200, half of it sorting the top-k (``sorted=True``)."""


def _chan_drop_masks(
    x: torch.Tensor, weight: torch.Tensor, ks: Sequence[int], method: Optional[str] = None
) -> Dict[int, torch.Tensor]:
    """For each ``k`` of ``ks``: the channels outside each vector's top-``k`` by ``|x_c| * w_c``, shape ``[N, S, d]``
    bool, exactly ``descending_rank(chan_scores(x, weight)) >= k`` (ties: the lower index ranks first).

    ``method`` (one of :data:`CHAN_DROP_METHODS`; ``None``: :data:`CHAN_DROP_METHOD_ON_CUDA` on CUDA tensors whose
    ``d`` the kernel supports, else ``"topk"``):

    * ``"topk"`` / ``"sort"``: each score becomes a distinct int64 key, its float bits mapped to an order-preserving
      integer followed by the reversed channel index, so the ``k``-th largest key is a threshold with no ties; the
      thresholds come from one sorted top-``max(ks)`` or from one full sort of each vector's ``d`` keys.
    * ``"kernel"``: :func:`~mosaickv_sglang.kernels.chan_rank.chan_rank_fwd` ranks every channel (uint8) and each
      mask is a compare.

    All order the scores alike (``-0.0 == +0.0``; NaNs by their bits), so the masks are the same bit for bit."""
    if not ks:
        return {}
    d = x.shape[-1]
    if method is None:
        method = CHAN_DROP_METHOD_ON_CUDA if _channel_kernels_take(x) else "topk"
    if method not in CHAN_DROP_METHODS:
        raise ValueError(f"method: expected one of {CHAN_DROP_METHODS}, got {method!r}")
    if method == "kernel":
        from mosaickv_sglang.kernels.chan_rank import chan_rank_fwd  # imports triton: only when used

        rank = chan_rank_fwd(chan_scores(x, weight).contiguous())
        # rank is uint8: a Python k >= 256 would wrap, and k >= d drops nothing anyway
        return {k: rank >= k if k < d else torch.zeros_like(rank, dtype=torch.bool) for k in ks}
    score = chan_scores(x, weight).add_(0.0)  # -0.0 -> +0.0, equal as floats so equal as keys
    bits = score.view(torch.int32)
    bits ^= (bits >> 31) & 0x7FFFFFFF  # negative floats: reverse their magnitude order
    tie = torch.arange(d - 1, -1, -1, device=x.device)
    key = torch.add(tie, bits, alpha=1 << max(1, (d - 1).bit_length()))  # int64 (bits << shift) | tie in one pass
    del score, bits
    if method == "sort":
        top = torch.sort(key, dim=-1, descending=True).values
    else:
        top = torch.topk(key, max(ks), dim=-1, sorted=True).values
    kth = top.index_select(-1, _kth_positions(tuple(ks), x.device)).movedim(-1, 0)  # [len(ks), ...]: k-th largest
    return dict(zip(ks, key < kth[..., None]))  # every k in one compare


@functools.lru_cache(maxsize=32)
def _kth_positions(ks: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``k - 1`` of each ``k`` of ``ks`` on ``device``, int64. Read-only: cached across calls."""
    return torch.tensor([k - 1 for k in ks], dtype=torch.int64, device=device)


UNSEEN_PRIORS = ("uniform", "novelty")
DEFAULT_UNSEEN_PRIOR = "novelty"
"""Default :func:`retrieval_prior`: an unseen query retrieves content that is not repeated in its segment (a
repeated token's copy answers the query anyway). ``"uniform"`` counts every token alike."""


def _check_unseen_prior(kind: object) -> str:
    if kind not in UNSEEN_PRIORS:
        raise ValueError(f"unseen_prior: expected one of {UNSEEN_PRIORS}, got {kind!r}")
    return str(kind)


def _novelty_chunk(s: int, d: int) -> int:
    """Segments a chunk of :func:`_novelty` takes: as many as fit in :data:`NOVELTY_CHUNK_BYTES` of fp32 distances,
    value copies and their squares (``4 * S * (S + 2 d)`` bytes a segment), at least one."""
    return max(1, NOVELTY_CHUNK_BYTES // (4 * s * (s + 2 * d)))


def _novelty(values: torch.Tensor, chunk: Optional[int] = None, energy: Optional[torch.Tensor] = None) -> torch.Tensor:
    """How much of each token's value its nearest other token of the segment misses: shape ``[N, S]``, in ``[0, 1]``.

    ``min_{j != t} ||v_t - v_j||^2 / ||v_t||^2`` (clamped to ``[0, 1]``): about 0 for a token repeated in its segment
    (a query that retrieves it gets the copy's value), 1 for a token unlike its neighbours. The squared distances come
    from the Gram matrix, ``||v_t||^2 + ||v_j||^2 - 2 v_t . v_j``, in one batched product (``torch.cdist`` takes the
    same route for segments over 25 tokens, through a dozen more kernels and a square root undone by squaring: a
    quarter of a seal planner call's launches on the 8B shape, tenth run's profile). ``energy``: the ``||v_t||^2``
    (shape ``[N, S]``, fp32), if already measured.
    """
    n, s, d = values.shape
    chunk = _novelty_chunk(s, d) if chunk is None else chunk
    nearest = torch.empty(n, s, device=values.device)
    measure = energy is None
    energy = torch.empty(n, s, device=values.device) if measure else energy
    eye = torch.eye(s, dtype=torch.bool, device=values.device)
    for a in range(0, n, chunk):  # reductions per chunk, written in place; the elementwise rest once, below
        v = values[a : a + chunk].float()
        e = torch.sum(v.pow(2), -1, out=energy[a : a + chunk]) if measure else energy[a : a + chunk]
        d2 = torch.baddbmm(e.unsqueeze(1), v, v.transpose(1, 2), alpha=-2.0).add_(e.unsqueeze(2))
        torch.amin(d2.masked_fill_(eye, float("inf")), -1, out=nearest[a : a + chunk])
    return (nearest.clamp_(min=0.0) / energy.clamp(min=_EPS)).clamp(max=1.0)


def retrieval_prior(
    values: torch.Tensor, labels: torch.Tensor, ng: int, kind: str = "uniform", energy: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Probability that an unseen retrieval query targets each token: shape ``[N, S]``, fp32, sums to 1 per context.

    ``"uniform"``: ``1 / T`` (``T`` the context's tokens). ``"novelty"``: proportional to :func:`_novelty` (plus a
    floor of ``1e-3``), i.e. queries retrieve content that is not repeated nearby.

    Parameters
    ----------
    values : torch.Tensor
        shape ``[N, S, d]``, float.
    labels : torch.Tensor
        shape ``[N]``, dtype ``torch.int64``; contexts ``0..ng-1``.
    energy : torch.Tensor, optional
        shape ``[N, S]``, fp32; the values' ``||v_t||^2``, if already measured (for ``"novelty"``).
    """
    _check_unseen_prior(kind)
    n, s, _ = values.shape
    w = torch.ones(n, s, device=values.device) if kind == "uniform" else _novelty(values, energy=energy) + 1e-3
    tot = torch.zeros(ng, device=values.device).index_add_(0, labels, w.sum(1))
    return w / tot[labels][:, None]


def _check_unseen_weight(w: object) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise ValueError(f"unseen_weight: expected a finite number >= 0, got {w!r}")
    return float(w)


def unseen_query_error(
    keys: torch.Tensor,
    values: torch.Tensor,
    menu: Sequence[Candidate],
    importance: SegmentImportance,
    *,
    group_ids: Optional[torch.Tensor] = None,
    unseen_prior: str = DEFAULT_UNSEEN_PRIOR,
) -> torch.Tensor:
    """Error of every (segment, candidate) for a query that retrieves one token of the context, chosen uniformly.

    The observed queries only price what *they* attend to; a query that comes later may retrieve any token. For a
    query that retrieves token ``t`` (its attention on ``t``), the relative squared output error is about the
    fraction of ``t``'s energy the candidate loses: ``1`` for a dropped token (its value is gone from the output),
    ``||dv_t||^2 / ||v_t||^2`` for V stored per-vector top-``k`` (and, for K, the relative change
    ``q . dk_t / q . k_t = ||dk_t||^2 / ||k_t||^2`` of the retrieval score with ``q`` along ``k_t``). Per kept token
    the loss is the mean of the K and V fractions, so a token whose K and V are both zeroed costs as much as a
    dropped one. Averaged over the context's tokens (each retrieved with probability ``1 / T``)::

        unseen[n, c] = (S - m_c + sum_{t kept} (loss_K(t) + loss_V(t)) / 2) / T

    summed over a context's segments, it is the relative error of a uniformly chosen retrieval query, on the scale
    of :attr:`ErrorEstimate.first_order`. Tokens are kept by decreasing ``token_mass`` as in the plan. Dense and
    chan forms only (vectorised, no SVD); :func:`estimate_errors_exact` adds low-rank forms.

    Parameters
    ----------
    keys, values : torch.Tensor
        shape ``[N, S, d]``, fp32/fp16/bf16.
    menu : sequence of Candidate
        Dense and chan forms only.
    importance : SegmentImportance
    group_ids : torch.Tensor, optional
        shape ``[N]``, integer; attention contexts (default: one).
    unseen_prior : str
        Which token the query retrieves (:func:`retrieval_prior`): ``"uniform"`` (the formula above) or
        ``"novelty"`` (default; ``1 / T`` replaced by a weight favouring tokens not repeated in their segment).

    Returns
    -------
    torch.Tensor
        shape ``[N, len(menu)]``, dtype ``torch.float32``, ``>= 0`` (0 for the dense candidate).
    """
    n, s, d = _check_kv(keys, values)
    importance = _check_importance(importance, n, s, d, keys.device)
    labels, ng = normalize_group_ids(group_ids, n, keys.device)
    return _unseen_error(keys, values, menu, importance, labels, ng, unseen_prior)


def _unseen_error(
    keys: torch.Tensor,
    values: torch.Tensor,
    menu: Sequence[Candidate],
    importance: SegmentImportance,
    labels: torch.Tensor,
    ng: int,
    unseen_prior: str,
    order: Optional[torch.Tensor] = None,
    chan_loss: Optional[Dict[Tuple[int, int], torch.Tensor]] = None,
    v_energy: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`unseen_query_error` on checked inputs, contexts given as ``labels`` in ``[0, ng)`` (no host read).

    ``order``: the tokens by decreasing ``token_mass`` (stable), if already sorted. ``chan_loss``: ``(side, k) ->
    [N, S]`` fraction of each row's energy that per-vector top-``k`` loses (side 0 K, 1 V), if already measured;
    missing entries are measured here. ``v_energy``: the values' ``||v_t||^2`` (``[N, S]``), if already measured."""
    n, s, _ = keys.shape
    if order is None:
        order = torch.sort(importance.token_mass, dim=1, descending=True, stable=True).indices
    prior = retrieval_prior(values, labels, ng, unseen_prior, v_energy)
    mass = _cumsum_in_order(prior, order)
    dropped = mass[:, -1:] - mass  # [N, S]: row m - 1, prior mass of the tokens after the top m
    chan_loss = {} if chan_loss is None else chan_loss

    def row_loss(side: int, x: torch.Tensor, weight: torch.Tensor, form: int, param: int) -> torch.Tensor:
        if form != fmt.FORM_CHAN:
            raise ValueError(f"menu: expected dense or chan forms (no SVD here), got {fmt.FORM_NAMES[form]}")
        if (side, param) not in chan_loss:
            xf = x.float()
            lost = (xf * _chan_drop_masks(xf, weight, [param])[param]).pow(2).sum(-1)
            chan_loss[side, param] = _lost_fraction(lost, xf.pow(2).sum(-1))
        return chan_loss[side, param]

    if not menu:
        return torch.zeros(n, 0, device=keys.device)
    # Every distinct (side, form, param)'s loss in one prefix sum, and every candidate's three terms in one gather
    # (not a prefix sum per table and three small ops per candidate)
    layout, cols = _unseen_layout(tuple(menu), s, keys.device)
    sides = ((keys, importance.k_chan_weight), (values, importance.v_chan_weight))
    tables = [dropped[:, :, None]]
    if layout:
        losses = torch.stack([row_loss(side, *sides[side], form, param) for side, form, param in layout], 2)
        tables.insert(0, _cumsum_in_order(prior[:, :, None] * losses * 0.5, order))  # [N, S, T]: loss / 2, summed
    terms = torch.cat(tables, 2).view(n, -1).index_select(1, cols).view(n, 3, len(menu))
    return (terms[:, 0] + terms[:, 1] + terms[:, 2]).float()  # per candidate: K loss + V loss + dropped mass


@functools.lru_cache(maxsize=32)
def _unseen_layout(
    menu: Tuple[Candidate, ...], s: int, device: torch.device
) -> Tuple[List[Tuple[int, int, int]], torch.Tensor]:
    """Table layout of :func:`_unseen_error`: the distinct ``(side, form, param)`` of ``menu`` but the dense ones, in
    order of first use (K before V, candidate by candidate), and on ``device`` the columns, shape ``[3 * len(menu)]``
    int64, of each candidate's K, V and dropped-mass terms (in that order) in those tables and the dropped-mass table,
    side by side as ``[N, S, T + 1]`` (row ``m - 1``: the top ``m`` tokens kept) and flattened to ``[N, S * (T +
    1)]``. A dense side loses nothing: its term is the dropped mass with every token kept (row ``S - 1``), an exact
    0. Read-only: cached across calls."""
    index: Dict[Tuple[int, int, int], int] = {}
    for c in menu:
        for key in ((0, c.k_form, c.k_param), (1, c.v_form, c.v_param)):
            if key[1] != fmt.FORM_DENSE:
                index.setdefault(key, len(index))
    width = len(index) + 1
    nothing_lost = (s - 1) * width + len(index)

    def col(c: Candidate, key: Tuple[int, int, int]) -> int:
        return nothing_lost if key[1] == fmt.FORM_DENSE else (c.m - 1) * width + index[key]

    k = [col(c, (0, c.k_form, c.k_param)) for c in menu]
    v = [col(c, (1, c.v_form, c.v_param)) for c in menu]
    dropped = [(c.m - 1) * width + len(index) for c in menu]
    return list(index), torch.tensor(k + v + dropped, dtype=torch.int64, device=device)


def estimate_errors_exact(
    keys: torch.Tensor,
    values: torch.Tensor,
    queries: torch.Tensor,
    menu: Sequence[Candidate],
    importance: SegmentImportance,
    *,
    group_ids: Optional[torch.Tensor] = None,
    sm_scale: Optional[float] = None,
    chunk_segments: int = DEFAULT_CHUNK,
    unseen_weight: float = DEFAULT_UNSEEN_WEIGHT,
    unseen_prior: str = DEFAULT_UNSEEN_PRIOR,
) -> ErrorEstimate:
    """Attention-output error of every (segment, candidate) on the observed queries.

    The estimator. For a query ``j`` of a context (the segments sharing a group id), segment ``n`` contributes
    ``a_n o_n`` to the output ``O = sum_n a_n o_n``, where ``o_n`` is the softmax output over the segment alone and
    ``a_n = exp(lse_n - L)`` its share of the attention mass (``lse_n`` the segment's log-sum-exp, ``L`` the
    context's). Approximating segment ``n`` alone (``o_n -> o'_n``, ``a_n -> a'_n``, kept rows only) changes the
    renormalised output, to first order, by ``delta_n = a'_n (o'_n - O) - a_n (o_n - O)``: the change of the
    segment's contribution plus the shift of attention mass to (or from) the rest of the context. For token dropping
    this is exactly ``sum_dropped p_t (O - v_t)``. The error is the relative squared norm, averaged over queries::

        first_order[n, c] = mean_j ||delta_{n, j}||^2 / mean_j ||O_j||^2

    This is :attr:`ErrorEstimate.first_order`, with ``mass_delta = mean_j (a'_n - a_n)`` and ``mass_share =
    mean_j a_n``. When several segments change at once the output is exactly ``O' - O = (sum_n delta_n) / F``, ``F``
    the attention mass the plan keeps; the optimiser sums :attr:`ErrorEstimate.err` over segments (errors of
    different segments taken as uncorrelated), which divides by a mean-field estimate of ``F^2`` (see
    :class:`ErrorEstimate`). Every query of a segment's group must be the same (they are the group's recent
    queries); the context consists of the segments passed in.

    Parameters
    ----------
    keys, values : torch.Tensor
        shape ``[N, S, d]``, fp32/fp16/bf16.
    queries : torch.Tensor
        shape ``[N, W, G, d]``, float.
    menu : sequence of Candidate
    importance : SegmentImportance
        Token scores (tokens are kept by decreasing ``token_mass``) and channel weights.
    group_ids : torch.Tensor, optional
        shape ``[N]``, integer; attention contexts (default: one).
    sm_scale : float, optional
        Default ``1 / sqrt(d)``.
    chunk_segments : int
        Segments processed at once (bounds memory to ``chunk * Q * S`` floats per buffer).
    unseen_weight : float
        ``>= 0``; weight of the unseen-query error (:func:`unseen_query_error`, here with low-rank forms too: their
        per-row loss is measured on the reconstructed rows).
    unseen_prior : str
        ``"uniform"`` or ``"novelty"`` (:func:`retrieval_prior`).

    Returns
    -------
    ErrorEstimate
        ``first_order``, ``mass_delta`` and ``unseen`` of shape ``[N, len(menu)]`` (exactly 0 for the all-dense
        candidate) and ``mass_share`` of shape ``[N]``.
    """
    n, s, d = _check_kv(keys, values)
    check_int(chunk_segments, "chunk_segments", lo=1)
    q = flatten_queries(queries, n, d)
    scale = default_scale(d, sm_scale)
    labels, ng = normalize_group_ids(group_ids, n, keys.device)
    importance = _check_importance(importance, n, s, d, keys.device)
    weight = _check_unseen_weight(unseen_weight)
    lse, o, ctx, out = _context(q, keys, values, labels, ng, scale, chunk_segments)
    prior = retrieval_prior(values, labels, ng, unseen_prior)
    unseen = torch.zeros(n, len(menu), device=keys.device)
    denom_g = out.pow(2).sum(-1).mean(1)  # [ng]
    vscale = values.float().pow(2).sum(-1).mean() * 1e-12 + _EPS
    denom = (denom_g + vscale)[labels]
    rank = descending_rank(importance.token_mass)
    err = torch.zeros(n, len(menu), device=keys.device)
    dmass = torch.zeros(n, len(menu), device=keys.device)
    by_m: Dict[int, List[int]] = {}
    for i, c in enumerate(menu):
        by_m.setdefault(c.m, []).append(i)
    for a in range(0, n, chunk_segments):
        sl = slice(a, a + chunk_segments)
        qx, lab = q[sl], labels[sl]
        on, cx = out[lab], ctx[lab]
        a1 = torch.exp(lse[sl] - cx)
        u = a1[:, :, None] * (o[sl] - on)
        k_apx = _Approximations(keys[sl].float(), importance.k_chan_weight[sl])
        v_apx = _Approximations(values[sl].float(), importance.v_chan_weight[sl])
        raw: Dict[Tuple[int, int], torch.Tensor] = {}  # scores of dense/chan keys do not depend on the kept tokens
        for m, idxs in by_m.items():
            keep = rank[sl] < m
            k_apx.set_keep(keep)
            v_apx.set_keep(keep)
            for kopt in sorted({(menu[i].k_form, menu[i].k_param) for i in idxs}):
                if kopt[0] == fmt.FORM_LOWRANK:
                    sc = segment_scores(qx, k_apx.get(*kopt), scale)
                else:
                    if kopt not in raw:
                        raw[kopt] = segment_scores(qx, k_apx.get(*kopt), scale)
                    sc = raw[kopt]
                sc = sc.masked_fill(~keep[:, None, :], float("-inf"))
                p2 = torch.softmax(sc, dim=2)
                a2 = torch.exp(torch.logsumexp(sc, dim=2) - cx)
                dm = (a2 - a1).mean(1)
                k_loss = _row_loss(k_apx.x, k_apx.get(*kopt))
                for i in idxs:
                    c = menu[i]
                    if (c.k_form, c.k_param) == kopt:
                        v_rows = v_apx.get(c.v_form, c.v_param)
                        delta = a2[:, :, None] * (torch.bmm(p2, v_rows) - on) - u
                        err[sl, i] = delta.pow(2).sum(-1).mean(1) / denom[sl]
                        dmass[sl, i] = dm
                        loss = torch.where(keep, (k_loss + _row_loss(v_apx.x, v_rows)) * 0.5, 1.0)
                        unseen[sl, i] = (prior[sl] * loss).sum(1)
    dense_i = dense_index(menu, s)
    err[:, dense_i] = 0.0
    dmass[:, dense_i] = 0.0
    unseen[:, dense_i] = 0.0
    share = torch.exp(lse - ctx[labels]).mean(1)
    return ErrorEstimate(err, dmass, share, unseen, weight)


def _cumsum_in_order(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Cumulative sums of ``x`` (``[N, S, ...]``) over tokens in ``order``: ``[N, S, ...]``, row ``m - 1`` the sum
    of the first ``m``."""
    idx = order.view(order.shape + (1,) * (x.dim() - 2)).expand_as(x)
    return x.gather(1, idx).cumsum(1)


def estimate_errors_fast(
    keys: torch.Tensor,
    values: torch.Tensor,
    menu: Sequence[Candidate],
    importance: SegmentImportance,
    *,
    group_ids: Optional[torch.Tensor] = None,
    sm_scale: Optional[float] = None,
    unseen_weight: float = DEFAULT_UNSEEN_WEIGHT,
    unseen_prior: str = DEFAULT_UNSEEN_PRIOR,
) -> ErrorEstimate:
    """Cheap proxy of :func:`estimate_errors_exact`: first-order error for the *average* query, no attention recompute.

    Inputs are only the statistics: ``p_t`` the token's average attention probability (``token_mass``), the
    queries' mean ``q_bar`` and second moment ``w_c^2`` (``k_chan_weight``). With ``O = sum_t p_t v_t`` over the
    context (segments sharing a group id) and kept tokens ``T`` (top-``m`` by ``p_t``), the output change caused by
    a segment is, to first order, the sum of three vectors::

        sum_{t not in T} p_t (O - v_t)                       dropped tokens (their mass moves to the others)
        - sum_{t in T} p_t dv_t                              per-vector top-k of V (dv_t: the dropped elements)
        sum_{t in T} p_t sm_scale (q_bar . dk_t) (v_t - O)    per-vector top-k of K, through the scores

    and ``first_order`` is its squared norm plus the variance of the K term over queries,
    ``sum_{t in T} p_t^2 sm_scale^2 sum_c (w_c^2 - q_bar_c^2) dk_tc^2 ||v_t - O||^2``, divided by an estimate of
    ``E||O||^2`` (``||O||^2 + sum_t p_t^2 ||v_t - O||^2``). ``mass_delta`` is minus the dropped tokens' mass and
    ``mass_share`` the segment's ``sum_t p_t`` (renormalised as in :class:`ErrorEstimate`). All
    terms are prefix sums over tokens sorted by ``p_t``, so every candidate costs ``O(1)`` after ``O(N S d log d)``
    of sorting, and the squared norms of the three-vector sums come from one small Gram matrix per segment.

    Parameters
    ----------
    keys, values : torch.Tensor
        shape ``[N, S, d]``, fp32/fp16/bf16.
    menu : sequence of Candidate
        Dense and chan forms only.
    importance : SegmentImportance
        ``q_mean`` may be ``None`` (then taken as 0: the K error is all variance).
    group_ids : torch.Tensor, optional
        shape ``[N]``, integer; attention contexts (default: one).
    sm_scale : float, optional
    unseen_weight : float
        ``>= 0``; weight of :func:`unseen_query_error` in :attr:`ErrorEstimate.err`.
    unseen_prior : str
        ``"uniform"`` or ``"novelty"`` (:func:`retrieval_prior`).

    Returns
    -------
    ErrorEstimate
        ``first_order``, ``mass_delta`` and ``unseen`` of shape ``[N, len(menu)]``, ``mass_share`` of shape ``[N]``,
        fp32.
    """
    n, s, d = _check_kv(keys, values)
    importance = _check_importance(importance, n, s, d, keys.device)
    weight = _check_unseen_weight(unseen_weight)
    scale = default_scale(d, sm_scale)
    labels, ng = normalize_group_ids(group_ids, n, keys.device)
    return _estimate_fast(keys, values, tuple(menu), importance, labels, ng, scale, weight, unseen_prior)


def _chan_terms_torch(
    kf: torch.Tensor,
    vf: torch.Tensor,
    k_drop: torch.Tensor,
    v_drop: torch.Tensor,
    p: torch.Tensor,
    k_stats: torch.Tensor,
    c: torch.Tensor,
    kept: torch.Tensor,
    kept_p: torch.Tensor,
    scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_estimate_fast`'s channel terms of one top-``k`` setting in torch ops, the twin of
    :func:`~mosaickv_sglang.kernels.estimate_terms.chan_terms_fwd`: ``(coh [N, S], kvar [N, M], lost_k [N, S],
    vvec [N, M, d], lost_v [N, S])``. ``k_stats`` is ``[N, d, 3]`` (``q_bar``, ``var_q``, ones) and ``kept_p``
    ``kept * p``."""
    dk = kf * k_drop
    coh = p * scale * torch.bmm(dk, k_stats[:, :, :1]).squeeze(2)
    sums = torch.bmm(dk.pow_(2), k_stats[:, :, 1:])  # [N, S, 2]: sum_c var_q dk^2, sum_c dk^2
    del dk
    kvar = torch.bmm(kept, (p.pow(2) * scale**2 * sums[:, :, 0] * c)[:, :, None]).squeeze(2)
    dv = vf * v_drop
    vvec = torch.bmm(kept_p, dv)
    return coh, kvar, sums[:, :, 1], vvec, dv.pow_(2).sum(-1)


def _estimate_fast(
    keys: torch.Tensor,
    values: torch.Tensor,
    menu: Tuple[Candidate, ...],
    importance: SegmentImportance,
    labels: torch.Tensor,
    ng: int,
    scale: float,
    weight: float,
    unseen_prior: str,
    blocks: int = 1,
    order: Optional[torch.Tensor] = None,
) -> ErrorEstimate:
    """:func:`estimate_errors_fast` on checked inputs, contexts given as ``labels`` in ``[0, ng)`` (no host read;
    the menu's index tensors are cached per device, so steady-state calls copy nothing to the device).

    ``blocks``: the rows are that many independent problems of equal size (layers, contexts not shared between
    them); each gets exactly the estimate it would get alone. ``order``: the tokens by decreasing ``token_mass``
    (stable sort), if the caller already has them."""
    n, s, d = keys.shape
    dev = keys.device
    kf, vf = keys.float(), values.float()
    p = importance.token_mass.float()
    w2 = importance.k_chan_weight.float().pow(2)
    qbar = torch.zeros(n, d, device=dev) if importance.q_mean is None else importance.q_mean.float()
    var_q = (w2 - qbar.pow(2)).clamp(min=0)
    out_g = torch.zeros(ng, d, device=dev).index_add_(0, labels, torch.bmm(p[:, None, :], vf).squeeze(1))
    resid = vf - out_g[labels][:, None, :]  # v_t - O
    c = resid.pow(2).sum(-1)
    var_g = torch.zeros(ng, device=dev).index_add_(0, labels, (p.pow(2) * c).sum(1))
    energies = _sq_norms((kf, vf))  # [2, N, S]: ||k_t||^2, ||v_t||^2
    floor = energies[1].reshape(blocks, -1).mean(1)[:, None] * 1e-12  # one floor per block, as if planned alone
    norm = ((out_g.pow(2).sum(-1) + var_g)[labels].view(blocks, -1) + floor).view(n) + _EPS

    ks, ms, mt, mi, ki, _ = _fast_indices(menu, dev)
    if order is None:
        order = torch.sort(p, dim=1, descending=True, stable=True).indices
    tok_rank = torch.empty_like(order).scatter_(1, order, torch.arange(s, device=dev).expand(n, s))
    kept = (tok_rank[:, None, :] < mt[None, :, None]).float()  # [N, M, S]: the top m tokens, for each m of ms
    k_drop = _chan_drop_masks(kf, importance.k_chan_weight, ks)
    v_drop = _chan_drop_masks(vf, importance.v_chan_weight, ks)
    # Three families of vectors, each [N, len(ms), d] per option; the change of a candidate is delta = -a + b - c:
    #   a = sum_{dropped} p_t (v_t - O)             (dropped tokens)
    #   b = -sum_{kept} p_t s (q_bar . dk_t)(v_t - O)  (K top-k, dk_t the dropped elements, s = sm_scale)
    #   c = sum_{kept} p_t dv_t                      (V top-k, dv_t the dropped elements)
    # Token sums are products with the [N, M, S] keep masks, so no [N, S, d] product is materialised for them.
    # token weights of a and of every b, [N, 1 + len(ks), M, S], applied to v_t - O in one product
    dropped_p = (1.0 - kept) * p[:, None, :]
    on_resid = [dropped_p[:, None]]
    zero_vecs = torch.zeros(n, len(ms), d, device=dev)
    vvec = [zero_vecs]
    kvar = [torch.zeros(n, len(ms), device=dev)]
    lost: Tuple[List[torch.Tensor], List[torch.Tensor]] = ([], [])  # per side (K, V) and k: [N, S] lost energy
    if ks and _fused_estimate_terms(kf):
        from mosaickv_sglang.kernels.estimate_terms import chan_terms_fwd  # imports triton: only when used

        kc, vc, pc, cc, keptc = kf.contiguous(), vf.contiguous(), p.contiguous(), c.contiguous(), kept.contiguous()
        qc, varc = qbar.contiguous(), var_q.contiguous()

        def terms(k_drop_k: torch.Tensor, v_drop_k: torch.Tensor) -> Tuple[torch.Tensor, ...]:
            return chan_terms_fwd(kc, vc, k_drop_k.contiguous(), v_drop_k.contiguous(), pc, qc, varc, cc, keptc, scale)
    else:
        kept_p = kept * p[:, None, :]
        k_stats = torch.stack([qbar, var_q, torch.ones_like(qbar)], 2)  # [N, d, 3]

        def terms(k_drop_k: torch.Tensor, v_drop_k: torch.Tensor) -> Tuple[torch.Tensor, ...]:
            return _chan_terms_torch(kf, vf, k_drop_k, v_drop_k, p, k_stats, c, kept, kept_p, scale)

    coh = []
    for k in ks:
        coh_k, kv, lost_k, vv, lost_v = terms(k_drop.pop(k), v_drop.pop(k))
        coh.append(coh_k)
        kvar.append(kv)
        lost[0].append(lost_k)
        vvec.append(vv)
        lost[1].append(lost_v)
    chan_loss: Dict[Tuple[int, int], torch.Tensor] = {}  # (side, k) -> [N, S], for the unseen-query error
    if ks:  # both sides and every k at once (elementwise: the same values)
        frac = _lost_fraction(torch.stack(lost[0] + lost[1]).view(2, len(ks), n, s), energies[:, None])
        chan_loss = {(side, k): frac[side, i] for side in (0, 1) for i, k in enumerate(ks)}
        on_resid.append(kept[:, None] * -torch.stack(coh, 1)[:, :, None, :])  # b's weights, every k
    on_resid_t = torch.cat(on_resid, 1) if len(on_resid) > 1 else on_resid[0]
    ab = torch.bmm(on_resid_t.view(n, -1, s), resid)  # [N, M * (1 + nk), d]: a, then b of each k
    nm = len(ms)
    allv = torch.cat([ab[:, :nm], zero_vecs, ab[:, nm:]] + vvec, 1)
    gram = torch.bmm(allv, allv.transpose(1, 2))  # [a, b of k = 0 (zero), b of each k, c of k = 0 (zero), ...]
    # ||-a + b - c||^2 = aa + bb + cc - 2 ab + 2 ac - 2 bc: every candidate's terms in one gather, summed in order
    rows, cols = _gram_entries(menu, dev)
    sq_terms = gram[:, rows, cols].view(n, len(_GRAM_TERMS), len(menu)) * _gram_factors(dev)
    sq = sq_terms[:, 0]
    for i in range(1, len(_GRAM_TERMS)):
        sq = sq + sq_terms[:, i]
    err = (sq.clamp(min=0) + torch.stack(kvar, 1)[:, ki, mi]) / norm[:, None]
    dmass = -dropped_p.sum(2)[:, mi].clamp(min=0)
    dense_i = dense_index(menu, s)
    err[:, dense_i] = 0.0
    dmass[:, dense_i] = 0.0
    unseen = _unseen_error(keys, values, menu, importance, labels, ng, unseen_prior, order, chan_loss, energies[1])
    return ErrorEstimate(err.float(), dmass.float(), p.sum(1), unseen, weight)


ESTIMATE_TERMS_METHODS = ("torch", "kernel")
ESTIMATE_TERMS_ON_CUDA = "torch"
"""How :func:`_estimate_fast` computes its per-``k`` channel terms on CUDA tensors: ``"torch"``
(:func:`_chan_terms_torch`, about ten ops per ``k``, each a pass over ``[N, S, d]`` fp32 tensors) or ``"kernel"``
(:func:`~mosaickv_sglang.kernels.estimate_terms.chan_terms_fwd`, one pass; the same terms within fp32 rounding). A
server sets it at startup to the faster on its GPU, if the kernel's terms match (:mod:`mosaickv_sglang.
estimate_terms_select`). On the CPU: always torch."""


def _fused_estimate_terms(x: torch.Tensor) -> bool:
    """Whether :func:`_estimate_fast` takes the fused channel terms for ``x`` (its fp32 keys)."""
    if ESTIMATE_TERMS_ON_CUDA not in ESTIMATE_TERMS_METHODS:
        raise ValueError(f"ESTIMATE_TERMS_ON_CUDA: expected one of {ESTIMATE_TERMS_METHODS}, "
                         f"got {ESTIMATE_TERMS_ON_CUDA!r}")  # fmt: skip
    return ESTIMATE_TERMS_ON_CUDA == "kernel" and _channel_kernels_take(x)


@functools.lru_cache(maxsize=32)
def _fast_indices(
    menu: Tuple[Candidate, ...], device: torch.device
) -> Tuple[List[int], List[int], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Menu layout of :func:`_estimate_fast`: chan params ``ks``, token counts ``ms``, and on ``device`` the ``ms``
    tensor and each candidate's row in them (``mi``, ``ki``, ``vi``). Read-only: cached across calls."""
    chan_k = {c.k_param for c in menu if c.k_form == fmt.FORM_CHAN}
    ks = sorted(chan_k | {c.v_param for c in menu if c.v_form == fmt.FORM_CHAN})
    ms = sorted({c.m for c in menu})
    col = {0: 0, **{k: i + 1 for i, k in enumerate(ks)}}
    mpos = {m: i for i, m in enumerate(ms)}
    mt = torch.tensor(ms, device=device)
    mi = torch.tensor([mpos[c.m] for c in menu], device=device)
    ki = torch.tensor([col[c.k_param] if c.k_form == fmt.FORM_CHAN else 0 for c in menu], device=device)
    vi = torch.tensor([col[c.v_param] if c.v_form == fmt.FORM_CHAN else 0 for c in menu], device=device)
    return ks, ms, mt, mi, ki, vi


@functools.lru_cache(maxsize=32)
def _gram_entries(menu: Tuple[Candidate, ...], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Where :func:`_estimate_fast`'s Gram matrix holds the terms of each candidate's squared norm: rows and columns
    on ``device``, shape ``[len(_GRAM_TERMS) * len(menu)]`` int64, term by term (each for every candidate in order),
    with the vectors ``[a, b of each k, c of each k]`` in that order (``k = 0``, no top-k, first). Read-only: cached
    across calls."""
    ks, ms, _, mi, ki, vi = _fast_indices(menu, device)
    nm, nk = len(ms), len(ks) + 1
    rows = {"a": mi, "b": nm + ki * nm + mi, "c": nm + nk * nm + vi * nm + mi}
    return torch.cat([rows[x] for x, _ in _GRAM_TERMS]), torch.cat([rows[y] for _, y in _GRAM_TERMS])


_GRAM_TERMS = (("a", "a"), ("b", "b"), ("c", "c"), ("a", "b"), ("a", "c"), ("b", "c"))
_GRAM_FACTORS = (1.0, 1.0, 1.0, -2.0, 2.0, -2.0)  # of each term of _GRAM_TERMS in ||-a + b - c||^2


@functools.lru_cache(maxsize=32)
def _gram_factors(device: torch.device) -> torch.Tensor:
    """:data:`_GRAM_FACTORS` on ``device``, shape ``[len(_GRAM_FACTORS), 1]`` fp32. Read-only: cached across calls."""
    return torch.tensor(_GRAM_FACTORS, device=device)[:, None]


# --- optimisation ----------------------------------------------------------------------------------------------------
def choose_candidates(err: torch.Tensor, cand_bytes: torch.Tensor, budget_bytes: int) -> Tuple[torch.Tensor, float]:
    """Pick one candidate per segment minimising ``sum_n err[n, choice_n]`` s.t. ``sum_n bytes[choice_n] <= budget``.

    1. **Lagrangian sweep.** For ``lambda >= 0`` every segment picks ``argmin_c err[n, c] + lambda * bytes[c]``
       (ties: the lower candidate index); total bytes fall as ``lambda`` grows, so a bisection (in log space, to a
       relative width of 1e-12) brackets the smallest feasible ``lambda*``: ``hi`` fits, ``lo`` does not. The choice
       at ``hi`` is optimal for its own total bytes.
    2. **Greedy fix-up**, in two steps that spend the leftover bytes:

       a. the segments whose choice differs between ``lo`` and ``hi`` are the upgrades of slope ``lambda*`` (error
          saved per byte); they are taken in decreasing slope, then segment order, while they fit;
       b. then the single move (one segment, any candidate) with the largest error reduction that fits.

    Every move left after step 1 saves at most ``lambda* * extra bytes``, which is what makes the result's error
    non-increasing in the budget (a larger budget either reaches the next upgrade of slope ``lambda*``, saving more
    than any fix-up of the smaller leftover, or has the same Lagrangian solution and a superset of fix-up moves).
    More rounds of step b would use more leftover but lose that guarantee (it is a knapsack); the leftover is below
    one candidate step of one segment anyway.

    Parameters
    ----------
    err : torch.Tensor
        shape ``[N, C]``, float, ``>= 0``; ``inf`` marks a candidate a segment may not use (every row needs a
        finite entry; ``nan`` counts as ``inf``).
    cand_bytes : torch.Tensor
        shape ``[C]``, integer; bytes of each candidate.
    budget_bytes : int
        The budget for these ``N`` segments.

    Returns
    -------
    tuple
        ``(choice, lambda)``: ``choice`` shape ``[N]``, dtype ``torch.int64``; ``lambda`` the multiplier of step 1
        (0 when the minimal-error choice already fits).
    """
    check_tensor(err, "err", ndim=2)
    n, c = err.shape
    check_tensor(cand_bytes, "cand_bytes", shape=(c,), dtype=(torch.int32, torch.int64), device=err.device)
    check_int(budget_bytes, "budget_bytes", lo=0)
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=err.device), 0.0
    inf = float("inf")
    e = err.double()
    e = torch.where(torch.isnan(e), torch.full_like(e, inf), e)
    finite = torch.isfinite(e)
    if not bool(finite.any(1).all()):
        raise ValueError("err: expected a finite candidate in every row, got a row of inf/nan")
    b = cand_bytes.to(err.device, torch.float64)
    bl = cand_bytes.to(err.device, torch.int64)
    min_total = int(torch.where(finite, b.expand_as(e), torch.full_like(e, inf)).min(1).values.sum())
    if min_total > budget_bytes:
        raise ValueError(
            f"budget_bytes: expected >= {min_total} (every segment at its smallest candidate), got {budget_bytes}"
        )

    def pick(lam: float) -> torch.Tensor:
        return torch.argmin(e + lam * b, dim=1)

    def total(choice: torch.Tensor) -> int:
        return int(bl[choice].sum())

    choice = pick(0.0)
    if total(choice) <= budget_bytes:
        return choice, 0.0
    spread = float(e.masked_fill(~finite, 0).max() - e.masked_fill(~finite, inf).min())
    hi = max(spread, 0.0) + 1.0  # candidate bytes differ by >= 1: at hi every segment takes a smallest candidate
    for _ in range(64):
        if total(pick(hi)) <= budget_bytes:
            break
        hi *= 16.0
    lo = hi * 1e-30
    if total(pick(lo)) <= budget_bytes:
        return _fixup_single(e, bl, pick(lo), budget_bytes), lo
    lo, hi = _bracket(e, b, bl, budget_bytes, lo, hi)
    choice, alt = pick(hi), pick(lo)
    left = budget_bytes - total(choice)
    # (a) the tied threshold upgrades, by decreasing slope then segment index
    moved = torch.nonzero(alt != choice).squeeze(1)
    if moved.numel():
        extra = bl[alt[moved]] - bl[choice[moved]]
        gain = e[moved, choice[moved]] - e[moved, alt[moved]]
        slope = gain / extra.clamp(min=1).double()
        order = torch.argsort(slope, descending=True, stable=True)
        moved, extra = moved[order], extra[order]
        fits = torch.cumprod((extra.cumsum(0) <= left).long(), 0).bool()
        choice = choice.clone()
        choice[moved[fits]] = alt[moved[fits]]
    return _fixup_single(e, bl, choice, budget_bytes), hi


_GRID = 8  # lambdas tried at once per bracketing round: one host sync per round instead of per bisection step


def _bracket(
    e: torch.Tensor, b: torch.Tensor, bl: torch.Tensor, budget: int, lo: float, hi: float
) -> Tuple[float, float]:
    """Shrink ``[lo, hi]`` (``lo`` infeasible, ``hi`` feasible) to a relative width of 1e-12 by batched bisection:
    each round evaluates ``_GRID`` geometric points at once (shape ``[_GRID, N, C]``)."""
    for _ in range(64):
        if hi <= lo * (1.0 + 1e-12):
            break
        t = torch.arange(1, _GRID + 1, dtype=torch.float64, device=e.device) / (_GRID + 1)
        grid = torch.exp(math.log(lo) + t * (math.log(hi) - math.log(lo)))
        totals = bl[torch.argmin(e[None] + grid[:, None, None] * b, dim=2)].sum(1)  # [_GRID]
        feasible = (totals <= budget).tolist()
        pts = grid.tolist()
        first = next((i for i, f in enumerate(feasible) if f), None)  # totals fall as lambda grows
        new_lo = lo if first is None or first == 0 else pts[first - 1]
        new_hi = hi if first is None else pts[first]
        if first is None:
            new_lo = pts[-1]
        if (new_lo, new_hi) == (lo, hi):
            break
        lo, hi = new_lo, new_hi
    return lo, hi


def _fixup_single(e: torch.Tensor, b: torch.Tensor, choice: torch.Tensor, budget: int) -> torch.Tensor:
    """Step 2b of :func:`choose_candidates`: apply the one fitting move with the largest error reduction."""
    n = e.shape[0]
    left = budget - int(b[choice].sum())
    cur = e[torch.arange(n, device=e.device), choice][:, None]
    gain = torch.where((b[None, :] - b[choice][:, None] <= left) & (e < cur), cur - e, torch.zeros_like(e))
    flat = int(torch.argmax(gain.reshape(-1)))
    seg, cand = divmod(flat, e.shape[1])
    if float(gain[seg, cand]) <= 0:
        return choice
    choice = choice.clone()
    choice[seg] = cand
    return choice


# --- materialisation -------------------------------------------------------------------------------------------------
def _factors(
    x: torch.Tensor, keep: torch.Tensor, use: torch.Tensor, rank: torch.Tensor
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    idx = torch.nonzero(use).squeeze(1)
    if idx.numel() == 0:
        return None
    n, s, d = x.shape
    r = rank[idx]
    rmax = int(r.max())
    a, bmat = factors_from_svd(masked_svd(x[idx], keep[idx]), keep[idx], rmax)
    colmask = (torch.arange(rmax, device=x.device)[None, :] < r[:, None]).float()
    a_full = torch.zeros(n, s, rmax, device=x.device)
    b_full = torch.zeros(n, rmax, d, device=x.device)
    a_full[idx] = a * colmask[:, None, :]
    b_full[idx] = bmat * colmask[:, :, None]
    return a_full, b_full


def _build(
    keys: torch.Tensor,
    values: torch.Tensor,
    menu: Tuple[Candidate, ...],
    est: Optional[ErrorEstimate],
    importance: SegmentImportance,
    budget: int,
    always_dense: torch.Tensor,
) -> PlanResult:
    n, s, d = keys.shape
    dev = keys.device
    mt = _menu_tensors(menu, d, dev)
    dense_i = dense_index(menu, s)
    dense_b = dense_segment_bytes(s, d)
    fixed = int(always_dense.sum())
    free = torch.nonzero(~always_dense).squeeze(1)
    choice = torch.full((n,), dense_i, dtype=torch.int64, device=dev)
    est_err = torch.zeros(n, device=dev)
    lam = 0.0
    reach = fixed * dense_b + (n - fixed) * int(mt["bytes"].min())
    if budget < reach:
        raise ValueError(
            f"ratio/budget_bytes: expected a budget >= {reach} bytes (ratio <= {n * dense_b / max(reach, 1):.3f}) that "
            f"this menu can reach with {fixed} always-dense segments, got {budget} bytes; lower the ratio or extend "
            "the menu"
        )
    if est is not None and free.numel() and budget < n * dense_b:
        err = est.err
        sub, lam = choose_candidates(err[free], mt["bytes"], budget - fixed * dense_b)
        choice[free] = sub
        est_err = torch.where(always_dense, est_err, err.gather(1, choice[:, None]).squeeze(1).float())
    m = mt["m"][choice]
    keep = descending_rank(importance.token_mass) < m[:, None]
    k_form, k_param = mt["k_form"][choice], mt["k_param"][choice]
    v_form, v_param = mt["v_form"][choice], mt["v_param"][choice]
    i32 = torch.int32
    plan = fmt.SegmentPlan(
        token_keep=keep,
        k_form=k_form.to(i32),
        k_param=k_param.to(i32),
        v_form=v_form.to(i32),
        v_param=v_param.to(i32),
        k_chan_weight=importance.k_chan_weight.float().contiguous(),
        v_chan_weight=importance.v_chan_weight.float().contiguous(),
        k_factors=_factors(keys, keep, k_form == fmt.FORM_LOWRANK, k_param),
        v_factors=_factors(values, keep, v_form == fmt.FORM_LOWRANK, v_param),
        flags=(always_dense.to(i32) * fmt.FLAG_ALWAYS_READ),
    )
    result = PlanResult(plan, menu, choice, est_err, mt["bytes"][choice], budget, n * dense_b, lam)
    logger.debug(
        "planned %d segments: %d bytes of %d budget (ratio %.3f), lambda %.3g",
        n, result.total_bytes, budget, result.ratio, lam,
    )
    return result


def _prepare(
    keys: torch.Tensor,
    values: torch.Tensor,
    ratio: Optional[float],
    budget_bytes: Optional[int],
    always_dense: Optional[torch.Tensor],
) -> Tuple[int, int, int, int, torch.Tensor]:
    n, s, d = _check_kv(keys, values)
    budget = _resolve_budget(n * dense_segment_bytes(s, d), ratio, budget_bytes)
    return n, s, d, budget, _check_mask(always_dense, n, keys.device, "always_dense")


def _check_importance(imp: object, n: int, s: int, d: int, device: torch.device) -> SegmentImportance:
    if not isinstance(imp, SegmentImportance):
        raise TypeError(f"importance: expected SegmentImportance, got {type(imp).__name__}")
    check_tensor(imp.token_mass, "importance.token_mass", shape=(n, s), device=device)
    check_tensor(imp.k_chan_weight, "importance.k_chan_weight", shape=(n, d), device=device)
    return imp


def plan_exact(
    keys: torch.Tensor,
    values: torch.Tensor,
    queries: torch.Tensor,
    *,
    ratio: Optional[float] = None,
    budget_bytes: Optional[int] = None,
    importance: Optional[SegmentImportance] = None,
    group_ids: Optional[torch.Tensor] = None,
    always_dense: Optional[torch.Tensor] = None,
    menu: Optional[Sequence[Candidate]] = None,
    sm_scale: Optional[float] = None,
    chunk_segments: int = DEFAULT_CHUNK,
    unseen_weight: float = DEFAULT_UNSEEN_WEIGHT,
    unseen_prior: str = DEFAULT_UNSEEN_PRIOR,
) -> PlanResult:
    """Plan with the attention-output error on the observed queries (:func:`estimate_errors_exact`), lowrank included.

    Parameters
    ----------
    keys, values : torch.Tensor
        shape ``[N, S, d]``, fp32/fp16/bf16; dense segments.
    queries : torch.Tensor
        shape ``[N, W, G, d]``, float; recent queries of each segment's GQA group.
    ratio : float, optional
        Target compression ratio ``>= 1`` (budget = all-dense packed bytes / ratio). Exactly one of ``ratio`` and
        ``budget_bytes``.
    budget_bytes : int, optional
        Byte budget for these segments.
    importance : SegmentImportance, optional
        Token scores and channel weights (e.g. merged :class:`~mosaickv_sglang.importance.QueryStats`); default:
        measured from ``queries``.
    group_ids : torch.Tensor, optional
        shape ``[N]``, integer; attention contexts (same request, layer, KV head). Default: one context.
    always_dense : torch.Tensor, optional
        shape ``[N]``, dtype ``torch.bool``; sinks / recent window: kept dense, flagged always-read, not planned.
    menu : sequence of Candidate, optional
        Default :func:`~mosaickv_sglang.strategies.default_menu` with low-rank forms. Must contain the dense one.
    sm_scale : float, optional
        Default ``1 / sqrt(d)``.
    chunk_segments : int
        Segments processed at once by the estimator.
    unseen_weight : float
        ``>= 0``; weight of the error for queries unlike the observed ones (:func:`unseen_query_error`); default
        :data:`DEFAULT_UNSEEN_WEIGHT`, 0 for the observed queries alone.
    unseen_prior : str
        Which token that query retrieves (:func:`retrieval_prior`): ``"novelty"`` (default,
        :data:`DEFAULT_UNSEEN_PRIOR`) or ``"uniform"``.

    Raises
    ------
    ValueError
        Bad shapes or dtypes, or a budget below what the menu can reach.
    """
    n, s, d, budget, ad = _prepare(keys, values, ratio, budget_bytes, always_dense)
    items = _check_menu(menu, s, d, lowrank=True)
    _check_unseen_weight(unseen_weight)
    _check_unseen_prior(unseen_prior)
    flatten_queries(queries, n, d)
    imp = (
        importance_from_queries(keys, queries, group_ids=group_ids, sm_scale=sm_scale)
        if importance is None
        else _check_importance(importance, n, s, d, keys.device)
    )
    if budget >= n * dense_segment_bytes(s, d):  # everything fits dense: exact, skip the estimate
        est = None
    else:
        est = estimate_errors_exact(
            keys, values, queries, items, imp, group_ids=group_ids, sm_scale=sm_scale, chunk_segments=chunk_segments,
            unseen_weight=unseen_weight, unseen_prior=unseen_prior,
        )
    return _build(keys, values, items, est, imp, budget, ad)


def plan_fast(
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    ratio: Optional[float] = None,
    budget_bytes: Optional[int] = None,
    queries: Optional[torch.Tensor] = None,
    importance: Optional[SegmentImportance] = None,
    group_ids: Optional[torch.Tensor] = None,
    always_dense: Optional[torch.Tensor] = None,
    menu: Optional[Sequence[Candidate]] = None,
    sm_scale: Optional[float] = None,
    unseen_weight: float = DEFAULT_UNSEEN_WEIGHT,
    unseen_prior: str = DEFAULT_UNSEEN_PRIOR,
) -> PlanResult:
    """Plan with the cheap error proxy (:func:`estimate_errors_fast`): dense, chan, tok and 2-D forms, no SVD.

    Parameters are those of :func:`plan_exact`, except that ``queries`` is optional: give ``importance`` (the
    hot path: statistics already gathered) or ``queries`` (importance measured from them). With both, ``importance``
    is used. The menu defaults to :func:`~mosaickv_sglang.strategies.default_menu` without low-rank forms.
    """
    n, s, d, budget, ad = _prepare(keys, values, ratio, budget_bytes, always_dense)
    items = _check_menu(menu, s, d, lowrank=False)
    _check_unseen_weight(unseen_weight)
    _check_unseen_prior(unseen_prior)
    if importance is not None:
        imp = _check_importance(importance, n, s, d, keys.device)
    elif queries is not None:
        imp = importance_from_queries(keys, queries, group_ids=group_ids, sm_scale=sm_scale)
    else:
        raise ValueError("importance/queries: expected one of them, got neither")
    if budget >= n * dense_segment_bytes(s, d):
        est = None
    else:
        est = estimate_errors_fast(
            keys, values, items, imp, group_ids=group_ids, sm_scale=sm_scale, unseen_weight=unseen_weight,
            unseen_prior=unseen_prior,
        )
    return _build(keys, values, items, est, imp, budget, ad)


def _plan_restricted(
    keys: torch.Tensor,
    values: torch.Tensor,
    queries: torch.Tensor,
    estimator: str,
    axes: str,
    menu: Optional[Sequence[Candidate]],
    **kw: Any,
) -> PlanResult:
    if estimator not in ("exact", "fast"):
        raise ValueError(f"estimator: expected 'exact' or 'fast', got {estimator!r}")
    _, s, d = _check_kv(keys, values)
    items = restrict_menu(_check_menu(menu, s, d, lowrank=estimator == "exact"), axes, s)
    if estimator == "exact":
        return plan_exact(keys, values, queries, menu=items, **kw)
    return plan_fast(keys, values, queries=queries, menu=items, **kw)


def plan_token_only(
    keys: torch.Tensor,
    values: torch.Tensor,
    queries: torch.Tensor,
    *,
    ratio: Optional[float] = None,
    budget_bytes: Optional[int] = None,
    estimator: str = "exact",
    group_ids: Optional[torch.Tensor] = None,
    always_dense: Optional[torch.Tensor] = None,
    menu: Optional[Sequence[Candidate]] = None,
    sm_scale: Optional[float] = None,
    unseen_weight: float = DEFAULT_UNSEEN_WEIGHT,
    unseen_prior: str = DEFAULT_UNSEEN_PRIOR,
) -> PlanResult:
    """SnapKV-like baseline: token dropping only (``tok-m``, both sides dense), same budget and optimiser.

    ``m`` is chosen per segment by the same Lagrangian as the 2-D planner (a stronger baseline than one ``m`` for all
    segments), so a comparison isolates the value of the second axis. ``estimator``: ``"exact"`` or ``"fast"``.
    """
    return _plan_restricted(
        keys, values, queries, estimator, "token", menu,
        ratio=ratio, budget_bytes=budget_bytes, group_ids=group_ids, always_dense=always_dense, sm_scale=sm_scale,
        unseen_weight=unseen_weight, unseen_prior=unseen_prior,
    )


def plan_channel_only(
    keys: torch.Tensor,
    values: torch.Tensor,
    queries: torch.Tensor,
    *,
    ratio: Optional[float] = None,
    budget_bytes: Optional[int] = None,
    estimator: str = "exact",
    group_ids: Optional[torch.Tensor] = None,
    always_dense: Optional[torch.Tensor] = None,
    menu: Optional[Sequence[Candidate]] = None,
    sm_scale: Optional[float] = None,
    unseen_weight: float = DEFAULT_UNSEEN_WEIGHT,
    unseen_prior: str = DEFAULT_UNSEEN_PRIOR,
) -> PlanResult:
    """ThinK-like baseline: channel pruning only (every token kept, K and V dense or per-vector ``chan-k``).

    Uses the packed per-vector channel form (ThinK itself shares one channel set per head), the same budget and
    optimiser. ``estimator``: ``"exact"`` or ``"fast"``.
    """
    return _plan_restricted(
        keys, values, queries, estimator, "channel", menu,
        ratio=ratio, budget_bytes=budget_bytes, group_ids=group_ids, always_dense=always_dense, sm_scale=sm_scale,
        unseen_weight=unseen_weight, unseen_prior=unseen_prior,
    )


# --- reference reconstruction and evaluation -------------------------------------------------------------------------
def _side_reference(
    x: torch.Tensor,
    keep: torch.Tensor,
    form: torch.Tensor,
    param: torch.Tensor,
    weight: torch.Tensor,
    factors: Optional[Tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    xf = x.float()
    chan = descending_rank(chan_scores(x, weight)) < param.long()[:, None, None]
    out = torch.where((form == fmt.FORM_CHAN)[:, None, None], xf * chan, xf)
    if factors is not None:
        a, b = factors
        rmax = a.shape[2]
        cols = (torch.arange(rmax, device=x.device)[None, :] < param.long()[:, None]).to(a.dtype)
        rows = torch.bmm((a * cols[:, None, :]).float(), b.float())
        idx = (keep.long().cumsum(1) - 1).clamp(min=0)[:, :, None].expand(-1, -1, x.shape[2])
        out = torch.where((form == fmt.FORM_LOWRANK)[:, None, None], rows.gather(1, idx), out)
    return out * keep[:, :, None]


def apply_plan_reference(
    keys: torch.Tensor, values: torch.Tensor, plan: fmt.SegmentPlan
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The segments as the decode kernels see them after ``pack`` (plain PyTorch, fp32).

    Parameters
    ----------
    keys, values : torch.Tensor
        shape ``[N, S, d]``, fp32/fp16/bf16; the dense segments the plan was made for.
    plan : SegmentPlan

    Returns
    -------
    tuple of torch.Tensor
        ``(K_hat, V_hat, row_mask)``: ``[N, S, d]`` fp32 each (dropped rows zero, chan rows with only their top-k
        channels by ``|x_c| * w_c``, low-rank rows ``A[:m, :r] @ B[:r]`` placed at the kept positions) and the
        kept-row mask ``[N, S]`` bool. Values are not rounded to the 16-bit arena dtype.
    """
    n, s, d = _check_kv(keys, values)
    if not isinstance(plan, fmt.SegmentPlan):
        raise TypeError(f"plan: expected SegmentPlan, got {type(plan).__name__}")
    if (plan.num_segments, plan.seg_size, plan.head_dim) != (n, s, d):
        raise ValueError(
            f"plan: expected (N, S, d) = {(n, s, d)} like K, got {(plan.num_segments, plan.seg_size, plan.head_dim)}"
        )
    keep = plan.token_keep
    k_hat = _side_reference(keys, keep, plan.k_form, plan.k_param, plan.k_chan_weight, plan.k_factors)
    v_hat = _side_reference(values, keep, plan.v_form, plan.v_param, plan.v_chan_weight, plan.v_factors)
    return k_hat, v_hat, keep.clone()


def attention_output_error(
    keys: torch.Tensor,
    values: torch.Tensor,
    keys_hat: torch.Tensor,
    values_hat: torch.Tensor,
    row_mask: torch.Tensor,
    queries: torch.Tensor,
    *,
    group_ids: Optional[torch.Tensor] = None,
    sm_scale: Optional[float] = None,
) -> torch.Tensor:
    """Measured relative error of the attention output of whole contexts, dense vs approximated.

    For each context (segments sharing a group id) and query ``j``: full softmax attention over all its segments,
    ``O_j`` with the dense rows and ``O'_j`` with the approximated kept rows; the result is
    ``mean_j ||O_j - O'_j||^2 / mean_j ||O_j||^2`` per context.

    Parameters
    ----------
    keys, values, keys_hat, values_hat : torch.Tensor
        shape ``[N, S, d]``, float.
    row_mask : torch.Tensor
        shape ``[N, S]``, dtype ``torch.bool``; rows present in the approximation.
    queries : torch.Tensor
        shape ``[N, W, G, d]``, float; e.g. held-out queries (equal within a context).
    group_ids : torch.Tensor, optional
        shape ``[N]``, integer.

    Returns
    -------
    torch.Tensor
        shape ``[num_groups]``, dtype ``torch.float32``.
    """
    n, s, d = _check_kv(keys, values)
    check_tensor(keys_hat, "keys_hat", shape=(n, s, d), dtype=FLOAT_DTYPES, device=keys.device)
    check_tensor(values_hat, "values_hat", shape=(n, s, d), dtype=FLOAT_DTYPES, device=keys.device)
    check_tensor(row_mask, "row_mask", shape=(n, s), dtype=torch.bool, device=keys.device)
    q = flatten_queries(queries, n, d)
    scale = default_scale(d, sm_scale)
    labels, ng = normalize_group_ids(group_ids, n, keys.device)

    def context_out(k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        sc = segment_scores(q, k, scale)
        if mask is not None:
            sc = sc.masked_fill(~mask[:, None, :], float("-inf"))
        lse = torch.logsumexp(sc, dim=2)
        o = torch.bmm(torch.softmax(sc, dim=2).nan_to_num(0.0), v.float())
        w = torch.exp(lse - group_logsumexp(lse, labels, ng)[labels])
        return torch.zeros(ng, q.shape[1], d, device=keys.device).index_add_(0, labels, w[:, :, None] * o)

    ref = context_out(keys, values, None)
    approx = context_out(keys_hat, values_hat, row_mask)
    return ((ref - approx).pow(2).sum(-1).mean(1) / ref.pow(2).sum(-1).mean(1).clamp(min=_EPS)).float()
