# SPDX-License-Identifier: Apache-2.0
"""MosaicKV's metrics: a snapshot of one rank's compressed cache (:func:`collect_stats`) and its Prometheus series.

SGLang (``--enable-metrics``) runs ``prometheus_client`` in multiprocess mode: the launcher sets
``PROMETHEUS_MULTIPROC_DIR`` before it starts the scheduler processes, each scheduler writes its series to files there,
and the HTTP server's ``/metrics`` aggregates them with ``MultiProcessCollector``. :class:`MosaicMetricsExporter`
creates its series the way SGLang's ``SchedulerMetricsCollector`` does (names ``sglang:...``, SGLang's labels
``model_name``, ``engine_type``, ``tp_rank``, ``pp_rank``, ``moe_ep_rank``, ... and gauges in ``mostrecent`` mode), so
they show on the same ``/metrics`` with no other setup. The scheduler hook that refreshes them every
:data:`REFRESH_INTERVAL` seconds is ``patches/metrics.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from mosaickv_sglang.kernels.format import (
    FORM_CHAN,
    FORM_DENSE,
    FORM_LOWRANK,
    FORM_NAMES,
    GRANULE_BYTES,
    K_FORM,
    N_ROWS,
    V_FORM,
)
from mosaickv_sglang.pool import PAGE_SEALED, dense_bytes_per_token, to_device
from mosaickv_sglang.sidecar.client import SidecarCounters
from mosaickv_sglang.step_timer import DECODE_STEP_BUCKETS

if TYPE_CHECKING:
    from mosaickv_sglang.sealer import Sealer

logger = logging.getLogger(__name__)

__all__ = ["DECODE_STEP_BEHIND_PREFILL_METRIC", "DECODE_STEP_METRIC", "METRICS", "REFRESH_INTERVAL", "STRATEGY_NAMES",
           "MetricSpec", "MosaicMetricsExporter", "MosaicStats", "SidecarStats", "StrategyCounter", "collect_stats",
           "strategy_name"]  # fmt: skip

# Seconds between two refreshes of the Prometheus series (the histogram reads every layer's descriptor table).
REFRESH_INTERVAL = 5.0

_NUM_FORMS = len(FORM_NAMES)
_SIDE_NAMES = {FORM_DENSE: "dense", FORM_CHAN: "chan-k", FORM_LOWRANK: "lowrank-r"}


def strategy_name(tokens_dropped: bool, k_form: int, v_form: int) -> str:
    """The strategy of a sealed segment, named as in :data:`mosaickv_sglang.strategies.STRATEGIES`.

    ``dense``, ``chan-k``, ``lowrank-r`` when K and V share a form; ``K:<form>|V:<form>`` when they differ; prefixed
    ``tok-m/`` when the segment keeps fewer than ``S`` tokens (``tok-m`` alone when both sides are dense).
    """
    k, v = _SIDE_NAMES[k_form], _SIDE_NAMES[v_form]
    vector = k if k == v else f"K:{k}|V:{v}"
    if not tokens_dropped:
        return vector
    return "tok-m" if vector == "dense" else f"tok-m/{vector}"


# index tok * F * F + k_form * F + v_form, F = number of forms
STRATEGY_NAMES: Tuple[str, ...] = tuple(
    strategy_name(bool(t), k, v) for t in (0, 1) for k in range(_NUM_FORMS) for v in range(_NUM_FORMS)
)


@dataclasses.dataclass(frozen=True)
class SidecarStats:
    """The sidecar bridge's counters (:class:`~mosaickv_sglang.sidecar.client.SidecarCounters`) and what it applied.

    Attributes
    ----------
    counters : SidecarCounters
    plans_applied, plans_discarded, segments_applied : int
        Plans swapped into the pool, plans dropped (their pages freed or rewritten meanwhile), segments re-packed.
    resegment_pooled : int
        Re-segmentations planned with every request's queries (none of the readers' left in the window).
    step_seconds : float
        Scheduler time the bridge took before forwards (applying plans, submitting sealed pages).
    idle_seconds : float
        Scheduler time the bridge took on idle ticks.
    submit_seconds, land_seconds, apply_seconds : float
        Of the bridge's scheduler time: submitting sealed pages (part of ``step_seconds``), handing landed copies to
        the worker, applying plans (both on forward and idle ticks).
    io_seconds : float
        CPU time of the bridge's I/O thread (landing copies, reading replies): not scheduler time.
    staging_full_batches : int
        Sealed batches that kept their fast plans because the bridge's pinned staging had no room for their copies.
    """

    counters: SidecarCounters
    plans_applied: int
    plans_discarded: int
    segments_applied: int
    resegment_pooled: int = 0
    step_seconds: float = 0.0
    idle_seconds: float = 0.0
    submit_seconds: float = 0.0
    land_seconds: float = 0.0
    apply_seconds: float = 0.0
    io_seconds: float = 0.0
    staging_full_batches: int = 0


@dataclasses.dataclass(frozen=True)
class MosaicStats:
    """A snapshot of one rank's MosaicKV cache (this rank's KV heads, every layer of the pool).

    Attributes
    ----------
    compression_ratio : float
        Dense bytes of the sealed segments / their compressed bytes (arena payloads, pending reseal releases included,
        plus descriptor and bounds rows): ``CompressedKVStore.compression_ratio()``; 1.0 when nothing is sealed.
    bytes_per_token : float
        KV bytes held per logical token held: ``(store bytes + hot bytes) / tokens``, where store bytes is
        ``CompressedKVStore.bytes_used()`` (arena granules allocated plus the descriptor and bounds rows of the sealed
        segments), hot bytes is the dense hot pages in use times their K/V bytes (``S * dense_bytes_per_token``), and
        tokens is ``S`` times the pages held: sealed in every layer, or holding a hot page (a partly written or partly
        sealed page counts whole). 0.0 when no page is held.
    dense_bytes_per_token : int
        What one token's K and V take uncompressed in every layer (``2 * L * H_kv * d * e``), for comparison.
    tokens_held : int
        The denominator of :attr:`bytes_per_token`.
    strategy_segments : dict
        ``{strategy name: sealed segments}`` over layers, KV heads and sealed pages, every name of
        :data:`STRATEGY_NAMES` present (0 when unused); read from the descriptor tables.
    pages_sealed, pressure_pages_sealed, pages_left_dense : int
        The sealer's totals since start (all pages sealed; of which for hot-pool pressure; left dense for want of
        arena room).
    arena_compactions, granules_compacted : int
        Arena compactions (a layer's payloads moved to the front because a seal found enough free granules only in
        pieces) and the granules they moved, since start.
    seal_calls : int
        The sealer's :meth:`~mosaickv_sglang.sealer.Sealer.seal` calls since start.
    seal_seconds : float
        Scheduler time those calls took (planning and packing, device waits included).
    seal_plan_seconds : float
        Of that time: the planner's calls (their device reads included).
    seal_gpu_seconds : float or None
        The seals' GPU spans (:class:`~mosaickv_sglang.seal_spans.SealSpans`) collected so far; ``None`` off CUDA.
    decode_plans, decode_plan_seconds : int, float
        Decode batches planned by the attention backend and the scheduler time their plans took (sealing and the
        sidecar's tick included).
    decode_plan_seal_seconds, decode_plan_sidecar_seconds : float
        Of that time: sealing calls, and the sidecar bridge's work.
    arena_reserved_fraction : float
        Arena ledger granules reserved / its capacity.
    free_hot_pages : int
        Physical dense pages free.
    admissible_tokens : int
        Logical tokens the pool can still take (``MosaicMHATokenToKVPool.admissible_tokens()``).
    sidecar : SidecarStats or None
        ``None`` when the sidecar is off.
    """

    compression_ratio: float
    bytes_per_token: float
    dense_bytes_per_token: int
    tokens_held: int
    strategy_segments: Dict[str, int]
    pages_sealed: int
    pressure_pages_sealed: int
    pages_left_dense: int
    arena_compactions: int
    granules_compacted: int
    seal_calls: int
    seal_seconds: float
    seal_plan_seconds: float
    seal_gpu_seconds: Optional[float]
    decode_plans: int
    decode_plan_seconds: float
    decode_plan_seal_seconds: float
    decode_plan_sidecar_seconds: float
    arena_reserved_fraction: float
    free_hot_pages: int
    admissible_tokens: int
    sidecar: Optional[SidecarStats]


def _strategy_histogram(store: Any) -> Dict[str, int]:
    """The counts of :func:`_strategy_counts`, read on the host at once."""
    return dict(zip(STRATEGY_NAMES, _strategy_counts(store).tolist()))


def _strategy_counts(store: Any) -> torch.Tensor:
    """The sealed segments per strategy, ``[len(STRATEGY_NAMES)]`` int64 on the tables' device, queued without the
    host waiting: the rows of the pages sealed in every layer are read in one gather of
    :attr:`~mosaickv_sglang.pool.CompressedKVStore.desc_table` (a few launches, not a dozen per layer: the refresh runs
    on the scheduler thread), those of pages sealed in some layers only layer by layer; the rows go up through pinned
    memory and the codes are added in with ``index_add_`` (``torch.bincount`` on CUDA reads its input's min and max
    on the host, so that each refresh waited for every step in flight)."""
    h, num_layers = store.num_kv_heads, store.num_layers
    total = torch.zeros(len(STRATEGY_NAMES), dtype=torch.int64, device=store.device)
    sealed_in = store.layers_sealed()
    everywhere = np.flatnonzero(sealed_in == num_layers)
    if everywhere.size:
        _add_codes(total, store.desc_table[:, _head_rows(everywhere, h, store.device)], store.page_size)
    partly = np.flatnonzero((sealed_in > 0) & (sealed_in < num_layers))
    if partly.size:
        for li in range(num_layers):
            pages = partly[store.page_state(li).numpy()[partly] == PAGE_SEALED]
            if pages.size:
                _add_codes(total, store.desc[li][_head_rows(pages, h, store.device)], store.page_size)
    return total


def _head_rows(pages: np.ndarray, h: int, device: torch.device) -> torch.Tensor:
    """The descriptor rows of ``pages``' heads (``page * h + head``), on ``device``."""
    heads = np.arange(h, dtype=np.int64)
    return to_device(torch.from_numpy((pages[:, None] * h + heads[None, :]).reshape(-1)), device)


def _add_codes(total: torch.Tensor, rows: torch.Tensor, page_size: int) -> None:
    """Count the strategy code of each descriptor row of ``rows`` (``[..., DESC_WIDTH]``) into ``total``."""
    f = _NUM_FORMS
    d = rows.reshape(-1, rows.shape[-1])
    code = (d[:, N_ROWS] < page_size).long() * (f * f) + d[:, K_FORM].long() * f + d[:, V_FORM].long()
    total.index_add_(0, code, torch.ones_like(code))


class StrategyCounter:
    """The strategy histogram for periodic exports: on CUDA each read queues a count and returns the last count that
    has landed on the host (one refresh late: zeros until the first lands), so that a refresh never waits for the
    steps in flight (a plain read waited for the whole launch queue: 1.1% of the long-context server's scheduler
    samples in the twenty-second GPU run, each wait one step's lost overlap); off CUDA it is read at once.

    Parameters
    ----------
    late : bool, optional
        Read one call late (default: when the store is on CUDA).
    """

    def __init__(self, late: Optional[bool] = None) -> None:
        self.late = late
        self._pending: Optional[Tuple[torch.Tensor, Any]] = None  # host copy of a count, its copy's event
        self._landed: Dict[str, int] = dict.fromkeys(STRATEGY_NAMES, 0)

    def read(self, store: Any) -> Dict[str, int]:
        late = torch.device(store.device).type == "cuda" if self.late is None else self.late
        if not late:
            return _strategy_histogram(store)
        if self._pending is not None:
            host, event = self._pending
            if not event.query():
                return self._landed  # the previous count is still on its way: no second one queued behind it
            self._landed = dict(zip(STRATEGY_NAMES, host.tolist()))
        self._pending = self._start_copy(_strategy_counts(store))
        return self._landed

    @staticmethod
    def _start_copy(counts: torch.Tensor) -> Tuple[torch.Tensor, Any]:
        """A host copy of ``counts`` started without waiting, and the event that says it landed."""
        host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
        host.copy_(counts, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(counts.device))
        return host, event


def _sidecar_stats(sidecar: Any) -> Optional[SidecarStats]:
    if sidecar is None:
        return None
    return SidecarStats(sidecar.counters(), int(sidecar.plans_applied), int(sidecar.plans_discarded),
                        int(sidecar.segments_applied), int(sidecar.resegment_pooled),
                        float(sidecar.step_seconds), float(sidecar.idle_seconds),
                        float(sidecar.submit_seconds), float(sidecar.land_seconds),
                        float(sidecar.apply_seconds), float(sidecar.io_seconds),
                        int(sidecar.staging_full_batches))  # fmt: skip


def collect_stats(sealer: "Sealer", strategies: Optional[StrategyCounter] = None) -> MosaicStats:
    """Snapshot ``sealer``'s pool, arena ledger and sidecar (reads every descriptor table: call it every few seconds,
    never per step); with ``strategies``, the strategy histogram as it reads it (on CUDA one call late, without
    waiting for the device), else read at once."""
    pool = sealer.pool
    store, ledger = pool.store, pool.arena_ledger
    s = int(pool.page_size)
    dense_tok = dense_bytes_per_token(store.num_layers, store.num_kv_heads, store.head_dim, store.dtype)
    hot_pages = int(pool.num_physical_pages) - 1 - int(pool.num_free_physical_pages)  # padding page excluded
    sealed_pages = int(np.count_nonzero(store.page_state().numpy() == PAGE_SEALED))
    tokens = s * (sealed_pages + hot_pages)
    held = store.bytes_used() + hot_pages * s * dense_tok
    return MosaicStats(
        compression_ratio=float(store.compression_ratio()),
        bytes_per_token=held / tokens if tokens else 0.0,
        dense_bytes_per_token=int(dense_tok),
        tokens_held=int(tokens),
        strategy_segments=_strategy_histogram(store) if strategies is None else strategies.read(store),
        pages_sealed=int(sealer.pages_sealed),
        pressure_pages_sealed=int(sealer.pressure_pages_sealed),
        pages_left_dense=int(sealer.pages_left_dense),
        arena_compactions=int(store.compactions),
        granules_compacted=int(store.granules_compacted),
        seal_calls=int(sealer.seal_calls),
        seal_seconds=float(sealer.seal_seconds),
        seal_plan_seconds=float(sealer.seal_plan_seconds),
        seal_gpu_seconds=float(sealer.spans.collect()) if sealer.spans.enabled else None,
        decode_plans=int(sealer.decode_plans),
        decode_plan_seconds=float(sealer.decode_plan_seconds),
        decode_plan_seal_seconds=float(sealer.decode_plan_seal_seconds),
        decode_plan_sidecar_seconds=float(sealer.decode_plan_sidecar_seconds),
        arena_reserved_fraction=ledger.reserved / max(1, ledger.capacity),
        free_hot_pages=int(pool.num_free_physical_pages),
        admissible_tokens=int(pool.admissible_tokens()),
        sidecar=_sidecar_stats(sealer.sidecar),
    )


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """One exported series: Prometheus name, ``counter`` (a total since start) or ``gauge``, help text, and the
    value's getter (``None`` for series absent from this snapshot, e.g. the sidecar's when it is off)."""

    name: str
    kind: str
    doc: str
    value: Callable[[MosaicStats], Optional[float]]


def _sc(get: Callable[[SidecarStats], float]) -> Callable[[MosaicStats], Optional[float]]:
    return lambda st: None if st.sidecar is None else get(st.sidecar)


# Every series but the strategy histogram (``sglang:mosaic_strategy_segments{strategy=...}``, a gauge).
METRICS: Tuple[MetricSpec, ...] = (
    MetricSpec("sglang:mosaic_compression_ratio", "gauge",
               "Dense bytes of the sealed segments / their compressed bytes (payloads and metadata).",
               lambda st: st.compression_ratio),
    MetricSpec("sglang:mosaic_bytes_per_token", "gauge",
               "KV bytes held (compressed store and hot dense pages) per logical token held.",
               lambda st: st.bytes_per_token),
    MetricSpec("sglang:mosaic_dense_bytes_per_token", "gauge",
               "KV bytes of one uncompressed token (all layers, this rank's KV heads).",
               lambda st: st.dense_bytes_per_token),
    MetricSpec("sglang:mosaic_arena_reserved_ratio", "gauge",
               "Fraction of the compressed arenas reserved by sealed pages.", lambda st: st.arena_reserved_fraction),
    MetricSpec("sglang:mosaic_free_hot_pages", "gauge", "Free pages of the dense hot pool.",
               lambda st: st.free_hot_pages),
    MetricSpec("sglang:mosaic_admissible_tokens", "gauge", "Logical tokens the compressed pool can still take.",
               lambda st: st.admissible_tokens),
    MetricSpec("sglang:mosaic_pages_sealed_total", "counter", "Pages sealed (compressed) since start.",
               lambda st: st.pages_sealed),
    MetricSpec("sglang:mosaic_pressure_pages_sealed_total", "counter",
               "Pages sealed early because the hot pool ran short.", lambda st: st.pressure_pages_sealed),
    MetricSpec("sglang:mosaic_pages_left_dense_total", "counter",
               "Pages left dense because the arenas had no room (each once until it is freed).",
               lambda st: st.pages_left_dense),
    MetricSpec("sglang:mosaic_arena_compactions_total", "counter",
               "Arena compactions: a layer's payloads moved together because a seal found its room only in pieces.",
               lambda st: st.arena_compactions),
    MetricSpec("sglang:mosaic_arena_compacted_bytes_total", "counter", "Arena bytes moved by compactions.",
               lambda st: st.granules_compacted * GRANULE_BYTES),
    MetricSpec("sglang:mosaic_seal_calls_total", "counter",
               "Sealing calls (one fast-planner call and one pack each, whatever the number of pages).",
               lambda st: st.seal_calls),
    MetricSpec("sglang:mosaic_seal_seconds_total", "counter",
               "Scheduler time spent sealing (planning and packing, device waits included).",
               lambda st: st.seal_seconds),
    MetricSpec("sglang:mosaic_seal_plan_seconds_total", "counter",
               "Of the sealing time: the fast planner's calls (their device reads included).",
               lambda st: st.seal_plan_seconds),
    MetricSpec("sglang:mosaic_seal_gpu_seconds_total", "counter",
               "GPU time spanned by the seals' device work (CUDA events on the seal's stream, collected without "
               "waiting; absent off CUDA).", lambda st: st.seal_gpu_seconds),
    MetricSpec("sglang:mosaic_decode_plans_total", "counter", "Decode batches planned by the mosaic backend.",
               lambda st: st.decode_plans),
    MetricSpec("sglang:mosaic_decode_plan_seconds_total", "counter",
               "Scheduler time planning decode batches (host work before each decode forward; sealing and the "
               "sidecar's tick included).", lambda st: st.decode_plan_seconds),
    MetricSpec("sglang:mosaic_decode_plan_seal_seconds_total", "counter",
               "Of the decode plans' time: sealing calls (policy and pressure seals made before decode forwards).",
               lambda st: st.decode_plan_seal_seconds),
    MetricSpec("sglang:mosaic_decode_plan_sidecar_seconds_total", "counter",
               "Of the decode plans' time: the sidecar bridge (its tick, and the submissions of those seals).",
               lambda st: None if st.sidecar is None else st.decode_plan_sidecar_seconds),
    MetricSpec("sglang:mosaic_sidecar_queue_depth", "gauge",
               "Sidecar jobs in flight, or finished with plans waiting to be applied.",
               _sc(lambda sc: sc.counters.queue_depth)),
    MetricSpec("sglang:mosaic_sidecar_submitted_total", "counter", "Jobs accepted by the sidecar.",
               _sc(lambda sc: sc.counters.submitted)),
    MetricSpec("sglang:mosaic_sidecar_rejected_full_total", "counter",
               "Jobs refused because the sidecar queue was full (the fast plan stayed).",
               _sc(lambda sc: sc.counters.rejected_full)),
    MetricSpec("sglang:mosaic_sidecar_staging_full_total", "counter",
               "Sealed batches not sent to the sidecar because its pinned host staging had no room for their copies "
               "(the fast plans stayed).", _sc(lambda sc: sc.staging_full_batches)),
    MetricSpec("sglang:mosaic_sidecar_completed_total", "counter", "Sidecar jobs that delivered plans.",
               _sc(lambda sc: sc.counters.completed)),
    MetricSpec("sglang:mosaic_sidecar_failed_total", "counter", "Sidecar jobs that failed.",
               _sc(lambda sc: sc.counters.failed)),
    MetricSpec("sglang:mosaic_sidecar_stale_total", "counter",
               "Sidecar jobs discarded whole because their segments were freed or rewritten.",
               _sc(lambda sc: sc.counters.discarded_stale)),
    MetricSpec("sglang:mosaic_sidecar_segments_discarded_total", "counter",
               "Stale segments discarded from sidecar jobs.", _sc(lambda sc: sc.counters.segments_discarded)),
    MetricSpec("sglang:mosaic_sidecar_lost_total", "counter", "Sidecar jobs lost with a dead worker.",
               _sc(lambda sc: sc.counters.lost)),
    MetricSpec("sglang:mosaic_sidecar_restarts_total", "counter", "Sidecar worker restarts.",
               _sc(lambda sc: sc.counters.restarts)),
    MetricSpec("sglang:mosaic_resegmentations_total", "counter",
               "Sidecar jobs that re-planned prefix-shared segments on idle ticks.",
               _sc(lambda sc: sc.counters.resegmentations)),
    MetricSpec("sglang:mosaic_resegment_pooled_total", "counter",
               "Re-segmentation jobs planned with every request's recent queries because none of the shared page's "
               "readers' queries was left in the query window.", _sc(lambda sc: sc.resegment_pooled)),
    MetricSpec("sglang:mosaic_plans_applied_total", "counter", "Sidecar plans applied to the pool.",
               _sc(lambda sc: sc.plans_applied)),
    MetricSpec("sglang:mosaic_plans_discarded_total", "counter",
               "Sidecar plans discarded (pages freed or rewritten meanwhile, or no arena room to apply them).",
               _sc(lambda sc: sc.plans_discarded)),
    MetricSpec("sglang:mosaic_segments_applied_total", "counter", "Segments re-packed with sidecar plans.",
               _sc(lambda sc: sc.segments_applied)),
    MetricSpec("sglang:mosaic_sidecar_step_seconds_total", "counter",
               "Scheduler time the sidecar bridge took before forwards (applying plans, submitting sealed pages).",
               _sc(lambda sc: sc.step_seconds)),
    MetricSpec("sglang:mosaic_sidecar_idle_seconds_total", "counter",
               "Scheduler time the sidecar bridge took on idle ticks (re-segmentation).",
               _sc(lambda sc: sc.idle_seconds)),
    MetricSpec("sglang:mosaic_sidecar_submit_seconds_total", "counter",
               "Of the sidecar step time: submitting sealed pages (gathering their K/V and queries, starting the "
               "copies to the host).", _sc(lambda sc: sc.submit_seconds)),
    MetricSpec("sglang:mosaic_sidecar_land_seconds_total", "counter",
               "Scheduler time handing landed copies to the sidecar worker's slots (and keeping host copies of shared "
               "pages), forward and idle ticks.", _sc(lambda sc: sc.land_seconds)),
    MetricSpec("sglang:mosaic_sidecar_apply_seconds_total", "counter",
               "Scheduler time applying sidecar plans (re-packing their pages), forward and idle ticks.",
               _sc(lambda sc: sc.apply_seconds)),
    MetricSpec("sglang:mosaic_sidecar_io_thread_seconds_total", "counter",
               "CPU time of the sidecar bridge's I/O thread (landing copies in the worker's slots, reading its "
               "replies), beside the scheduler thread.", _sc(lambda sc: sc.io_seconds)),
)  # fmt: skip
STRATEGY_METRIC = "sglang:mosaic_strategy_segments"
DECODE_STEP_METRIC = "sglang:mosaic_decode_step_seconds"
DECODE_STEP_BEHIND_PREFILL_METRIC = "sglang:mosaic_decode_step_behind_prefill_seconds"


class MosaicMetricsExporter:
    """The MosaicKV series of one scheduler process, labelled like SGLang's scheduler metrics.

    Parameters
    ----------
    labels : mapping
        SGLang's metric labels of this scheduler (``SchedulerMetricsCollector.labels``).
    registry : prometheus_client.CollectorRegistry, optional
        Where the series register (default: ``prometheus_client``'s global registry, as SGLang's own). In
        multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set before ``prometheus_client`` is imported) values go to that
        directory whatever the registry.
    interval : float
        Minimum seconds between two refreshes in :meth:`maybe_refresh`.
    """

    def __init__(self, labels: Mapping[str, Any], registry: Any = None, interval: float = REFRESH_INTERVAL) -> None:
        # imported here, after SGLang set PROMETHEUS_MULTIPROC_DIR (as SGLang's collectors do)
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        if interval < 0:
            raise ValueError(f"interval: expected seconds >= 0, got {interval}")
        self.labels = {str(k): str(v) for k, v in labels.items()}
        self.interval = float(interval)
        self.last_refresh: Optional[float] = None
        reg = REGISTRY if registry is None else registry
        names = list(self.labels)
        self._series: List[Tuple[MetricSpec, Any]] = []
        for spec in METRICS:
            if spec.kind == "counter":
                metric = Counter(spec.name, spec.doc, labelnames=names, registry=reg)
            else:
                metric = Gauge(spec.name, spec.doc, labelnames=names, multiprocess_mode="mostrecent", registry=reg)
            self._series.append((spec, metric))
        self._strategy = Gauge(STRATEGY_METRIC, "Sealed segments (over layers and KV heads) per strategy.",
                               labelnames=names + ["strategy"], multiprocess_mode="mostrecent",
                               registry=reg)  # fmt: skip
        self._decode_steps = Histogram(DECODE_STEP_METRIC, "Seconds between the starts of two consecutive decode steps "
                                       "(prefill steps break the chain, and under the overlap scheduler so does the "
                                       "period after one; mosaickv_sglang.step_timer).",
                                       labelnames=names, buckets=DECODE_STEP_BUCKETS, registry=reg)  # fmt: skip
        self._behind_prefill = Histogram(DECODE_STEP_BEHIND_PREFILL_METRIC,
                                         "Seconds between the starts of two consecutive decode steps, the first of "
                                         "them launched after a prefill step under the overlap scheduler: the period "
                                         "holds that prefill's result wait (not counted in "
                                         f"{DECODE_STEP_METRIC}).", labelnames=names, buckets=DECODE_STEP_BUCKETS,
                                         registry=reg)  # fmt: skip
        self._counted: Dict[str, float] = {}
        self._strategies = StrategyCounter()

    def observe_decode_steps(self, periods: Sequence[float], behind_prefill: Sequence[float] = ()) -> None:
        """Add decode step periods (:meth:`~mosaickv_sglang.step_timer.DecodeStepTimer.drain`) to their histogram,
        and those behind a prefill (:meth:`~mosaickv_sglang.step_timer.DecodeStepTimer.drain_behind_prefill`) to
        theirs."""
        for histogram, values in ((self._decode_steps, periods), (self._behind_prefill, behind_prefill)):
            child = histogram.labels(**self.labels)
            for period in values:
                child.observe(period)

    def export(self, stats: MosaicStats) -> None:
        """Set every series from ``stats``; counters advance by the growth of their total since the last export."""
        for spec, metric in self._series:
            value = spec.value(stats)
            if value is None:
                continue
            child = metric.labels(**self.labels)
            if spec.kind == "gauge":
                child.set(value)
                continue
            last = self._counted.get(spec.name, 0.0)
            child.inc(value - last if value >= last else value)  # a smaller total: its source restarted
            self._counted[spec.name] = value
        for name, count in stats.strategy_segments.items():
            self._strategy.labels(**self.labels, strategy=name).set(count)

    def maybe_refresh(self, sealer: "Sealer", now: Optional[float] = None) -> bool:
        """Export :func:`collect_stats` of ``sealer`` unless the last refresh was under :attr:`interval` seconds ago.

        Returns
        -------
        bool
            Whether the series were refreshed.
        """
        now = time.monotonic() if now is None else now
        if self.last_refresh is not None and now - self.last_refresh < self.interval:
            return False
        self.last_refresh = now
        self.export(collect_stats(sealer, self._strategies))
        return True
