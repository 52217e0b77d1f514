# SPDX-License-Identifier: Apache-2.0
"""The fast planner for all layers of one seal in one call, with a constant number of host reads.

:func:`plan_fast_layers` gives, for each of ``L`` layers, the plan :func:`~mosaickv_sglang.planner.plan_fast` (its
plain reference, one call and about fifteen host synchronisations per layer) gives for that layer alone, with the
same per-layer byte budget:

* the error estimate runs on the layers' segments stacked (contexts kept apart per layer; chunks of whole layers,
  at most ``max_segments`` segments and ``max_chunk_bytes`` of the largest temporary, bound the memory), with the
  contexts as labels computed on the host (no ``unique``);
* one :func:`~mosaickv_sglang.lagrange.choose_candidates_batched` call solves every layer's Lagrangian problem
  (one ``lambda`` per layer) on the device;
* one :class:`~mosaickv_sglang.kernels.format.SegmentPlan` of all layers is built (its checks read values once)
  and cut into per-layer views.

Host metadata (budgets, always-dense mask, context ids) reaches the device in one copy; the results' ``lambda``
come back in one read.

With ``MOSAICKV_COMPILE_PLANNER=1`` (experimental, default off) the device half (:func:`plan_on_device`, one graph for
:func:`torch.compile`) runs compiled: TorchInductor fuses its some 600 small kernels a call. Each new shape compiles on
its first call, which must not be under CUDA-graph capture (seal graphs warm up first).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from mosaickv_sglang.importance import FLOAT_DTYPES, SegmentImportance, default_scale, flatten_queries
from mosaickv_sglang.importance import importance_from_labels, query_stats, uniform_importance
from mosaickv_sglang.kernels import format as fmt
from mosaickv_sglang.config import flag_env
from mosaickv_sglang.kernels._checks import check_int, check_tensor
from mosaickv_sglang.lagrange import choose_candidates_batched
from mosaickv_sglang.planner import (
    DEFAULT_UNSEEN_PRIOR,
    DEFAULT_UNSEEN_WEIGHT,
    ErrorEstimate,
    PlanResult,
    _check_menu,
    _check_unseen_prior,
    _check_unseen_weight,
    _estimate_fast,
    _menu_tensors,
)
from mosaickv_sglang.pool.device import to_device
from mosaickv_sglang.strategies import Candidate, dense_index
from mosaickv_sglang.strategies.base import check_segment_shape, dense_segment_bytes

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_CHUNK_BYTES", "DEFAULT_MAX_SEGMENTS", "LayersCall", "host_meta", "host_meta_size",
           "needs_estimate", "plan_fast_layers", "plan_on_device", "prepare_layers"]

DEFAULT_MAX_SEGMENTS = 8192
"""Segments estimated at once (whole layers; at least one layer): the estimator holds a few hundred bytes per
segment, token and channel, so 8192 segments of 64 tokens at d = 128 take a few GiB."""

DEFAULT_MAX_CHUNK_BYTES = 256 << 20
"""Bytes of the estimator's largest temporary (8 bytes per segment, token and channel: the int64 channel keys) in one
chunk: a seal needs no large transient allocation on a device the server has mostly filled (1024 segments of 64
tokens at d = 128 per layer: four layers a chunk)."""

_CHUNK_BYTES_PER_ELEMENT = 8


@functools.lru_cache(maxsize=32)
def _cached_menu_tensors(menu: Tuple[Candidate, ...], d: int, device: torch.device) -> Dict[str, torch.Tensor]:
    return _menu_tensors(menu, d, device)


_PLAN_COLUMNS = ("m", "k_form", "k_param", "v_form", "v_param")


@functools.lru_cache(maxsize=32)
def _plan_columns(menu: Tuple[Candidate, ...], d: int, device: torch.device) -> torch.Tensor:
    """The :data:`_PLAN_COLUMNS` of each candidate, shape ``[5, len(menu)]`` int32 (one ``index_select`` gives
    every segment's). Read-only: cached across calls."""
    mt = _cached_menu_tensors(menu, d, device)
    return torch.stack([mt[name] for name in _PLAN_COLUMNS]).to(torch.int32)


def _select_columns(columns: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """``columns[:, choice]`` in one gather, each row starting 16-byte aligned: the whole plan's vectors, which a seal
    packs in one launch (``pack_layers_fwd``), are then aligned, the pack variant the warmup compiles."""
    n = choice.numel()
    pad = -n % 4
    if pad:
        choice = torch.nn.functional.pad(choice, (0, pad))
    return columns.index_select(1, choice)[:, :n]


@functools.lru_cache(maxsize=32)
def _dense_only(c: int, dense_i: int, device: torch.device) -> torch.Tensor:
    """The errors of a segment that may only stay dense: shape ``[c]``, ``inf`` but 0 for candidate ``dense_i``.
    Read-only: cached across calls."""
    out = torch.full((c,), float("inf"), device=device)
    out[dense_i] = 0.0
    return out


Layers = Union[Sequence[torch.Tensor], torch.Tensor]
"""Per-layer segments: one ``[N, S, d]`` tensor per layer, or all layers stacked as one ``[L, N, S, d]`` tensor."""


def _check_layers(keys: Layers, values: Layers) -> Tuple[int, int, int, int]:
    if isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor):
        check_tensor(keys, "keys", ndim=4, dtype=FLOAT_DTYPES)
        check_tensor(values, "values", shape=tuple(keys.shape), dtype=FLOAT_DTYPES, device=keys.device)
        if keys.shape[0] == 0:
            raise ValueError("keys: expected at least one layer, got none")
        nl, n, s, d = keys.shape
        check_segment_shape(s, d, s_name="keys (dim 2, segment size)", d_name="keys (dim 3, head_dim)")
        return nl, n, s, d
    if not isinstance(keys, (list, tuple)) or not isinstance(values, (list, tuple)) or len(keys) != len(values):
        raise ValueError(
            f"keys/values: expected two sequences of one tensor per layer of equal length (or two tensors of shape "
            f"[L, N, S, d]), got {type(keys).__name__} and {type(values).__name__}"
        )
    if not keys:
        raise ValueError("keys: expected at least one layer, got none")
    check_tensor(keys[0], "keys[0]", ndim=3, dtype=FLOAT_DTYPES)
    shape, dev = tuple(keys[0].shape), keys[0].device
    for i, (k, v) in enumerate(zip(keys, values)):
        check_tensor(k, f"keys[{i}]", shape=shape, dtype=FLOAT_DTYPES, device=dev)
        check_tensor(v, f"values[{i}]", shape=shape, dtype=FLOAT_DTYPES, device=dev)
    n, s, d = shape
    check_segment_shape(s, d, s_name="keys (dim 1, segment size)", d_name="keys (dim 2, head_dim)")
    return len(keys), n, s, d


def _host_mask(mask: Optional[np.ndarray], n: int, name: str) -> np.ndarray:
    if mask is None:
        return np.zeros(n, dtype=bool)
    if not isinstance(mask, np.ndarray) or mask.dtype != np.bool_ or mask.shape != (n,):
        raise ValueError(f"{name}: expected a numpy bool array of shape [{n}], got {_describe(mask)}")
    return mask


def _host_labels(group_ids: Optional[np.ndarray], n: int) -> Tuple[np.ndarray, int]:
    if group_ids is None:
        return np.zeros(n, dtype=np.int64), 1
    if not isinstance(group_ids, np.ndarray) or group_ids.dtype.kind not in "iu" or group_ids.shape != (n,):
        raise ValueError(f"group_ids: expected a numpy integer array of shape [{n}], got {_describe(group_ids)}")
    uniq, labels = np.unique(group_ids, return_inverse=True)
    return labels.astype(np.int64).reshape(n), int(uniq.size)


def _run_labels(labels: np.ndarray, ng: int, per: int) -> np.ndarray:
    """The contexts of the rows of ``per`` consecutive layers, kept apart per layer: layer ``i``'s ``labels`` plus
    ``i * ng``, shape ``[per * N]`` (the first ``l * N`` are those of ``l`` layers)."""
    return (labels[None, :] + ng * np.arange(per, dtype=np.int64)[:, None]).reshape(-1)


def _cat_estimates(parts: Sequence[ErrorEstimate]) -> ErrorEstimate:
    """The estimates of consecutive chunks of rows as one (its :attr:`~ErrorEstimate.err` in one pass, not a few
    ops per chunk)."""
    if len(parts) == 1:
        return parts[0]

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(p, name) for p in parts], 0)

    fields = (cat("first_order"), cat("mass_delta"), cat("mass_share"), cat("unseen"))
    return ErrorEstimate(*fields, unseen_weight=parts[0].unseen_weight)


def _describe(x: object) -> str:
    if isinstance(x, np.ndarray):
        return f"numpy {x.dtype} of shape {list(x.shape)}"
    return type(x).__name__


def _to_device(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """One host-to-device copy; asynchronous from page-locked memory on CUDA (:func:`~mosaickv_sglang.pool.device.
    to_device`)."""
    return to_device(torch.from_numpy(host), device)


def _layer_importance(
    keys: Layers,
    queries: Optional[Sequence[Optional[torch.Tensor]]],
    importance: Optional[Sequence[SegmentImportance]],
    labels: torch.Tensor,
    ng: int,
    scale: float,
    per: int,
    run_labels: Optional[torch.Tensor] = None,
) -> List[SegmentImportance]:
    """Each layer's importance, in order; runs of up to ``per`` consecutive layers whose queries have one shape in
    one call (contexts kept apart per layer), so each entry may hold several layers' rows. ``run_labels``: the
    contexts of ``per`` layers' rows (:func:`_run_labels`), if the caller already has them on the device."""
    nl = len(keys)
    n, s, d = keys[0].shape
    dev = keys[0].device
    if (queries is None) == (importance is None):
        raise ValueError("queries/importance: expected exactly one of them (a sequence per layer), got "
                         f"{'both' if queries is not None else 'neither'}")  # fmt: skip
    given = queries if queries is not None else importance
    if not isinstance(given, (list, tuple)) or len(given) != nl:
        name = "queries" if queries is not None else "importance"
        raise ValueError(f"{name}: expected a sequence of {nl} entries (one per layer), got {_describe(given)}")
    out = []
    i = 0
    while i < nl:
        if queries is not None and queries[i] is not None:
            j = i + 1
            while (j < nl and j - i < per and isinstance(queries[j], torch.Tensor)
                   and queries[j].shape == queries[i].shape):  # fmt: skip
                j += 1
            shared = _queries_of_head_views(queries[i:j], n, d)
            if shared is None:
                q, stats = torch.cat([flatten_queries(queries[t], n, d, f"queries[{t}]") for t in range(i, j)]), None
            else:
                q, stats = shared
            if run_labels is not None:
                lab = run_labels[: (j - i) * n]
            else:
                lab = (labels[None, :] + ng * torch.arange(j - i, device=dev)[:, None]).reshape(-1)
            out.append(importance_from_labels(_cat_float(keys[i:j]), q, lab, ng * (j - i), scale, stats))
            i = j
            continue
        if importance is not None:
            imp = importance[i]
            if not isinstance(imp, SegmentImportance):
                raise TypeError(f"importance[{i}]: expected SegmentImportance, got {type(imp).__name__}")
            check_tensor(imp.token_mass, f"importance[{i}].token_mass", shape=(n, s), device=dev)
            check_tensor(imp.k_chan_weight, f"importance[{i}].k_chan_weight", shape=(n, d), device=dev)
            if imp.q_mean is None:
                imp = SegmentImportance(imp.token_mass, imp.k_chan_weight, imp.v_chan_weight, torch.zeros(n, d,
                                        device=dev))  # fmt: skip
        else:
            imp = uniform_importance(n, s, d, dev)
        out.append(imp)
        i += 1
    return out


def _queries_of_head_views(
    queries: Sequence[torch.Tensor], n: int, d: int
) -> Optional[Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]]:
    """When every layer's queries are a view of one ``[H, W, G, d]`` per page (``[P, H, W, G, d]``, stride 0 over
    pages, as the sealer passes them) and all have one shape: the queries flattened per segment (``[L' * n, W * G,
    d]`` fp32, what :func:`~mosaickv_sglang.importance.flatten_queries` of each layer, concatenated, gives: one copy
    instead of a copy per layer and their concatenation), and their
    :func:`~mosaickv_sglang.importance.query_stats` measured once per head (``[L' * n, d]`` each: half of the
    importance pass's memory traffic read the per-segment copy twice). ``None`` otherwise."""
    shape = queries[0].shape
    if not all(q.dim() == 5 and q.stride(0) == 0 and q.shape == shape for q in queries):
        return None
    pages, h = shape[:2]
    if pages * h != n or shape[-1] != d:
        return None
    layers = len(queries)
    heads = torch.stack([q[0] for q in queries]).reshape(layers * h, -1, d).float()  # [L' * H, W * G, d]
    w, mean = query_stats(heads)
    stats = tuple(x.view(layers, 1, h, d).expand(-1, pages, -1, -1).reshape(layers * n, d) for x in (w, mean))
    per_segment = heads.view(layers, 1, h, -1, d).expand(-1, pages, -1, -1, -1).reshape(layers * n, -1, d)
    return per_segment, stats


def _cat_float(parts: Layers) -> torch.Tensor:
    """``torch.cat(parts).float()`` in one copy (slice copies: ``cat`` into an ``out`` of another dtype is not a path
    every backend has); of stacked layers (``[L', N, S, d]``), their rows as contiguous fp32 ``[L' * N, S, d]``: no
    copy at all when they already are fp32 and contiguous (the estimator never writes its inputs)."""
    if isinstance(parts, torch.Tensor):
        return parts.reshape((-1,) + tuple(parts.shape[2:])).to(torch.float32).contiguous()
    out = torch.empty((sum(p.shape[0] for p in parts),) + tuple(parts[0].shape[1:]), dtype=torch.float32,
                      device=parts[0].device)  # fmt: skip
    start = 0
    for p in parts:
        out[start : start + p.shape[0]].copy_(p)
        start += p.shape[0]
    return out


def _stack_importance(parts: Sequence[SegmentImportance]) -> SegmentImportance:
    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(p, name).float() for p in parts], 0)

    return SegmentImportance(cat("token_mass"), cat("k_chan_weight"), cat("v_chan_weight"), cat("q_mean"))


def plan_fast_layers(
    keys: Layers,
    values: Layers,
    *,
    budget_bytes: Sequence[int],
    queries: Optional[Sequence[Optional[torch.Tensor]]] = None,
    importance: Optional[Sequence[SegmentImportance]] = None,
    group_ids: Optional[np.ndarray] = None,
    always_dense: Optional[np.ndarray] = None,
    menu: Optional[Sequence[Candidate]] = None,
    sm_scale: Optional[float] = None,
    unseen_weight: float = DEFAULT_UNSEEN_WEIGHT,
    unseen_prior: str = DEFAULT_UNSEEN_PRIOR,
    max_segments: int = DEFAULT_MAX_SEGMENTS,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> List[PlanResult]:
    """:func:`~mosaickv_sglang.planner.plan_fast` of each layer, all layers in one call (see the module docstring).

    Parameters
    ----------
    keys, values : sequence of torch.Tensor, or torch.Tensor
        One tensor per layer, each shape ``[N, S, d]``, fp32/fp16/bf16, all on one device; the same ``N`` segments
        (e.g. the pages being sealed) in every layer. Or all layers as one tensor each, shape ``[L, N, S, d]``: then
        the estimator's chunks of layers are views (fp32) or one cast each, not one copy per layer.
    budget_bytes : sequence of int
        One byte budget per layer, ``>= 0``.
    queries : sequence of torch.Tensor or None, optional
        Per layer: shape ``[N, W, G, d]`` (``W`` may differ between layers), the recent queries of each segment's
        GQA group, or ``None`` (no query seen yet: every token and channel alike); or ``[P, H, W, G, d]`` with ``P *
        H == N`` (an expanded view: copied per chunk, see :func:`~mosaickv_sglang.importance.flatten_queries`).
        Exactly one of ``queries`` and ``importance``.
    importance : sequence of SegmentImportance, optional
        Per layer: the segments' statistics.
    group_ids : numpy.ndarray, optional
        shape ``[N]``, integer, on the host; attention contexts, the same in every layer (contexts are never
        shared between layers). Default: one context per layer.
    always_dense : numpy.ndarray, optional
        shape ``[N]``, bool, on the host; segments kept dense and flagged always-read in every layer.
    menu, sm_scale, unseen_weight, unseen_prior
        As in :func:`~mosaickv_sglang.planner.plan_fast`.
    max_segments : int
        ``>= 1``; segments estimated at once (whole layers, at least one).
    max_chunk_bytes : int
        ``>= 1``; bytes of the estimator's largest temporary at once (whole layers, at least one).

    Returns
    -------
    list of PlanResult
        One per layer, as :func:`~mosaickv_sglang.planner.plan_fast` returns it; their tensors are views into
        tensors shared by all layers.

    Raises
    ------
    ValueError
        Bad shapes or dtypes, or a budget below what the menu can reach with the always-dense segments.
    """
    st, budgets, ad, labels_h = prepare_layers(keys, values, budget_bytes, group_ids, always_dense, menu, sm_scale,
                                               unseen_weight, unseen_prior, max_segments, max_chunk_bytes)  # fmt: skip
    meta = _to_device(host_meta(st, labels_h, ad, budgets), keys[0].device)
    plan, choice, est_err, seg_bytes, lam = plan_on_device(st, keys, values, queries, importance, meta,
                                                           must_plan=needs_estimate(st, ad, budgets))  # fmt: skip
    nl, n = st.layers, st.segments
    dense_b = dense_segment_bytes(st.seg_size, st.head_dim)
    results = [
        PlanResult(plan.segment_slice(i * n, (i + 1) * n), st.menu, choice[i], est_err[i], seg_bytes[i], budgets[i],
                   n * dense_b, lam[i])  # fmt: skip
        for i in range(nl)
    ]
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("planned %d layers x %d segments, lambdas %s", nl, n, lam.tolist())
    return results


@dataclasses.dataclass(frozen=True)
class LayersCall:
    """What fixes the shapes and the code path of one :func:`plan_fast_layers` call's device work
    (:func:`plan_on_device`): everything but the tensors' values and the host metadata's (:func:`host_meta`)."""

    layers: int
    segments: int
    seg_size: int
    head_dim: int
    per: int  # layers a chunk of the estimator
    contexts: int  # contexts per layer
    menu: Tuple[Candidate, ...]
    scale: float
    unseen_weight: float
    unseen_prior: str


def prepare_layers(
    keys: Layers,
    values: Layers,
    budget_bytes: Sequence[int],
    group_ids: Optional[np.ndarray],
    always_dense: Optional[np.ndarray],
    menu: Optional[Sequence[Candidate]],
    sm_scale: Optional[float],
    unseen_weight: float,
    unseen_prior: str,
    max_segments: int,
    max_chunk_bytes: int,
) -> Tuple[LayersCall, List[int], np.ndarray, np.ndarray]:
    """The host half of :func:`plan_fast_layers`: its checks, and ``(call, budgets, always_dense, context labels)``
    (the last two per segment, on the host)."""
    nl, n, s, d = _check_layers(keys, values)
    if not isinstance(budget_bytes, (list, tuple)) or len(budget_bytes) != nl:
        raise ValueError(f"budget_bytes: expected a sequence of {nl} ints (one per layer), got "
                         f"{_describe(budget_bytes)}")  # fmt: skip
    budgets = [check_int(b, f"budget_bytes[{i}]", lo=0) for i, b in enumerate(budget_bytes)]
    items = _check_menu(menu, s, d, lowrank=False)
    weight = _check_unseen_weight(unseen_weight)
    prior = _check_unseen_prior(unseen_prior)
    scale = default_scale(d, sm_scale)
    check_int(max_segments, "max_segments", lo=1)
    check_int(max_chunk_bytes, "max_chunk_bytes", lo=1)
    ad = _host_mask(always_dense, n, "always_dense")
    labels_h, ng = _host_labels(group_ids, n)

    dense_b = dense_segment_bytes(s, d)
    fixed = int(np.count_nonzero(ad))
    reach = fixed * dense_b + (n - fixed) * min(c.bytes(d) for c in items)
    for i, budget in enumerate(budgets):
        if budget < reach:
            raise ValueError(
                f"budget_bytes[{i}]: expected a budget >= {reach} bytes (ratio <= {n * dense_b / max(reach, 1):.3f})"
                f" that this menu can reach with {fixed} always-dense segments, got {budget} bytes; lower the ratio "
                "or extend the menu"
            )
    per = max(1, min(nl, max_segments // max(n, 1), max_chunk_bytes // (max(n, 1) * s * d * _CHUNK_BYTES_PER_ELEMENT)))
    return LayersCall(nl, n, s, d, per, ng, items, scale, weight, prior), budgets, ad, labels_h


def needs_estimate(call: LayersCall, always_dense: np.ndarray, budgets: Sequence[int]) -> bool:
    """Whether any segment of any layer has a choice to make (else every one stays dense, with no estimate)."""
    n = call.segments
    dense_b = dense_segment_bytes(call.seg_size, call.head_dim)
    return int(np.count_nonzero(always_dense)) < n and any(b < n * dense_b for b in budgets)


def host_meta(call: LayersCall, labels: np.ndarray, always_dense: np.ndarray, budgets: Sequence[int]) -> np.ndarray:
    """The host metadata :func:`plan_on_device` reads, one int64 array (one copy to the device): the contexts of
    ``call.per`` layers' rows (:func:`_run_labels`), the always-dense mask, the layers' budgets."""
    return np.concatenate([_run_labels(labels, call.contexts, call.per), always_dense.astype(np.int64),
                           np.asarray(budgets, dtype=np.int64)])  # fmt: skip


def host_meta_size(call: LayersCall) -> int:
    """Entries of :func:`host_meta`'s array."""
    return (call.per + 1) * call.segments + call.layers


COMPILE_PLANNER_ENV = "MOSAICKV_COMPILE_PLANNER"


def compile_planner_enabled() -> bool:
    """``MOSAICKV_COMPILE_PLANNER``: ``1`` runs :func:`plan_on_device` compiled (see the module docstring)."""
    return flag_env(COMPILE_PLANNER_ENV)


@functools.lru_cache(maxsize=None)
def _compiled_plan_on_device() -> Callable[..., Tuple[fmt.SegmentPlan, torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor]]:  # fmt: skip
    return torch.compile(plan_on_device)


def plan_on_device(
    call: LayersCall,
    keys: Layers,
    values: Layers,
    queries: Optional[Sequence[Optional[torch.Tensor]]],
    importance: Optional[Sequence[SegmentImportance]],
    meta: torch.Tensor,
    must_plan: bool,
) -> Tuple[fmt.SegmentPlan, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The device half of :func:`plan_fast_layers`, with no host read and no host-to-device copy (a CUDA graph can
    capture it): ``(plan of all layers' segments, choice [L, N], estimated error [L, N], segment bytes [L, N],
    lambda [L])``. ``meta``: :func:`host_meta` on the device. Compiled with ``MOSAICKV_COMPILE_PLANNER=1``."""
    if not torch.compiler.is_compiling() and compile_planner_enabled():
        return _compiled_plan_on_device()(call, keys, values, queries, importance, meta, must_plan)
    nl, n, s, d, per, ng = call.layers, call.segments, call.seg_size, call.head_dim, call.per, call.contexts
    items = call.menu
    dev = keys[0].device
    dense_b = dense_segment_bytes(s, d)
    run_labels, ad_t, budget_t = meta[: per * n], meta[per * n : (per + 1) * n].bool(), meta[(per + 1) * n :]
    mt = _cached_menu_tensors(items, d, dev)
    dense_i = dense_index(items, s)

    imp = _stack_importance(_layer_importance(keys, queries, importance, run_labels[:n], ng, call.scale, per,
                                              run_labels))  # fmt: skip
    # by decreasing mass (stable): the estimator's token order and the plans' keep masks
    order = torch.sort(imp.token_mass, dim=1, descending=True, stable=True).indices
    if must_plan:
        ests = []
        for a in range(0, nl, per):
            b = min(nl, a + per)
            rows = slice(a * n, b * n)
            part = SegmentImportance(imp.token_mass[rows], imp.k_chan_weight[rows], imp.v_chan_weight[rows],
                                     imp.q_mean[rows])  # fmt: skip
            ests.append(_estimate_fast(_cat_float(keys[a:b]), _cat_float(values[a:b]), items, part,
                                       run_labels[: (b - a) * n], ng * (b - a), call.scale, call.unseen_weight,
                                       call.unseen_prior, blocks=b - a, order=order[rows]))  # fmt: skip
        err = _cat_estimates(ests).err.view(nl, n, len(items))
    else:
        err = torch.zeros(nl, n, len(items), device=dev)
    # Segments that must stay dense (sinks; every segment of a layer whose budget fits all-dense): dense or nothing.
    dense_only = _dense_only(len(items), dense_i, dev)
    stay = ad_t[None, :] | (budget_t >= n * dense_b)[:, None]
    err = torch.where(stay[:, :, None], dense_only, err)
    choice, lam = choose_candidates_batched(err, mt["bytes"], budget_t)
    est_err = err.gather(2, choice[..., None]).squeeze(2).float()

    cols = dict(zip(_PLAN_COLUMNS, _select_columns(_plan_columns(items, d, dev), choice.reshape(-1))))
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(s, device=dev).expand(nl * n, s))
    i32 = torch.int32
    plan = fmt.SegmentPlan(
        token_keep=rank < cols["m"][:, None],
        k_form=cols["k_form"],
        k_param=cols["k_param"],
        v_form=cols["v_form"],
        v_param=cols["v_param"],
        # valid by construction, so no value is read back (a seal's one read is its payload sizes): keep masks of
        # m >= 1 tokens, forms and params from the checked menu, weights >= 0 made finite (non-finite queries would
        # give non-finite ones)
        k_chan_weight=torch.nan_to_num(imp.k_chan_weight, nan=0.0, neginf=0.0).contiguous(),
        v_chan_weight=torch.nan_to_num(imp.v_chan_weight, nan=0.0, neginf=0.0).contiguous(),
        flags=ad_t.to(i32).repeat(nl) * fmt.FLAG_ALWAYS_READ,
        check_values=False,
    )
    return plan, choice, est_err, mt["bytes"][choice], lam
