# SPDX-License-Identifier: Apache-2.0
"""Sealing between forward steps: which dense pages to compress, planned with the fast planner, packed into the pool.

The attention backend calls :meth:`Sealer.before_forward` in its out-of-graph plan step, before the new tokens get
their physical pages. Two kinds of pages are sealed there:

* **policy pages**: complete pages of the batch's requests that left the hot window (``--mosaic-hot-window``), with
  the first ``--mosaic-sink-tokens`` sealed dense as always-read sinks (:meth:`MosaicMHATokenToKVPool.pages_to_seal`),
  once at least :data:`SEAL_BATCH_PAGES` of them are due (a seal's cost is mostly fixed);
* **pressure pages**: when the free physical pages cannot hold this forward's new pages plus a reserve, complete
  dense pages least recently written first (finished requests' tails kept by the radix cache, hot windows of requests
  not in this batch). The hot window is a quality preference, never a reason to fail a batch.

Plans come from :func:`~mosaickv_sglang.plan_layers.plan_fast_layers`, all layers in one call
(:meth:`Sealer.plan_layer` keeps the per-layer :func:`~mosaickv_sglang.planner.plan_fast` as its reference), with a
byte budget of ``dense / --mosaic-compression-ratio`` for ordinary segments and ``dense`` for sinks, and the menu
that ``--mosaic-axes`` allows (both axes; or tokens only, or channels only, the served single-axis baselines). Its
query statistics are the recent queries of *all* requests of each layer (:class:`QueryWindow`), so a segment that
several requests share is never planned for one request's question alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mosaickv_sglang.config import MAX_COMPRESSION_RATIO, float_env, positive_int_env
from mosaickv_sglang.host_stalls import HostStalls
from mosaickv_sglang.importance import uniform_importance
from mosaickv_sglang.kernels.format import SegmentPlan
from mosaickv_sglang.kv_pool import MosaicMHATokenToKVPool
from mosaickv_sglang.pending_seal import (
    PendingSeal, layer_slices, pack_after_launch_enabled, pack_layer_slices, pack_sooner_after_plans,
    page_scaled_slices, plan_after_launch_enabled, seal_async_plans, seal_layer_slices, seal_max_pages,
    seal_slice_pages,
)  # fmt: skip
from mosaickv_sglang.plan_layers import DEFAULT_MAX_CHUNK_BYTES, DEFAULT_MAX_SEGMENTS, plan_fast_layers
from mosaickv_sglang.planner import plan_fast
from mosaickv_sglang.pool import ArenaFullError, check_int, seal_budget_bytes, to_device
from mosaickv_sglang.pool.device import ring_status
from mosaickv_sglang.seal_graphs import SealGraphs, seal_graph_buckets
from mosaickv_sglang.seal_spans import SealSpans
from mosaickv_sglang.strategies import RATIO_MARGIN, axes_menu, menu_max_ratio
from mosaickv_sglang.strategies.base import dense_segment_bytes

if TYPE_CHECKING:
    from mosaickv_sglang.sidecar.bridge import SidecarBridge

logger = logging.getLogger(__name__)

__all__ = ["QueryWindow", "Sealer", "seal_beside_step_enabled"]

# Seconds between two status lines of the sealer in the server log (only when something was sealed meanwhile).
STATUS_LOG_INTERVAL = 60.0
# Environment variable overriding STATUS_LOG_INTERVAL (seconds; the GPU runs' loads last seconds, not minutes).
STATUS_INTERVAL_ENV = "MOSAICKV_STATUS_INTERVAL"
SEAL_MAX_SEGMENTS_ENV = "MOSAICKV_SEAL_MAX_SEGMENTS"
SEAL_MAX_CHUNK_BYTES_ENV = "MOSAICKV_SEAL_MAX_CHUNK_BYTES"
# Environment variable that turns sealing beside the step in flight on ("1"; see seal_beside_step_enabled).
SEAL_BESIDE_STEP_ENV = "MOSAICKV_SEAL_BESIDE_STEP"
# Policy pages (out of the hot window) wait until this many are due, so that one planner call (whose cost is mostly
# fixed) seals many pages instead of one page every other decode step; hot-pool pressure seals at once.
SEAL_BATCH_PAGES = 16
# Beside the step in flight, the sealer keeps 1 / LOW_WATER_FRACTION of the hot pool free (and at least a batch).
LOW_WATER_FRACTION = 4
# Retries of a batch whose plans do not fit the arenas, each with the ratio multiplied by this factor.
ARENA_RETRY_FACTOR = 1.5
ARENA_RETRIES = 2


def seal_beside_step_enabled() -> bool:
    """``MOSAICKV_SEAL_BESIDE_STEP=1``: with the overlap scheduler, seal beside the step in flight
    (:meth:`Sealer.end_plan`), and let SGLang's scheduler stop waiting for whole extend forwards (the backend's
    read-done event). Off by default: in the seventeenth GPU run (8B shape) the event ended the extend plans' wait
    behind SGLang's WAR barrier, but the output throughput stayed as without it (293.4 against 292.0 tokens/s in
    the sixteenth), the fast planner's own host time being the limit."""
    return os.environ.get(SEAL_BESIDE_STEP_ENV, "0").strip() == "1"


def status_interval() -> float:
    """Seconds between two status lines: ``MOSAICKV_STATUS_INTERVAL`` when set, else :data:`STATUS_LOG_INTERVAL`."""
    return float_env(STATUS_INTERVAL_ENV, STATUS_LOG_INTERVAL, 0.0, math.inf, "seconds >= 0")


def seal_chunking() -> Tuple[int, int]:
    """The one-call planner's chunk bounds, ``(max_segments, max_chunk_bytes)``: ``MOSAICKV_SEAL_MAX_SEGMENTS`` and
    ``MOSAICKV_SEAL_MAX_CHUNK_BYTES`` when set (integers >= 1), else the defaults of
    :func:`~mosaickv_sglang.plan_layers.plan_fast_layers`. Larger chunks launch fewer kernels a seal (a served seal
    waits for room in the launch queue at each) and hold more transient device memory."""
    return (positive_int_env(SEAL_MAX_SEGMENTS_ENV, DEFAULT_MAX_SEGMENTS),
            positive_int_env(SEAL_MAX_CHUNK_BYTES_ENV, DEFAULT_MAX_CHUNK_BYTES))


def _ring_queries(ring: torch.Tensor, count: List[int], layer: int) -> Optional[torch.Tensor]:
    n = count[layer]
    return None if n == 0 else ring[layer, :n].permute(1, 0, 2, 3)


def _ring_full_window(ring: torch.Tensor, count: List[int], window: int) -> Optional[torch.Tensor]:
    return None if any(c != window for c in count) else ring[:, :window].permute(0, 2, 1, 3, 4)


@dataclass(eq=False)
class FrozenQueries:
    """A query window as one plan read it (:meth:`QueryWindow.frozen`): :meth:`queries` and :meth:`full_window` as the
    window's then. Read on another stream than the one that copied it, it is recorded on that stream first."""

    ring: torch.Tensor
    count: List[int]
    window: int

    def queries(self, layer: int) -> Optional[torch.Tensor]:
        self._record()
        return _ring_queries(self.ring, self.count, layer)

    def full_window(self) -> Optional[torch.Tensor]:
        self._record()
        return _ring_full_window(self.ring, self.count, self.window)

    def _record(self) -> None:
        if self.ring.is_cuda:
            self.ring.record_stream(torch.cuda.current_stream(self.ring.device))


class QueryWindow:
    """The last ``window`` queries seen by each layer, over all requests (fp32 ring buffers on the pool's device), each
    with the request that asked it, so that a shared prefix can be re-planned with its own readers' queries.

    Parameters
    ----------
    num_layers, num_kv_heads, group_size, head_dim : int
        Layers of the pool, KV heads, query heads per KV head (query head ``h * G + g`` reads KV head ``h``), d.
    window : int
        Queries kept per layer.
    device : torch.device
    """

    def __init__(
        self, num_layers: int, num_kv_heads: int, group_size: int, head_dim: int, window: int, device: torch.device
    ) -> None:
        self.num_kv_heads, self.group_size, self.head_dim, self.window = num_kv_heads, group_size, head_dim, window
        # one row past the window: the trash row that padded rows of a CUDA-graph batch write (observe_rows)
        self.ring = torch.zeros(num_layers, window + 1, num_kv_heads, group_size, head_dim, device=device)
        self.owner = torch.full((num_layers, window + 1), -1, dtype=torch.int64, device=device)
        self._batch_owners: Optional[torch.Tensor] = None
        self._owned = False  # whether any row was ever labelled
        self._next = [0] * num_layers
        self._count = [0] * num_layers
        self._idx: Dict[Tuple[int, int], torch.Tensor] = {}  # ring rows of (start, count), on the ring's device
        # snapshot (take_snapshot): the ring as the step after the current plan will find it, read while a step runs
        self._plan_count: Optional[List[int]] = None
        self._snapshot: Optional[torch.Tensor] = None
        self._snapshot_count: List[int] = [0] * num_layers
        self._reading_snapshot = False

    def set_owners(self, owners: Optional[torch.Tensor]) -> None:
        """The request of each query row of the coming forward (shape ``[T]``, SGLang's ``req_pool_indices``, one per
        decode row or per new token of an extend); ``None``: unknown (rows recorded with owner ``-1``)."""
        self._batch_owners = None if owners is None else owners.to(self.owner.device, torch.int64)

    def observe(self, layer: int, q: torch.Tensor) -> None:
        """Append the queries ``q`` (shape ``[T, H_q * d]`` or ``[T, H_q, d]``) of local layer ``layer``; only the
        last ``window`` rows are kept, with their owners from :meth:`set_owners` when it gave ``T`` of them."""
        t = q.shape[0]
        if t == 0:
            return
        rows = q.reshape(t, self.num_kv_heads, self.group_size, self.head_dim)[-self.window :]
        n = rows.shape[0]
        key = (self._next[layer], n)
        idx = self._idx.get(key)
        if idx is None:
            idx = self._idx[key] = ((self._next[layer] + torch.arange(n)) % self.window).to(self.ring.device)
        self.ring[layer, idx] = rows.float()
        self._label(layer, idx, self._batch_owners, t)
        self._next[layer] = (self._next[layer] + n) % self.window
        self._count[layer] = min(self.window, self._count[layer] + n)

    def _label(self, layers, idx: torch.Tensor, owners: Optional[torch.Tensor], t: int) -> None:
        """Owners of ring rows ``idx`` of ``layers`` (an index or a slice): the last ``len(idx)`` of ``owners`` when it
        has one per row of the ``t`` observed, else -1 once any row was labelled (unlabelled rows must not keep the
        owners of the rows they replace)."""
        if owners is not None and owners.shape[0] == t:
            self.owner[layers, idx] = owners[-idx.shape[0] :].to(self.owner.device, torch.int64)
            self._owned = True
        elif self._owned:
            self.owner[layers].index_fill_(-1, idx, -1)  # not `owner[layers, idx] = -1`, which waits for the stream

    @property
    def trash_row(self) -> int:
        """Ring row that :meth:`observe_rows` writes for padded rows; never part of :meth:`queries`."""
        return self.window

    def plan_rows(self, real: int, total: int, owners: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Host half of :meth:`observe` for a CUDA-graph decode batch of ``total`` rows, the first ``real`` of them
        real: advance every layer's ring position as ``observe`` of ``real`` rows would, label the rows' owners
        (``owners``: shape ``[real]``, or ``None``) and return the ring row of each batch row (shape ``[total]``
        int64 on the host; the trash row for padded rows and for real rows older than the window), for
        :meth:`observe_rows`. Every layer must be at the same position (decode observes every layer once a step)."""
        if not (0 <= real <= total):
            raise ValueError(f"real: expected an integer in [0, total={total}], got {real}")
        idx = torch.full((total,), self.trash_row, dtype=torch.int64)
        if real == 0:
            return idx
        if len(set(self._next)) != 1 or len(set(self._count)) != 1:
            raise ValueError(f"QueryWindow: expected every layer at the same ring position, got {self._next}")
        n = min(real, self.window)
        start = self._next[0]
        rows = (start + torch.arange(n)) % self.window
        idx[real - n : real] = rows
        self._label(slice(None), to_device(rows, self.owner.device), owners, real)
        nxt, cnt = (start + n) % self.window, min(self.window, self._count[0] + n)
        self._next = [nxt] * len(self._next)
        self._count = [cnt] * len(self._count)
        return idx

    def observe_rows(self, layer: int, q: torch.Tensor, rows: torch.Tensor) -> None:
        """Device half of :meth:`plan_rows` (CUDA-graph safe: no host read, no host state): write the queries ``q``
        (shape ``[T, H_q * d]`` or ``[T, H_q, d]``) of local layer ``layer`` at ring rows ``rows`` (shape ``[T]``
        int64 on the ring's device)."""
        t = q.shape[0]
        rows_q = q.reshape(t, self.num_kv_heads, self.group_size, self.head_dim).float()
        self.ring[layer].index_copy_(0, rows[:t], rows_q)

    def _readable(self) -> Tuple[torch.Tensor, List[int]]:
        return (self._snapshot, self._snapshot_count) if self._reading_snapshot else (self.ring, self._count)

    def queries(self, layer: int) -> Optional[torch.Tensor]:
        """shape ``[H_kv, W', G, d]`` fp32: the observed queries of local layer ``layer`` (``None`` before any); those
        of the snapshot inside :meth:`reading_snapshot`."""
        return _ring_queries(*self._readable(), layer)

    def full_window(self) -> Optional[torch.Tensor]:
        """Every layer's :meth:`queries` at once, shape ``[L, H_kv, W, G, d]`` fp32 (a view), when every layer holds a
        full window; else ``None``."""
        return _ring_full_window(*self._readable(), self.window)

    def frozen(self) -> "FrozenQueries":
        """A copy of what :meth:`queries` reads now (queued on the current stream), for the later layer slices of a
        seal (``MOSAICKV_SEAL_LAYER_SLICES``) to plan from the window its first slice planned from."""
        ring, count = self._readable()
        return FrozenQueries(ring.clone(), list(count), self.window)

    # --- snapshot: the window read beside a step in flight ----------------------------------------------------------
    def mark_plan_start(self) -> None:
        """A plan starts: remember how many rows each layer holds (a CUDA-graph plan advances them in
        :meth:`plan_rows` before its step has written the rows)."""
        self._plan_count = list(self._count)

    def take_snapshot(self) -> None:
        """A plan ends: copy the ring (queued on the current stream, before the step the plan was made for, so that
        step's queries are not in it) with the row counts the plan started with. :meth:`reading_snapshot` then reads
        this copy while that step runs and overwrites the ring."""
        if self._snapshot is None:
            self._snapshot = torch.empty_like(self.ring)
        self._snapshot.copy_(self.ring)
        self._snapshot_count = list(self._count if self._plan_count is None else self._plan_count)
        self._plan_count = None

    @contextlib.contextmanager
    def reading_snapshot(self) -> Iterator[None]:
        """Within it, :meth:`queries` reads the last :meth:`take_snapshot` (the live ring without one)."""
        prev = self._reading_snapshot
        self._reading_snapshot = self._snapshot is not None
        try:
            yield
        finally:
            self._reading_snapshot = prev

    def release_snapshot(self, stream: "torch.cuda.Stream") -> None:
        """Work queued on ``stream`` that the forward stream does not wait for (a pending seal's planner) still reads
        the last snapshot: the next :meth:`take_snapshot` copies into a new tensor instead of over it, and this one's
        memory is not reused before that work ends."""
        if self._snapshot is not None:
            self._snapshot.record_stream(stream)
            self._snapshot = None

    def reader_queries(self, layer: int, readers: Sequence[int]) -> Optional[torch.Tensor]:
        """:meth:`queries` asked by the requests ``readers`` only; ``None`` when none of theirs is in the window."""
        n = self._count[layer]
        if n == 0 or not readers:
            return None
        mine = torch.isin(self.owner[layer, :n], torch.tensor(list(readers), device=self.owner.device))
        if not bool(mine.any()):
            return None
        return self.ring[layer, :n][mine].permute(1, 0, 2, 3)


def _waiter(stream: "torch.cuda.Stream", other: "torch.cuda.Stream") -> Callable[[], None]:
    """A callback making ``stream`` wait for the work queued on ``other`` so far."""
    return lambda: stream.wait_stream(other)


def _slice_plan(plan: SegmentPlan, sl: slice) -> SegmentPlan:
    """Rows ``sl`` of ``plan`` (a view per tensor)."""

    def cut(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t[sl]

    return SegmentPlan(
        token_keep=plan.token_keep[sl],
        k_form=plan.k_form[sl],
        k_param=plan.k_param[sl],
        v_form=plan.v_form[sl],
        v_param=plan.v_param[sl],
        k_chan_weight=plan.k_chan_weight[sl],
        v_chan_weight=plan.v_chan_weight[sl],
        k_factors=None if plan.k_factors is None else (cut(plan.k_factors[0]), cut(plan.k_factors[1])),
        v_factors=None if plan.v_factors is None else (cut(plan.v_factors[0]), cut(plan.v_factors[1])),
        flags=cut(plan.flags),
    )


class Sealer:
    """Decides, plans and performs the sealing of one pool (one scheduler / TP rank; host-driven, deterministic).

    Parameters
    ----------
    pool : MosaicMHATokenToKVPool
    num_q_heads : int
        Query heads on this rank (a multiple of the pool's KV heads).
    query_window : int
        Recent queries kept per layer for the planner's statistics.
    reserve_pages : int
        Physical pages kept free after a pressure seal, beyond what the forward needs.
    min_seal_pages : int
        Policy pages are sealed once at least this many are due (:data:`SEAL_BATCH_PAGES`); pages the forward needs
        room for are sealed at once regardless.

    Attributes
    ----------
    window : QueryWindow
    pages_sealed : int
        Pages sealed since start (policy and pressure).
    pressure_pages_sealed : int
        Of which sealed for hot-pool pressure.
    cold_pages_sealed : int
        Of which sealed beside the step because the hot pool ran low (``MOSAICKV_SEAL_BESIDE_STEP=1``): the least
        recently written complete pages, the ones pressure would seal later inside a step.
    low_water_pages : int
        Free hot pages kept beside the step beyond what the next plan needs: a quarter of the hot pool, at least a
        batch (:attr:`min_seal_pages` as it is now), unless set to a value of its own.
    pack_water_pages : int
        With a seal pending beside the step, the free hot pages (beyond the plan's needs) below which it is packed
        before its plan count: half the low-water mark, unless set to a value of its own. Lower than the mark that
        starts cold-page seals, so that a seal started because the pool fell below that mark is not packed at the
        next plan, while its planner still runs on the GPU (the pack would wait for it).
    pages_left_dense : int
        Pages that were to be sealed but stayed dense because the arenas had no room, each once until it is freed
        (a due page is tried again at each plan while the arenas stay full).
    seal_calls, seal_seconds : int, float
        Calls of :meth:`seal` (one planner call and one pack each, whatever the pages) and the scheduler time they
        took, device waits included, the sidecar's copies excluded (those are the bridge's ``submit_seconds``).
    seal_plan_seconds : float
        Of ``seal_seconds``: the planner's calls (:meth:`plan_layers`, its device reads included).
    spans : SealSpans
        The seals' GPU spans on CUDA (``spans.gpu_seconds``, collected at each status line and metrics read).
    decode_plans, decode_plan_seconds : int, float
        Decode batches the attention backend planned and the scheduler time its plans took (host work before each
        decode forward: sealing and the sidecar's tick included; counted by the backend).
    decode_plan_seal_seconds, decode_plan_sidecar_seconds : float
        Of ``decode_plan_seconds``: the sealing calls made in decode plans (policy and pressure seals; the sidecar's
        copies excluded) and the sidecar bridge's scheduler time in them (its tick, and the submissions of those
        seals). The bridge's and the sealing totals also count prefill steps; these count decode steps only.
    plan_max_segments, plan_max_chunk_bytes : int
        The one-call planner's chunking (:func:`~mosaickv_sglang.plan_layers.plan_fast_layers`'s ``max_segments`` and
        ``max_chunk_bytes``): larger chunks launch fewer ops per seal and hold more transient device memory.
    sidecar : SidecarBridge or None
        The CPU sidecar that refines sealed pages' plans (``None`` with ``--mosaic-sidecar off`` or before
        :meth:`attach_sidecar`): ticked before each forward, handed each sealed batch before it is packed.
    seal_beside_step : bool
        Seal beside the step in flight (SGLang's overlap scheduler; set by the attention backend): see
        :meth:`end_plan`. Off: every seal runs on the current stream, after the step in flight.
    side_seals, pages_deferred : int
        Seals made beside the step in flight, and policy pages left for a later plan because that step writes them.
    seal_async : bool
        ``MOSAICKV_SEAL_ASYNC=N`` (N > 0): policy seals in two halves (:mod:`.pending_seal`), planned in one plan
        (:meth:`start_seal`) and packed ``seal_async_plans`` plans later (:meth:`finish_seal`; in ``S`` layer slices at
        least ``S + 1``), or at once when the hot pool needs the room; pressure seals stay whole. Due pages wait
        while a seal is pending.
    seal_async_plans : int
        That N (at least 1 when ``seal_async``).
    async_seals, pending_voided : int
        Seals packed plans after they were planned, and planned seals voided (a page freed or sealed meanwhile, or
        no ledger room left; their live pages are due again at the next plan).
    packs_sooner : int
        Of the pending seals packed or voided at a plan or after a launch, those taken before their plan count
        because the hot pool ran low (:attr:`pack_water_pages`, or short of the plan's needs).
    packs_waited, pack_wait_seconds : int, float
        Packs whose planner was still running on the device (its payload sizes not yet copied to the host), and the
        scheduler's time waiting for them: the host blocks there, in a plan or after a launch.
    pack_sooner_after : int
        ``MOSAICKV_PACK_SOONER_AFTER`` (default 1: from the next plan on): beside the step, a low hot pool (below
        :attr:`pack_water_pages`) packs a pending seal before its plan count only from this many plans after the one
        that planned it; sooner only when a plan lacks the room for its own new pages. Its planner shares the GPU
        with the steps between: a pack while it runs makes the scheduler wait for its payload sizes
        (:attr:`packs_waited`) and, queued behind it on the side stream, the forward stream for the whole planner
        (the thirtieth run's 8B sidecar load took 11-14 packs a load sooner, its stack samples hold 118-182 ms a load
        of that wait inside plans, and it had 6-12 steps a load over 1.45x the p50). A plan count, not the planner's
        event, so that every tensor-parallel rank decides alike.
    pack_after_launch : bool
        ``MOSAICKV_PACK_AFTER_LAUNCH`` (on unless ``0``): with :attr:`seal_async` and :attr:`seal_beside_step`, a pack
        the next plan would make is made after the current step's launch (:meth:`after_launch`).
    plan_after_launch : bool
        ``MOSAICKV_PLAN_AFTER_LAUNCH`` (on unless ``0``): with :attr:`seal_async` and :attr:`seal_beside_step`, once
        :meth:`after_launch` has been called (SGLang's hook runs), a plan that decides on a first half only chooses
        its pages; :meth:`after_launch` plans them, after the step's launch.
    packs_after_launch, starts_after_launch, after_launch_seconds : int, int, float
        Pending seals packed (or voided) there, first halves planned there, and the scheduler time
        :meth:`after_launch` took for both.
    layer_slices : int
        ``MOSAICKV_SEAL_LAYER_SLICES`` (default 1): beside the step, once :meth:`after_launch` has run, a first half
        plans the first of that many slices of the layers, each later launch the next (:mod:`.pending_seal`).
    slice_pages : int
        ``MOSAICKV_SEAL_SLICE_PAGES`` (default 0, off): with :attr:`layer_slices`, a seal of more pages than this is
        planned in proportionally more slices (:func:`~mosaickv_sglang.pending_seal.page_scaled_slices`), and a low
        hot pool packs it sooner only once all its slices are planned (from :attr:`pack_sooner_after` plans or one
        more than its slices, the later: the launch after a plan counted by ``plans_waited`` plans a slice).
    max_seal_pages, seals_capped : int
        ``MOSAICKV_SEAL_MAX_PAGES`` (default 0, off): a first half plans at most this many pages, the rest wait with
        the deferred pages for the next seal; and the first halves that left pages so.
    slices_after_launch, slices_caught_up : int
        Later slices planned after a launch, and those a pack due sooner planned itself.
    pack_layer_slices : int
        ``MOSAICKV_PACK_LAYER_SLICES`` (default 1): a pack made after a launch writes the first of that many slices of
        the layers, each later launch the next (:mod:`.pending_seal`); a plan short of room packs the rest at once.
    pack_slices_after_launch, packs_rolled_back : int
        Later pack slices written after a launch, and sliced packs rolled back (a page freed between two slices, or
        no arena room for a later one): their pages dense again in every layer, due again.
    rows_read : dict
        With the overlap scheduler: plans by ``(kind, how their rows were read)`` (:meth:`note_rows_read`).
    """

    def __init__(
        self, pool: MosaicMHATokenToKVPool, num_q_heads: int, query_window: int = 32, reserve_pages: int = 0,
        min_seal_pages: int = SEAL_BATCH_PAGES,
    ) -> None:  # fmt: skip
        self.pool = pool
        h = int(pool.head_num)
        s, d = pool.page_size, int(pool.head_dim)
        # the fast planner's menu (--mosaic-axes), and the highest ratio it reaches: retries stay below it
        self.menu = axes_menu(pool.mosaic_config.axes, s, d, lowrank=False)
        self.max_ratio = menu_max_ratio(self.menu, s, d) * RATIO_MARGIN
        self.window = QueryWindow(pool.layer_num, h, num_q_heads // h, int(pool.head_dim), query_window,
                                  torch.device(pool.device))  # fmt: skip
        self.reserve_pages = int(reserve_pages)
        self.min_seal_pages = check_int(min_seal_pages, "min_seal_pages", 1)
        self.pages_sealed = 0
        self.pressure_pages_sealed = 0
        self.cold_pages_sealed = 0
        self._low_water_pin: Optional[int] = None
        self._pack_water_pin: Optional[int] = None
        self.pages_left_dense = 0
        self._left_dense_epoch: Optional[np.ndarray] = None  # per logical page: its epoch when last counted, or -1
        self.seal_calls = 0
        self.seal_seconds = 0.0
        self.seal_plan_seconds = 0.0
        self.spans = SealSpans(torch.device(pool.device))
        self.stalls = HostStalls()
        self.decode_plans = 0
        self.decode_plan_seconds = 0.0
        self.decode_plan_seal_seconds = 0.0
        self.decode_plan_sidecar_seconds = 0.0
        self.plan_max_segments, self.plan_max_chunk_bytes = seal_chunking()
        self.seal_graphs: Optional[SealGraphs] = None
        self.use_seal_graphs(seal_graph_buckets())
        self.sidecar = None
        self.seal_beside_step = False
        self.rows_read: Dict[Tuple[str, str], int] = {}
        self.side_seals = 0
        self.pages_deferred = 0
        self.seal_async_plans = seal_async_plans()
        self.seal_async = self.seal_async_plans > 0
        self.async_seals = 0
        self.pending_voided = 0
        self.pack_after_launch = pack_after_launch_enabled()
        self.plan_after_launch = plan_after_launch_enabled()
        self.packs_after_launch = 0
        self.packs_sooner = 0
        self.pack_sooner_after = pack_sooner_after_plans()
        self.packs_waited = 0
        self.pack_wait_seconds = 0.0
        self.starts_after_launch = 0
        self.after_launch_seconds = 0.0
        self.layer_slices = seal_layer_slices()
        self.slice_pages = seal_slice_pages()
        self.max_seal_pages = seal_max_pages()
        self.seals_capped = 0
        self.slices_after_launch = 0
        self.slices_caught_up = 0
        self.pack_layer_slices = pack_layer_slices()
        self.pack_slices_after_launch = 0
        self.packs_rolled_back = 0
        self._launch_hooked = False  # after_launch was called: SGLang's hook after run_batch runs in this process
        # (pages, their epochs, sinks) whose first half a plan left to after_launch (as _deferred)
        self._to_start: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None
        self._pending: Optional[PendingSeal] = None
        self._planned_pages = np.zeros(0, dtype=np.int64)
        self._in_flight = np.zeros(0, dtype=np.int64)
        self._deferred = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool))
        self._plan_end: Optional["torch.cuda.Event"] = None
        self._plan_stream: Optional["torch.cuda.Stream"] = None  # the stream of the last plan (SGLang's forward stream)
        self._frees_at_plan_end: Optional[int] = None  # the arena's frees at the last end_plan (None: no plan yet)
        self._side_stream: Optional["torch.cuda.Stream"] = None
        self._side_unwaited = False  # the side stream holds work the forward stream did not wait for (_beside_step)
        self._warned_arena = False
        self._logged_at = time.monotonic()
        self.status_interval = status_interval()
        self._logged_sealed = 0

    # --- decisions ---------------------------------------------------------------------------------------------------
    def before_forward(
        self, written_slots: Sequence[torch.Tensor], new_pages: np.ndarray,
        reads: Optional[Sequence[Tuple[int, torch.Tensor]]] = None,
    ) -> None:  # fmt: skip
        """Seal what the policy and the hot-pool pressure require before a forward that writes ``new_pages``.

        Parameters
        ----------
        written_slots : sequence of torch.Tensor
            Per request of the batch: shape ``[n_b]``, integer dtype; logical slots of its tokens written so far, in
            order (``req_to_token[r, :seq_len - new_tokens]``).
        new_pages : numpy.ndarray
            shape ``[P]``, int64; distinct logical pages the forward writes (padding page 0 allowed).
        reads : sequence of (int, torch.Tensor), optional
            For extend batches: per request, an id (SGLang's ``req_pool_indices``) and every logical slot it reads
            (prefix and new tokens); the sidecar learns from them which pages several requests read (prefixes shared
            through the radix cache).
        """
        self._observe(reads)
        pages: List[np.ndarray] = []
        sinks: List[np.ndarray] = []
        for slots in written_slots:
            if slots.numel() < self.pool.page_size:
                continue
            sp = self.pool.pages_to_seal(slots)
            keep = ~np.isin(sp.pages.numpy(), new_pages)
            pages.append(sp.pages.numpy()[keep])
            sinks.append(sp.always_dense.numpy()[keep])
        chosen = np.concatenate(pages) if pages else np.zeros(0, dtype=np.int64)
        sink_mask = np.concatenate(sinks) if sinks else np.zeros(0, dtype=bool)
        self._seal_due(chosen, sink_mask, new_pages)
        self._tick()

    def before_forward_rows(
        self, rows: np.ndarray, lens: np.ndarray, new_pages: np.ndarray,
        reads: Optional[Sequence[Tuple[int, torch.Tensor]]] = None, step: int = 1,
    ) -> None:  # fmt: skip
        """:meth:`before_forward` with ``written_slots = [rows[b, :lens[b]] for b in range(B)]`` (same decisions),
        the batch's pages read in one pass (:meth:`MosaicMHATokenToKVPool.pages_to_seal_rows`, whose ``step`` this
        passes on: 1, or ``page_size`` for rows of page starts)."""
        self._observe(reads)
        pages, sinks = self.pool.pages_to_seal_rows(rows, lens, step)
        keep = ~np.isin(pages, new_pages)
        self._seal_due(pages[keep], sinks[keep], new_pages)
        self._tick()

    def _observe(self, reads: Optional[Sequence[Tuple[int, torch.Tensor]]]) -> None:
        if self.sidecar is not None and reads is not None:
            self.sidecar.observe_readers(reads)

    @property
    def low_water_pages(self) -> int:
        if self._low_water_pin is not None:
            return self._low_water_pin
        return max(self.min_seal_pages, (self.pool.num_physical_pages - 1) // LOW_WATER_FRACTION)

    @low_water_pages.setter
    def low_water_pages(self, pages: int) -> None:
        self._low_water_pin = check_int(pages, "low_water_pages", 0)

    @property
    def pack_water_pages(self) -> int:
        if self._pack_water_pin is not None:
            return self._pack_water_pin
        return self.low_water_pages // 2

    @pack_water_pages.setter
    def pack_water_pages(self, pages: int) -> None:
        self._pack_water_pin = check_int(pages, "pack_water_pages", 0)

    def _tick(self) -> None:
        # after the seal: the plans it applies free old payloads, which a seal beside the step in flight must not
        # reuse (see end_plan)
        if self.sidecar is not None:
            self.sidecar.tick()

    def _seal_due(self, chosen: np.ndarray, sink_mask: np.ndarray, new_pages: np.ndarray) -> None:
        """Seal, of the policy pages ``chosen`` (request order, duplicates allowed), what pressure and the batch
        size call for."""
        pool = self.pool
        self._planned_pages = np.asarray(new_pages, dtype=np.int64)
        need = int(np.count_nonzero(pool.physical_pages(torch.from_numpy(new_pages)).numpy() < 0))
        if self._to_start is not None:  # the last plan's first half, not planned after its launch: now
            with self._beside_step(forward_waits=False) if self._can_seal_beside() else contextlib.nullcontext():
                self._start_chosen()
        if self._pending is not None:
            self._pending.plans_waited += 1
            if not self._pending_waits(need):
                self.packs_sooner += int(not self._pending.pack_left
                                         and self._pending.plans_waited < self._pack_plans(len(self._pending.slices)))
                # the pending seal first: its pages leave the hot pool (and the due pages found before it), and a
                # voided one's are due again below
                finished = self._pending.pages
                if self._can_seal_beside():
                    with self._beside_step():
                        self.finish_seal()
                else:
                    self.finish_seal()
                keep = ~np.isin(chosen, finished)
                chosen, sink_mask = np.asarray(chosen)[keep], np.asarray(sink_mask)[keep]
        deferred = np.zeros(0, dtype=np.int64)
        if self.seal_beside_step or self.seal_async:
            deferred, deferred_sinks = self._still_deferrable()
            chosen = np.concatenate([np.asarray(chosen, dtype=np.int64), deferred])
            sink_mask = np.concatenate([np.asarray(sink_mask, dtype=bool), deferred_sinks])
        chosen, first = np.unique(chosen, return_index=True)
        sink_mask = sink_mask[first]
        if self._pending is not None:  # still waiting for its pack: its pages are taken
            free = ~np.isin(chosen, self._pending.pages)
            chosen, sink_mask = chosen[free], sink_mask[free]

        short = self._shortfall(need)
        beside = short <= 0 and self._can_seal_beside()
        if beside:
            # pages the step in flight writes wait for a later plan; so do due pages short of a batch that came from
            # an earlier plan's deferral (no later plan of their requests might find them again)
            held = np.isin(chosen, self._in_flight)
            if chosen.size - int(np.count_nonzero(held)) < self.min_seal_pages:
                held |= np.isin(chosen, deferred)
            self._defer(chosen[held], sink_mask[held])
            self.pages_deferred += int(np.count_nonzero(np.isin(chosen[held], self._in_flight)))
            chosen, sink_mask = chosen[~held], sink_mask[~held]
            chosen, sink_mask = self._with_cold_pages(chosen, sink_mask, short, new_pages)
            if chosen.size >= self.min_seal_pages:
                if self.seal_async and self._pending is None and self.plan_after_launch and self._launch_hooked:
                    # planned after this plan's launch (after_launch)
                    self._to_start = self._noted(chosen, sink_mask)
                else:
                    # two halves: the forward stream does not wait for the planner, only the pack does, plans later
                    with self._beside_step(forward_waits=not self.seal_async):
                        self._policy_seal(chosen, sink_mask)
            self.maybe_log_status()
            return
        self._defer(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool))
        if short > 0:
            # the pages this forward cannot do without go first, on their own: policy pages, then the least recently
            # written ones; the scheduler admitted the forward only if the arenas can take them (admissible_tokens)
            lru = pool.complete_dense_pages(exclude=np.concatenate([chosen, new_pages]))
            extra = lru[: max(0, short - chosen.size)]
            self.pressure_pages_sealed += int(extra.size)
            urgent = np.concatenate([chosen, extra])[:short]
            self.seal(urgent, np.concatenate([sink_mask, np.zeros(extra.size, dtype=bool)])[:short])
            chosen, sink_mask = chosen[short:], sink_mask[short:]
        if chosen.size >= self.min_seal_pages:
            self._policy_seal(chosen, sink_mask)
        elif deferred.size:
            kept = np.isin(chosen, deferred)
            self._defer(chosen[kept], sink_mask[kept])
        self.maybe_log_status()

    # --- sealing beside the step in flight (SGLang's overlap scheduler) ------------------------------------------
    def note_rows_read(self, kind: str, why: str) -> None:
        """A plan (``kind``: ``extend``, ``decode``, ...) with the overlap scheduler read its batch's rows
        beside the step in flight (``why`` empty) or behind it (``why``: the reason, from
        :func:`~mosaickv_sglang.batch_inputs.unmatched_reason`); counted in :attr:`rows_read` for the status line."""
        key = (kind, why or "beside")
        self.rows_read[key] = self.rows_read.get(key, 0) + 1

    def begin_plan(self) -> None:
        """The attention backend starts planning a step (not under CUDA-graph capture)."""
        if self.seal_beside_step:
            self.window.mark_plan_start()

    def end_plan(self) -> None:
        """The attention backend has planned a step; with :attr:`seal_beside_step`, that step is the one in flight
        while the next step is planned (the overlap scheduler). Noted here, on the current (forward) stream, before
        the step's kernels: the pages it writes (the plan's new pages), the query window as it finds it
        (:meth:`QueryWindow.take_snapshot`), an event, and the arena's count of frees.

        The next plan seals beside that step, on a side stream that waits for the event only, when the hot pool
        needs no room at once and no arena granule was freed since (the step in flight may read a granule freed after
        it was launched, and the side stream could reuse it): it leaves the pages the step writes for a later plan,
        plans from the snapshot, makes its compaction wait for the step, and the forward stream waits for it before
        the next step (for the first half of a seal, ``MOSAICKV_SEAL_ASYNC``, only its pack waits). Otherwise the seal
        runs on the forward stream, after the step in flight, as without this. Decisions depend only on host state, so
        every TP rank takes the same ones."""
        if not self.seal_beside_step:
            return
        self._in_flight, self._planned_pages = self._planned_pages, np.zeros(0, dtype=np.int64)
        self.window.take_snapshot()
        self._frees_at_plan_end = self.pool.store.granule_frees
        dev = torch.device(self.pool.device)
        if dev.type == "cuda":
            self._plan_stream = torch.cuda.current_stream(dev)
            self._plan_end = torch.cuda.Event()
            self._plan_end.record(self._plan_stream)

    def after_launch(self) -> bool:
        """Right after SGLang launched the step just planned, before the scheduler waits for the step before it (a
        hook after ``Scheduler.run_batch``, :mod:`mosaickv_sglang.patches.scheduler`), beside the step just launched,
        on the side stream: pack the pending seal when the next plan would pack it for its plan count or for a low
        hot pool (:meth:`_pending_waits` with no new pages), and plan the first half whose pages the plan just made
        chose (:attr:`plan_after_launch`). Their host time then fills the scheduler's wait for the step before,
        instead of delaying this launch or the next one inside a plan.

        The pack only with :attr:`seal_beside_step` and :attr:`pack_after_launch`, at least one plan after the one
        that planned it (whose planner was just launched), and with no arena granule freed since the last plan
        (:meth:`_can_seal_beside`); otherwise the next plan decides as before. Host state only, so every
        tensor-parallel rank decides alike. Returns whether it packed (or voided) the pending seal or planned one."""
        self._launch_hooked = True
        t0 = time.perf_counter()
        packed = self._pack_after_launch()
        started = self._start_after_launch()
        sliced = not (packed or started) and self._slice_after_launch()
        if packed or started or sliced:
            self.after_launch_seconds += time.perf_counter() - t0
        return packed or started or sliced

    def _after_launch_stream(self) -> contextlib.AbstractContextManager:
        """The last plan's stream (SGLang's forward stream, which the hook's caller may not be on) as the current one,
        so that :meth:`_beside_step` makes it, not the caller's, wait."""
        return contextlib.nullcontext() if self._plan_stream is None else torch.cuda.stream(self._plan_stream)

    def _pack_after_launch(self) -> bool:
        pending = self._pending
        if pending is None or not (self.seal_beside_step and self.pack_after_launch) or pending.plans_waited < 1:
            return False
        if pending.pack_left:  # a pack in layer slices under way: its next slice
            if not self._can_seal_beside():
                return False
            with self._after_launch_stream(), self._beside_step(), self._seal_time(count_call=False):
                self._pack_slice(pending)
            self.pack_slices_after_launch += 1
            return True
        if not self._can_seal_beside() or self._pending_waits(0, plans_waited=pending.plans_waited + 1):
            return False
        self.packs_sooner += int(pending.plans_waited + 1 < self._pack_plans(len(pending.slices)))
        with self._after_launch_stream(), self._beside_step():
            self.finish_seal(slices=self.pack_layer_slices)
        self.packs_after_launch += 1
        return True

    def _start_after_launch(self) -> bool:
        """The first half the last plan left to this hook (it chose its pages beside the step, before any granule was
        freed, with no seal pending), planned from the query window that plan's step finds, on a side stream that
        waits for that plan's end, which the forward stream does not wait for (only the pack, plans later)."""
        if self._to_start is None:
            return False
        with self._after_launch_stream(), self._beside_step(forward_waits=False):
            self._start_chosen()
        self.starts_after_launch += 1
        return True

    def _slice_after_launch(self) -> bool:
        """The next layer slice of the pending seal (``MOSAICKV_SEAL_LAYER_SLICES``), as its first one: on the side
        stream, which the forward stream does not wait for. Nothing once a page of it was freed or sealed since it was
        planned: the pack voids it."""
        pending = self._pending
        if pending is None or pending.next_slice is None or not pending.live(self.pool.page_epoch).all():
            return False
        with self._after_launch_stream(), self._beside_step(forward_waits=False), self._seal_time(count_call=False):
            self._plan_slice(pending)
        self.slices_after_launch += 1
        return True

    def _plan_slice(self, pending: PendingSeal) -> None:
        """Plan :attr:`PendingSeal.next_slice` of ``pending``, from the query window its first slice planned from."""
        pending.add_slice(self._timed_plan_layers(pending.pages, pending.dense_mask, pending.ratio, pending.next_slice,
                                                  pending.queries))  # fmt: skip

    def _slices_for_start(self, num_pages: int) -> List[range]:
        """The layer slices a first half of ``num_pages`` pages started now is planned in: when later launches will
        plan them (beside the step, the hook seen) :attr:`layer_slices` of them, more for a seal of more than
        :attr:`slice_pages` pages (its seal graph's bucket's), else one."""
        n = self.layer_slices if self.seal_beside_step and self._launch_hooked else 1
        bucket = None if self.seal_graphs is None else self.seal_graphs.bucket_for(num_pages)
        return self._page_scaled_layer_slices(n, bucket or num_pages)

    def _page_scaled_layer_slices(self, slices: int, pages: int) -> List[range]:
        """The model's layers in ``slices`` slices, more for a seal of more than :attr:`slice_pages` pages."""
        return layer_slices(self.pool.layer_num, page_scaled_slices(slices, pages, self.slice_pages))

    def _start_chosen(self) -> None:
        """:meth:`start_seal` of the pages a plan left to :meth:`after_launch`, those of them still holding what they
        held then (a page freed or sealed since is left out)."""
        pages, sinks = self._still_held(self._to_start)
        self._to_start = None
        if pages.size:
            self.start_seal(pages, sinks)

    def _can_seal_beside(self) -> bool:
        return self.seal_beside_step and self._frees_at_plan_end == self.pool.store.granule_frees

    def _defer(self, pages: np.ndarray, sink_mask: np.ndarray) -> None:
        self._deferred = self._noted(pages, sink_mask)

    def _noted(self, pages: np.ndarray, sink_mask: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(pages, their epochs now, sink_mask)``, for :meth:`_still_held` later."""
        return pages, self.pool.page_epoch[pages].copy(), sink_mask

    def _still_deferrable(self) -> Tuple[np.ndarray, np.ndarray]:
        """The deferred pages still held (:meth:`_still_held`), with their sink flags."""
        return self._still_held(self._deferred)

    def _still_held(self, noted: Tuple[np.ndarray, np.ndarray, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """Of pages :meth:`_noted`, those that still hold what they held (same epoch: neither freed nor sealed since)
        and a physical page, with their sink flags."""
        pages, epochs, sinks = noted
        if pages.size == 0:
            return pages, sinks
        ok = (self.pool.page_epoch[pages] == epochs) & (self.pool.physical_pages(torch.from_numpy(pages)).numpy() >= 0)
        return pages[ok], sinks[ok]

    @contextlib.contextmanager
    def _beside_step(self, forward_waits: bool = True) -> Iterator[None]:
        """Queue the seal's device work on a side stream that waits for the end of the last plan (not for the step
        in flight), its compaction for the step too; the current stream waits for the seal, unless not
        ``forward_waits``: then only what later uses the work waits for it (:meth:`_forward_waits_for_side`), for a
        first half of a seal (:meth:`start_seal`), whose planner changes nothing a step reads and can so run beside
        the next steps too. Off CUDA: only the snapshot of the query window."""
        dev = torch.device(self.pool.device)
        if dev.type != "cuda":
            with self.window.reading_snapshot():
                yield
            self.side_seals += 1
            return
        store, fwd = self.pool.store, torch.cuda.current_stream(dev)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=dev)
        side = self._side_stream
        if self._plan_end is not None:
            side.wait_event(self._plan_end)
        else:
            side.wait_stream(fwd)
        store.before_move = _waiter(side, fwd)
        try:
            with torch.cuda.stream(side), self.window.reading_snapshot():
                yield
        finally:
            store.before_move = None
            if forward_waits:
                fwd.wait_stream(side)
                self._side_unwaited = False
            else:
                self._side_unwaited = True
                self.window.release_snapshot(side)
        self.side_seals += 1

    def _forward_waits_for_side(self) -> None:
        """Before the current stream uses what side-stream work it did not wait for wrote (a pending seal's plans, the
        planner's cached tables), it waits for that work; nothing to do on the side stream itself or off CUDA."""
        if not self._side_unwaited:
            return
        current = torch.cuda.current_stream(torch.device(self.pool.device))
        if current != self._side_stream:
            current.wait_stream(self._side_stream)
            self._side_unwaited = False

    def maybe_log_status(self, now: Optional[float] = None) -> None:
        """Every :attr:`status_interval` seconds in which pages were sealed, one INFO line: pages sealed (under
        pressure, left dense), the sealing calls and their time since start, arena room used, the tokens the pool can
        still take, the compression ratio of the sealed segments and, with the sidecar, its queue depth, the plans
        applied and discarded, the re-segmentations (``resegment off`` with ``--mosaic-resegment off``) and the
        slowest unit of each kind of its tick work (:meth:`SidecarBridge.take_slowest`), then the slowest decode plans
        and the garbage-collection pauses since the last line (:attr:`stalls`); with the overlap scheduler, how the
        plans read their rows (:meth:`note_rows_read`) and the seals beside the step in flight."""
        now = time.monotonic() if now is None else now
        if now - self._logged_at < self.status_interval or self.pages_sealed == self._logged_sealed:
            return
        ledger = self.pool.arena_ledger
        sidecar = ""
        if self.sidecar is not None:
            counters = self.sidecar.counters()
            reseg = f"{counters.resegmentations} re-segmentations" if self.sidecar.resegment else "resegment off"
            slowest = sorted(self.sidecar.take_slowest().items(), key=lambda kv: -kv[1])
            units = ", ".join(f"{kind} {1e3 * sec:.1f} ms" for kind, sec in slowest)
            sidecar = (
                f"; sidecar: {counters.queue_depth} jobs queued, {self.sidecar.plans_applied} plans applied, "
                f"{self.sidecar.plans_discarded} discarded, {reseg}" + (f", slowest units {units}" if units else "")
            )
        beside = (f" ({self.side_seals} beside the step in flight, {self.pages_deferred} pages deferred, "
                  f"{self.cold_pages_sealed} cold pages sealed to keep {self.low_water_pages} hot pages free)"
                  if self.seal_beside_step else "")  # fmt: skip
        if self.seal_async:
            pack_plans = self._pack_plans(len(self._slices_for_start(1)))  # the smallest seal's
            capped = f"{self.seals_capped} capped at {self.max_seal_pages} pages, " if self.max_seal_pages else ""
            beside += (f" ({self.async_seals} packed {pack_plans} plans later or sooner, "
                       f"{self.pending_voided} voided, {capped}{self.packs_sooner} taken sooner for a hot pool below "
                       f"{self.pack_water_pages} free pages; after a launch {self.packs_after_launch} packed and "
                       f"{self.starts_after_launch} planned{self._slices_status()} in "
                       f"{self.after_launch_seconds:.1f} s; "
                       f"{self.packs_waited} waited {1e3 * self.pack_wait_seconds:.0f} ms for their planner)"
                       )  # fmt: skip
        if self.seal_graphs is not None:
            beside += f" ({self.seal_graphs.status()})"
        ring = ring_status(self.pool.device)
        if ring:
            beside += f" ({ring})"
        if self.rows_read:
            reads = ", ".join(f"{kind} {why} {n}" for (kind, why), n in sorted(self.rows_read.items()))
            beside += f" (plans' rows read: {reads})"
        span = f", GPU span {self.spans.collect():.1f} s" if self.spans.enabled else ""
        logger.info(
            "MosaicKV: %d pages sealed (%d under hot-pool pressure, %d left dense for want of arena room) in %d "
            "calls%s (%.1f s, planning %.1f s%s), arena %.1f%% reserved (%d compactions), %d free hot pages, room for "
            "%d more tokens, compression ratio %.2f%s%s",
            self.pages_sealed, self.pressure_pages_sealed, self.pages_left_dense, self.seal_calls, beside,
            self.seal_seconds, self.seal_plan_seconds, span,
            100.0 * ledger.reserved / max(1, ledger.capacity), self.pool.store.compactions,
            self.pool.num_free_physical_pages,
            self.pool.admissible_tokens(), self.pool.store.compression_ratio(), sidecar, self.stalls.summary(),
        )  # fmt: skip
        self._logged_at, self._logged_sealed = now, self.pages_sealed

    def _slices_status(self) -> str:
        out = ""
        if self.layer_slices > 1:
            per = f" a {self.slice_pages} pages" if self.slice_pages else ""
            out += (f" in {self.layer_slices} layer slices{per}, {self.slices_after_launch} later slices after a "
                    f"launch, {self.slices_caught_up} by a pack")  # fmt: skip
        if self.pack_layer_slices > 1:
            out += (f", packs in {self.pack_layer_slices} layer slices ({self.pack_slices_after_launch} later slices "
                    f"after a launch, {self.packs_rolled_back} rolled back)")  # fmt: skip
        return out

    # --- planning and sealing ----------------------------------------------------------------------------------------
    def _page_slots(self, pages: np.ndarray) -> torch.Tensor:
        """Physical slots of ``pages``, page-major: shape ``[P * S]`` on the pool's device."""
        return self._slots(self.pool.physical_pages(torch.from_numpy(pages)))

    def _slots(self, physical_pages: torch.Tensor) -> torch.Tensor:
        """The slots of the pages at ``physical_pages`` (on the host), page-major: ``[P * S]`` on the pool's device."""
        s, dev = self.pool.page_size, torch.device(self.pool.device)
        phys = to_device(physical_pages, dev)
        return (phys[:, None] * s + torch.arange(s, device=dev)[None, :]).reshape(-1)

    def _segments(self, buf: torch.Tensor, slots: torch.Tensor, num_pages: int) -> torch.Tensor:
        """The segments of one layer's dense buffer at ``slots``: ``[P * H_kv, S, d]``, page-major, head-minor."""
        s, h, d = self.pool.page_size, int(self.pool.head_num), int(self.pool.head_dim)
        return buf[slots].view(num_pages, s, h, d).permute(0, 2, 1, 3).reshape(num_pages * h, s, d)

    def _stacked_segments(self, bufs: Sequence[torch.Tensor], slots: torch.Tensor, num_pages: int) -> torch.Tensor:
        """:meth:`_segments` of every layer's buffer in ``bufs``, stacked: ``[L, P * H_kv, S, d]``, one gather per
        layer (straight into the stack; two copies for a non-contiguous buffer)."""
        s, h, d = self.pool.page_size, int(self.pool.head_num), int(self.pool.head_dim)
        out = torch.empty((len(bufs), num_pages * h, s, d), dtype=bufs[0].dtype, device=bufs[0].device)
        # row of (page p, head j, token t) in a [slots * H_kv, d] view of a buffer, page-major, head-minor
        rows = (slots.view(num_pages, 1, s) * h + torch.arange(h, device=slots.device).view(1, h, 1)).reshape(-1)
        for layer, buf in enumerate(bufs):
            if buf.is_contiguous():
                torch.index_select(buf.view(-1, d), 0, rows, out=out[layer].view(-1, d))
            else:
                out[layer].copy_(self._segments(buf, slots, num_pages))
        return out

    def use_seal_graphs(self, buckets: Sequence[int]) -> None:
        """Plan seals of up to ``max(buckets)`` pages through CUDA graphs of those page counts once the query window
        is full (:mod:`~mosaickv_sglang.seal_graphs`; ``MOSAICKV_SEAL_GRAPH_PAGES``); no buckets: without graphs."""
        pool = self.pool
        h = int(pool.head_num)
        self.seal_graphs = None if not buckets else SealGraphs(
            gather=self._gather_layers, num_layers=pool.layer_num, page_size=pool.page_size, num_kv_heads=h,
            head_dim=int(pool.head_dim), group_size=self.window.group_size, window=self.window.window, menu=self.menu,
            buckets=buckets, max_segments=self.plan_max_segments, max_chunk_bytes=self.plan_max_chunk_bytes,
            device=torch.device(pool.device))  # fmt: skip

    def capture_seal_graphs_ahead(self) -> int:
        """Capture, before serving, the seal graphs a seal can replay (:meth:`SealGraphs.capture_ahead`): every bucket
        for all layers and, beside the step with layer slices, for each slice. Returns how many were captured."""
        if self.seal_graphs is None:
            return 0
        ranges = [range(self.pool.layer_num)]
        if not (self.seal_beside_step and self.layer_slices > 1):
            return self.seal_graphs.capture_ahead(ranges)
        if not self.slice_pages:
            return self.seal_graphs.capture_ahead(ranges + layer_slices(self.pool.layer_num, self.layer_slices))
        return self.seal_graphs.capture_ahead(
            ranges, {b: self._page_scaled_layer_slices(self.layer_slices, b) for b in self.seal_graphs.buckets})

    def _gather_layers(self, slots: torch.Tensor, num_pages: int,
                       layers: Optional[range] = None) -> Tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Dense K and V segments of ``layers`` (default: every layer) at ``slots`` (:meth:`_stacked_segments`)."""
        layers = range(self.pool.layer_num) if layers is None else layers
        return (self._stacked_segments([self.pool.k_buffer[li] for li in layers], slots, num_pages),
                self._stacked_segments([self.pool.v_buffer[li] for li in layers], slots, num_pages))  # fmt: skip

    def gather(self, layer: int, pages: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        """Dense K and V segments of ``pages`` (dense now) in local layer ``layer``: ``[P * H_kv, S, d]`` each."""
        slots = self._page_slots(pages)
        return tuple(self._segments(buf[layer], slots, pages.size) for buf in (self.pool.k_buffer, self.pool.v_buffer))

    def sidecar_seconds(self) -> float:
        """The sidecar bridge's scheduler time before forwards so far (tick and submissions; 0 without a sidecar)."""
        return 0.0 if self.sidecar is None else float(self.sidecar.step_seconds)

    def attach_sidecar(self, bridge: Optional["SidecarBridge"]) -> None:
        """Refine the plans of sealed pages with ``bridge`` (``None``: stop; the bridge is closed by its owner)."""
        self.sidecar = bridge

    def _budget(self, sink_mask: np.ndarray, ratio: float) -> int:
        h = int(self.pool.head_num)
        segment = dense_segment_bytes(self.pool.page_size, int(self.pool.head_dim))
        return seal_budget_bytes(sink_mask.size * h, int(np.count_nonzero(sink_mask)) * h, segment, ratio)

    def plan_layer(self, layer: int, pages: np.ndarray, sink_mask: np.ndarray, ratio: float) -> SegmentPlan:
        """Fast plan of local layer ``layer`` for ``pages`` (segments page-major, head-minor, as the pool seals)."""
        pool = self.pool
        s, h, d = pool.page_size, int(pool.head_num), int(pool.head_dim)
        dev = torch.device(pool.device)
        keys, values = self.gather(layer, pages)
        always = torch.from_numpy(np.repeat(sink_mask, h)).to(dev)
        budget = self._budget(sink_mask, ratio)
        heads = torch.arange(h, device=dev).repeat(pages.size)
        q = self.window.queries(layer)
        if q is None:
            importance = uniform_importance(keys.shape[0], s, d, dev)
            result = plan_fast(keys, values, budget_bytes=budget, importance=importance, group_ids=heads,
                               always_dense=always, menu=self.menu)  # fmt: skip
        else:
            result = plan_fast(keys, values, budget_bytes=budget, queries=q[heads], group_ids=heads,
                               always_dense=always, menu=self.menu)  # fmt: skip
        return result.plan

    def plan_layers(self, pages: np.ndarray, sink_mask: np.ndarray, ratio: float, layers: Optional[range] = None,
                    queries: Optional[FrozenQueries] = None) -> List[SegmentPlan]:  # fmt: skip
        """Fast plans of ``layers`` (default: every local layer) for ``pages`` in one planner call: for each layer, the
        plan :meth:`plan_layer` (the per-layer reference) gives, with a constant number of host reads per seal. With
        seal graphs and every layer's query window full (:meth:`QueryWindow.full_window`), through the pages'
        bucket. ``queries``: a window frozen earlier to plan from instead of :attr:`window`."""
        pool = self.pool
        h = int(pool.head_num)
        layers = range(pool.layer_num) if layers is None else layers
        window = self.window if queries is None else queries
        phys = pool.physical_pages(torch.from_numpy(pages))  # on the host
        always_dense = np.repeat(np.asarray(sink_mask, dtype=bool), h)
        budget = self._budget(sink_mask, ratio)
        full = window.full_window() if self.seal_graphs is not None else None
        if full is not None:
            plans = self.seal_graphs.plan(phys.numpy().astype(np.int64), full[layers.start:layers.stop], always_dense,
                                          budget, layers)  # fmt: skip
            if plans is not None:
                return plans
        # views, copied a planner chunk at a time: q[heads] of every layer held at once was half of a 128-page seal's
        # transient memory on the 8B shape (2.1 of 4.1 GB, ninth run)
        queries = [None if q is None else q.expand(pages.size, *q.shape)
                   for q in map(window.queries, layers)]  # fmt: skip
        keys, values = self._gather_layers(self._slots(phys), pages.size, layers)
        results = plan_fast_layers(keys, values, budget_bytes=[budget] * len(layers), queries=queries,
                                   group_ids=np.tile(np.arange(h), pages.size), always_dense=always_dense,
                                   menu=self.menu, max_segments=self.plan_max_segments,
                                   max_chunk_bytes=self.plan_max_chunk_bytes)  # fmt: skip
        return [r.plan for r in results]

    def seal(self, pages: np.ndarray, sink_mask: np.ndarray) -> bool:
        """Plan and seal ``pages`` in every layer; when they do not fit, retry with a higher ratio, then with the sinks
        compressed too, then leave them dense. Counted in :attr:`seal_calls` and :attr:`seal_seconds`.

        Whether they fit is the arena ledger's decision (:class:`~mosaickv_sglang.pool.ArenaLedger`): it depends only
        on the pages, the sinks and the ratio, so every TP rank decides alike. An arena that is full although the
        ledger had room (fragmentation) is a rank-local outcome and is logged as an error.

        Returns
        -------
        bool
            Whether the pages were sealed.
        """
        self._forward_waits_for_side()
        with self._seal_time(count_call=True):
            return self._seal(pages, sink_mask)

    @contextlib.contextmanager
    def _seal_time(self, count_call: bool) -> Iterator[None]:
        """Counts the time inside in :attr:`seal_seconds` (the sidecar's copies excluded) and, on CUDA, the device
        work queued inside in :attr:`spans`."""
        t0 = time.perf_counter()
        submitted0 = self.sidecar.submit_seconds if self.sidecar is not None else 0.0
        self.spans.begin()
        try:
            yield
        finally:
            self.spans.end()
            submitted = self.sidecar.submit_seconds - submitted0 if self.sidecar is not None else 0.0
            self.seal_seconds += time.perf_counter() - t0 - submitted
            self.seal_calls += int(count_call)

    def start_seal(self, pages: np.ndarray, sink_mask: np.ndarray) -> bool:
        """The first half of :meth:`seal` (:mod:`.pending_seal`): plan ``pages`` and start copying their payload
        sizes to the host, without waiting for the device; :meth:`finish_seal` packs them. A seal still pending is
        finished first. Returns whether a plan is now pending (``False``: no arena room, the pages stay dense)."""
        self.finish_seal()
        self._forward_waits_for_side()
        if 0 < self.max_seal_pages < pages.size:
            self._due_again(pages[self.max_seal_pages:], sink_mask[self.max_seal_pages:])
            pages, sink_mask = pages[: self.max_seal_pages], sink_mask[: self.max_seal_pages]
            self.seals_capped += 1
        with self._seal_time(count_call=False):
            fitting = self._fitting(pages, sink_mask)
            if fitting is None:
                self._no_room(pages)
                return False
            ratio, dense_mask, reserve = fitting
            slices = self._slices_for_start(int(pages.size))
            pending = PendingSeal(pages, sink_mask, self.pool.page_epoch[pages].copy(), ratio, dense_mask, reserve,
                                  slices, queries=self.window.frozen() if len(slices) > 1 else None)  # fmt: skip
            self._plan_slice(pending)
            self._pending = pending
            return True

    def _timed_plan_layers(self, pages: np.ndarray, dense_mask: np.ndarray, ratio: float,
                           layers: Optional[range] = None, queries: Optional[FrozenQueries] = None,
                           ) -> List[SegmentPlan]:  # fmt: skip
        """:meth:`plan_layers`, its time counted in :attr:`seal_plan_seconds`."""
        t_plan = time.perf_counter()
        plans = self.plan_layers(pages, dense_mask, ratio, layers, queries)
        self.seal_plan_seconds += time.perf_counter() - t_plan
        return plans

    def finish_seal(self, slices: int = 1) -> bool:
        """The second half: pack the pending seal's pages, if every one still holds what was planned and the ledger
        still has their room; else leave them dense, the live ones due again at the next plan. With ``slices`` > 1
        only the first of that many slices of the layers (:attr:`pack_layer_slices`; the seal stays pending, later
        launches pack the rest); a pack in slices under way is finished at once. Returns whether pages were sealed, in
        every layer or in the first slice (``False`` too when nothing was pending)."""
        pending = self._pending
        if pending is None:
            return False
        self._forward_waits_for_side()
        with self._seal_time(count_call=not pending.pack_left):
            if not pending.pack_left:
                live = pending.live(self.pool.page_epoch)
                if not live.all() or int(pending.reserve.sum()) > self.pool.arena_ledger.room:
                    self._pending = None
                    self.pending_voided += 1
                    self._due_again(pending.pages[live], pending.sink_mask[live])
                    return False
                while pending.next_slice is not None:  # due before later launches planned every slice
                    self._plan_slice(pending)
                    self.slices_caught_up += 1
                pending.pack_left = layer_slices(self.pool.layer_num, slices)
                if slices > 1:
                    return self._pack_slice(pending)
            while pending.pack_left:
                if not self._pack_slice(pending):
                    return False
            return True

    def _due_again(self, pages: np.ndarray, sink_mask: np.ndarray) -> None:
        """``pages`` join those deferred, due again at the next plan."""
        held, held_sinks = self._still_deferrable()
        self._defer(np.concatenate([held, pages]), np.concatenate([held_sinks, sink_mask]))

    def _pack_slice(self, pending: PendingSeal) -> bool:
        """Pack the pending seal's next slice of the layers (:attr:`PendingSeal.pack_left`; one slice of every layer is
        what :meth:`_commit` does): the first reserves the ledger's room, the last hands the pages to the sidecar, frees
        their hot pages and ends the seal. A later slice finding a page freed since, or no arena room, rolls the seal
        back (:meth:`_roll_back`). Returns ``False`` when nothing more will be packed (left dense, or rolled back)."""
        layers = pending.pack_left.pop(0)
        pool = self.pool
        first, last = layers.start == 0, not pending.pack_left
        if not first and not pending.live(pool.page_epoch).all():
            self._roll_back(pending)
            return False
        if not self._pack(pending.pages, pending.ratio, pending.dense_mask, pending.plans[layers.start : layers.stop],
                          pending.host_sizes(layers), None if first and last else layers, hand_over=last):  # fmt: skip
            if first:
                self._pending = None
                self._count_left_dense(pending.pages)
                self._pack_done(pending, False)
            else:
                self._roll_back(pending)
            return False
        pending.epochs = pool.page_epoch[pending.pages].copy()
        if first:
            pool.arena_ledger.reserve(pending.pages.astype(np.int64), pending.reserve)
        if last:
            self._pending = None
            self.pages_sealed += int(pending.pages.size)
            self._pack_done(pending, True)
        return True

    def _pack_done(self, pending: PendingSeal, sealed: bool) -> None:
        self.packs_waited += int(pending.waited_seconds > 0)
        self.pack_wait_seconds += pending.waited_seconds
        self.async_seals += int(sealed)

    def _roll_back(self, pending: PendingSeal) -> None:
        """A pack in slices that cannot go on: its pages still held go back to dense in every layer (their payloads
        and ledger room freed; the freed ones the pool released already), due again at the next plan."""
        self._pending = None
        pool = self.pool
        live = pending.live(pool.page_epoch)
        held = pending.pages[live].astype(np.int64)
        if held.size:
            held_t = torch.from_numpy(held)
            pool.store.free(held_t)
            pool.store.mark_dense(held_t)
            pool.arena_ledger.release(held)
            pool.page_epoch[held] += 1
        self.packs_rolled_back += 1
        self.pending_voided += 1
        self._pack_done(pending, False)
        self._due_again(held, pending.sink_mask[live])

    def _with_cold_pages(
        self, chosen: np.ndarray, sink_mask: np.ndarray, short: int, new_pages: np.ndarray
    ) -> Tuple[np.ndarray, np.ndarray]:
        """Beside the step: ``chosen`` and, when the hot pool runs low (fewer free pages after the seal than
        :attr:`low_water_pages` beyond this plan's needs, ``short`` pages from none: zero or less), the least
        recently written complete pages that bring it back, at least a batch: the pages hot-pool pressure would seal
        later inside a step (finished requests' last pages, left dense in the radix cache), sealed now beside it.
        Counted in :attr:`cold_pages_sealed`."""
        pool = self.pool
        low = short + self.low_water_pages - chosen.size
        if low <= 0 or self._pending is not None:
            return chosen, sink_mask
        taken = [chosen, new_pages, self._in_flight, self._deferred[0]]
        cold = pool.complete_dense_pages(exclude=np.concatenate([np.asarray(t, dtype=np.int64) for t in taken]))
        cold = cold[: max(low, self.min_seal_pages - chosen.size)]
        if chosen.size + cold.size < self.min_seal_pages:
            return chosen, sink_mask
        self.cold_pages_sealed += int(cold.size)
        return np.concatenate([chosen, cold]), np.concatenate([sink_mask, np.zeros(cold.size, dtype=bool)])

    def _pack_plans(self, slices: int) -> int:
        """The plans after its own that a pending seal planned in ``slices`` layer slices is packed at when the hot pool
        has room: :attr:`seal_async_plans`, and with ``S`` > 1 slices at least ``S + 1``: the launches after the first
        plan the other ``S - 1``, and the pack comes a launch after the last, so it neither plans a slice itself nor
        waits for one just launched (the thirty-third run's ``S`` = 8 with 8 plans planned the last slice in every pack
        and waited)."""
        return max(1, self.seal_async_plans, slices + 1 if slices > 1 else 1)

    def _pending_waits(self, need: int, plans_waited: Optional[int] = None) -> bool:
        """Whether the pending seal waits for a later plan: fewer than :meth:`_pack_plans` plans since it was
        planned (counting this one; ``plans_waited``, else the pending seal's own count), and the hot pool has room
        for this plan's ``need`` new pages without it; beside the step, from :attr:`pack_sooner_after` plans on, room
        above :attr:`pack_water_pages` too (a low pool packs it now, beside the step, so that cold pages can follow at
        this plan instead of pressure sealing inside a later step). A pack in layer slices under way waits for the
        launches after this plan unless the pool lacks the room or the plan cannot seal beside the step. Host state
        only, so every tensor-parallel rank decides alike."""
        pending = self._pending
        assert pending is not None
        if pending.pack_left:
            return self._shortfall(need) <= 0 and self._can_seal_beside()
        plans = pending.plans_waited if plans_waited is None else plans_waited
        if plans >= self._pack_plans(len(pending.slices)):
            return False
        short = self._shortfall(need)
        # with slice pages, not before the launch after the one that plans the last slice
        sooner_after = (max(self.pack_sooner_after, len(pending.slices) + 1) if self.slice_pages
                        else self.pack_sooner_after)  # fmt: skip
        if self._can_seal_beside() and plans >= sooner_after:
            return -short >= self.pack_water_pages
        return short <= 0

    def _shortfall(self, need: int) -> int:
        """Hot pages this plan lacks for its ``need`` new pages and :attr:`reserve_pages` (zero or less: none; its
        negation is the room left)."""
        return need + self.reserve_pages - self.pool.num_free_physical_pages

    def _policy_seal(self, pages: np.ndarray, sink_mask: np.ndarray) -> None:
        """A seal of policy pages: whole, or its first half with :attr:`seal_async` (while a seal is pending, the
        pages wait for a later plan with the deferred ones)."""
        if self.seal_async:
            if self._pending is not None:
                self._due_again(pages, sink_mask)
                return
            self.start_seal(pages, sink_mask)
        else:
            self.seal(pages, sink_mask)

    def _seal(self, pages: np.ndarray, sink_mask: np.ndarray) -> bool:
        planned = self._plan_fitting(pages, sink_mask)
        if planned is None:
            self._no_room(pages)
            return False
        return self._commit(pages, *planned)

    def _plan_fitting(
        self, pages: np.ndarray, sink_mask: np.ndarray
    ) -> Optional[Tuple[float, np.ndarray, np.ndarray, List[SegmentPlan]]]:
        """Plans for the first ratio (higher ones, then the sinks compressed too) whose reservation the arena ledger
        has room for: ``(ratio, dense mask, reservation, plans)``, or ``None``."""
        fitting = self._fitting(pages, sink_mask)
        if fitting is None:
            return None
        ratio, dense_mask, reserve = fitting
        return ratio, dense_mask, reserve, self._timed_plan_layers(pages, dense_mask, ratio)

    def _fitting(self, pages: np.ndarray, sink_mask: np.ndarray) -> Optional[Tuple[float, np.ndarray, np.ndarray]]:
        """The first ratio (higher ones, then the sinks compressed too) whose reservation the arena ledger has room
        for: ``(ratio, dense mask, reservation)``, or ``None``."""
        ledger = self.pool.arena_ledger
        ratio = float(self.pool.mosaic_config.compression_ratio)
        # higher ratios first; last, the sinks compressed too, so that every page fits at the target ratio (the room
        # the scheduler is told about, see MosaicMHATokenToKVPool.admissible_tokens)
        attempts = [(ratio * ARENA_RETRY_FACTOR**i, sink_mask) for i in range(ARENA_RETRIES + 1)]
        if sink_mask.any():
            attempts.append((ratio, np.zeros_like(sink_mask)))
        for ratio, dense_mask in attempts:
            if ratio > min(MAX_COMPRESSION_RATIO, self.max_ratio):
                continue
            reserve = ledger.reservation(dense_mask, ratio)
            if int(reserve.sum()) <= ledger.room:
                return ratio, dense_mask, reserve
        return None

    def _commit(self, pages: np.ndarray, ratio: float, dense_mask: np.ndarray, reserve: np.ndarray,
                plans: List[SegmentPlan], sizes: Optional[np.ndarray] = None) -> bool:  # fmt: skip
        """Hand the pages to the sidecar, pack them with ``plans`` and reserve their room in the ledger."""
        if not self._pack(pages, ratio, dense_mask, plans, sizes):
            self._count_left_dense(pages)
            return False
        self.pool.arena_ledger.reserve(pages.astype(np.int64), reserve)
        self.pages_sealed += int(pages.size)
        return True

    def _pack(self, pages: np.ndarray, ratio: float, dense_mask: np.ndarray, plans: List[SegmentPlan],
              sizes: Optional[np.ndarray], layers: Optional[range] = None, hand_over: bool = True) -> bool:  # fmt: skip
        """Pack ``pages`` with ``plans`` in every layer or in the pool's local ``layers``, handed to the sidecar first
        when ``hand_over``. ``False`` (logged) when an arena has no room although the ledger had: nothing packed."""
        pool = self.pool
        layer_ids = None if layers is None else [pool.start_layer + i for i in layers]
        with self.sidecar.sealing() if self.sidecar is not None and hand_over else contextlib.nullcontext():
            if self.sidecar is not None and hand_over:
                self.sidecar.submit_sealed(pages, dense_mask, ratio, self.gather)
            try:
                pool.seal_pages(torch.from_numpy(pages.astype(np.int64)), plans, layer_ids=layer_ids, sizes=sizes)
            except ArenaFullError as err:
                logger.error("MosaicKV: an arena is full although its ledger has room (%s); %d pages stay dense "
                             "on this rank only, so tensor-parallel ranks may now diverge", err,
                             pages.size)  # fmt: skip
                return False
        return True

    def _no_room(self, pages: np.ndarray) -> None:
        ledger = self.pool.arena_ledger
        if not self._warned_arena:
            logger.warning("MosaicKV: compressed arena full (%d of %d granules reserved); %d pages stay dense",
                           ledger.reserved, ledger.capacity, pages.size)  # fmt: skip
            self._warned_arena = True
        self._count_left_dense(pages)

    def _count_left_dense(self, pages: np.ndarray) -> None:
        """Counts in :attr:`pages_left_dense` those of ``pages`` not counted since they were last allocated."""
        epochs = self.pool.page_epoch
        if self._left_dense_epoch is None:
            self._left_dense_epoch = np.full(epochs.shape, -1, dtype=np.int64)
        pages = np.unique(np.asarray(pages, dtype=np.int64))
        fresh = self._left_dense_epoch[pages] != epochs[pages]
        self.pages_left_dense += int(np.count_nonzero(fresh))
        self._left_dense_epoch[pages] = epochs[pages]
