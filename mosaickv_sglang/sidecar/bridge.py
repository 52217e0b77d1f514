# SPDX-License-Identifier: Apache-2.0
"""The server side of the sidecar: what the sealer hands it, and how its plans reach the pool.

One :class:`SidecarBridge` per scheduler (TP rank), owned by the :class:`~mosaickv_sglang.sealer.Sealer`:

* **Submission.** When the sealer seals a batch of pages with the fast planner, :meth:`SidecarBridge.submit_sealed`
  gathers on the device the dense K/V of as many of those pages as free sidecar slots allow (whole pages of one layer
  per job, the layers taken in turn so that every layer gets refined), with the layer's recent queries, and starts
  their copies to the host without waiting for them (:class:`HostCopy`), into the bridge's
  :class:`~mosaickv_sglang.sidecar.pinned_staging.PinnedStaging` (host memory page-locked once, at start); the slots
  are reserved. A batch whose jobs the staging cannot hold keeps its fast plans; one whose jobs it holds but not the
  host copies of its shared pages is submitted without those copies (they serve only re-segmentation). Once the copies
  have landed, ticks hand the jobs (with the byte budget the fast plan had for those pages) to the shared slot
  buffers one at a time, within their time budget: the scheduler never waits for the device, and a batch of jobs is
  spread over steps instead of landing in one. Sink pages (kept dense) are not
  submitted. A batch that finds no free slot keeps its fast plans: the queue (jobs on their way, in flight, or
  finished and waiting to be applied) is bounded by the slots.
* **Application.** :meth:`SidecarBridge.tick` (before each forward, and on idle scheduler ticks) submits the batches
  whose copies have landed, reads the finished jobs and re-packs each one's pages with the sidecar's plan
  (:meth:`MosaicMHATokenToKVPool.reseal_pages`, or with the I/O thread of :meth:`SidecarBridge.start` its two
  halves: the uploads on that thread, the rest on the scheduler's): new payloads next to the old, descriptors
  swapped, then the old payloads freed. Freeing them at once is safe here because ticks run on the scheduler
  thread, either in the attention plan (on the forward stream, after the step in flight, with or without SGLang's
  overlap scheduler) or on idle scheduler ticks with no step in flight, and every later kernel that could reuse the
  freed granules is queued after the swap (the forward stream waits for the scheduler's stream before each step).
  The tick's time budget (:data:`FORWARD_TICK_MS` before a forward, :data:`IDLE_TICK_MS` when idle, from the
  tick's start) bounds all of it: landed batches are submitted a unit at a time (one layer of the host copies of a
  batch's shared pages, or one job) and finished plans applied while the tick is within its budget, at least one of
  the two per tick; the plans left wait in the bridge, in order, and are applied first on later ticks (a step where
  several jobs finish at once does not pay for all of them). :meth:`SidecarBridge.drain` applies everything.
* **Staleness.** A job's segment keys carry the page's epoch (:attr:`MosaicMHATokenToKVPool.page_epoch`, bumped
  when a page is sealed or freed). A plan is applied only if every page of the job still holds the contents it was
  made for and is still sealed in that layer, checked again when a plan that waited is applied; otherwise it is
  discarded. Host copies of pages freed before their copies landed are not kept.

* **Re-segmentation of shared prefixes.** Extend batches tell the bridge which request reads which pages
  (:meth:`SidecarBridge.observe_readers`); a page read by a second request (a prefix shared through the radix cache)
  is queued (:class:`~mosaickv_sglang.sidecar.resegment.ResegmentQueue`), and idle scheduler ticks
  (:meth:`SidecarBridge.on_idle`) re-plan a slice of the queue with the queries of the page's readers that are
  still in the sealer's query window (all its readers merged; the recent queries of every request when none of
  theirs is left), at the ratio the page was sealed with. The dense source is the bridge's host copy of the page
  (the *shadow*: the copies made for the sidecar, and every sealed page already known to be shared), bounded by
  ``shadow_bytes`` and evicted oldest first; a shared page without a copy keeps its plan. With
  ``--mosaic-resegment off`` the bridge neither records readers nor queues shared pages nor keeps host copies (they
  serve only re-segmentation): sealed pages are still refined.

The plans keep each page within the byte budget the fast plan had (the arena ledger's reservation is unchanged), so
applying them, early or late, alters no page-level decision: TP ranks whose sidecars finish at different times still
agree on every allocation.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, ContextManager, Deque, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch

from mosaickv_sglang.config import float_env, positive_int_env
from mosaickv_sglang.pool import ArenaFullError, seal_budget_bytes
from mosaickv_sglang.pool.store import StagedReseal, pin_plan
from mosaickv_sglang.sidecar.client import JobOutcome, JobStatus, SidecarClient, SidecarConfig, SidecarCounters
from mosaickv_sglang.sidecar.page_copies import PageCopies
from mosaickv_sglang.sidecar.pinned_staging import PinnedStaging
from mosaickv_sglang.sidecar.protocol import REASON_RESEGMENT, REASON_SEALED, SegmentKey
from mosaickv_sglang.sidecar.resegment import ResegmentQueue, SharedSegment
from mosaickv_sglang.strategies import axes_menu
from mosaickv_sglang.strategies.base import dense_segment_bytes

if TYPE_CHECKING:
    from mosaickv_sglang.kv_pool import MosaicMHATokenToKVPool
    from mosaickv_sglang.sealer import QueryWindow

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_SEGMENTS", "HostCopy", "SidecarBridge", "to_host"]

# Segments per job at most (rounded down to whole pages): small jobs keep each slot's copy and plan short.
DEFAULT_MAX_SEGMENTS = 32
# Time budget of a tick before a forward (ms), from its start: landed batches are submitted and finished plans applied
# while the tick is within it (at least one of each, so one may overrun it); the client's part (reading replies,
# copying plans out) is bounded by the same budget on its own.
FORWARD_TICK_MS = 1.0
# Time budget of an idle scheduler tick (ms), as FORWARD_TICK_MS; re-segmentation jobs submitted per idle tick at most.
IDLE_TICK_MS = 3.0
IDLE_JOBS = 1
# Host copies of sealed pages kept for re-segmentation, per scheduler (bytes).
DEFAULT_SHADOW_BYTES = 1 << 30
# Shared pages whose host copies (one layer) a unit keeps: a slot's first use faults its memory in (about 160 us a page
# of the 8B shape), and one layer's copies at once took the sixteenth run's SmolLM2 ticks 9.7 ms (8B: up to 31 ms).
SHARED_PAGES_PER_UNIT = 4
# Longest wait of the I/O thread for a reply or a new batch before it looks again (seconds): either wakes it at once.
IO_WAIT_S = 0.1
SWITCH_INTERVAL_ENV = "MOSAICKV_SIDECAR_SWITCH_INTERVAL_MS"
DEFAULT_SWITCH_INTERVAL_MS = 0.5
"""CPython's switch interval while the I/O thread runs (milliseconds; ``MOSAICKV_SIDECAR_SWITCH_INTERVAL_MS``, 0
leaves the interpreter's). A thread that wants the interpreter's lock while another runs Python waits up to this
long before asking for it (5 ms by default): the scheduler could wait that long for the I/O thread."""


STAGING_ENV = "MOSAICKV_SIDECAR_STAGING_MB"
DEFAULT_STAGING_MB = 1024
"""Host memory the sealed batches' copies land in, per scheduler (MiB; ``MOSAICKV_SIDECAR_STAGING_MB``), page-locked
once when the bridge is built: a job of the 8B shape (4 pages of 8 KV heads, 64 tokens, d 128, bf16, and the layer's
fp32 queries) takes about 1.5 MiB, a shared page's copies of every layer 8 MiB."""


def staging_bytes() -> int:
    """The capacity of the bridge's staging in bytes, from :data:`STAGING_ENV` or :data:`DEFAULT_STAGING_MB`."""
    return positive_int_env(STAGING_ENV, DEFAULT_STAGING_MB, " number of MiB") << 20


def io_switch_interval() -> float:
    """The switch interval to run the I/O thread with, in seconds (0: leave the interpreter's), from
    :data:`SWITCH_INTERVAL_ENV` or :data:`DEFAULT_SWITCH_INTERVAL_MS`."""
    return float_env(SWITCH_INTERVAL_ENV, DEFAULT_SWITCH_INTERVAL_MS, 0.0, 1000.0,
                     "milliseconds in [0, 1000] (0: CPython's own)") / 1e3

Gather = Callable[[int, np.ndarray], Tuple[torch.Tensor, torch.Tensor]]


def _dtype_sizes(sizes: Sequence[Tuple[int, torch.dtype]]) -> List[Tuple[int, torch.dtype]]:
    """Elements per dtype of tensors of ``sizes`` (``(numel, dtype)`` each), in the order of :func:`_by_dtype`."""
    totals: Dict[torch.dtype, int] = {}
    for numel, dtype in sizes:
        totals[dtype] = totals.get(dtype, 0) + int(numel)
    return [(numel, dtype) for dtype, numel in totals.items()]


def _take_slices(tensors: Sequence[torch.Tensor], staging: PinnedStaging) -> Optional[List[torch.Tensor]]:
    """Slices of ``staging`` for the copies of ``tensors``, one per dtype in the order of :func:`_by_dtype`, or
    ``None`` (nothing taken) when it cannot hold them all."""
    return staging.take_all(_dtype_sizes([(t.numel(), t.dtype) for t in tensors]))


def _by_dtype(tensors: Sequence[torch.Tensor]) -> List[Tuple[List[int], torch.Tensor]]:
    """Per dtype: the positions of ``tensors`` of that dtype and their elements concatenated (on their device)."""
    groups: Dict[torch.dtype, List[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return [(idx, torch.cat([tensors[i].reshape(-1) for i in idx])) for idx in groups.values()]


def _split(tensors: Sequence[torch.Tensor], idx: List[int], flat: torch.Tensor, out: List[torch.Tensor]) -> None:
    offset = 0
    for i in idx:
        n = tensors[i].numel()
        out[i] = flat[offset : offset + n].view(tensors[i].shape)
        offset += n


def to_host(tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Host copies of ``tensors`` (any device, shapes and dtypes), in order, with one device-to-host transfer per
    dtype, each waited for (:class:`HostCopy` does not wait): many small ``.cpu()`` calls would cost one wait each."""
    out: List[torch.Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    for idx, flat in _by_dtype(tensors):
        _split(tensors, idx, flat.cpu(), out)
    return out


def _copy_done_event(device: torch.device) -> Optional["torch.cuda.Event"]:
    """An event recorded on ``device``'s current stream after the copies queued there; ``None`` off CUDA (the copies
    are done already)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event(blocking=True)  # a thread that waits for it sleeps rather than spins
    event.record(torch.cuda.current_stream(device))
    return event


class HostCopy:
    """Host copies of ``tensors`` (shapes and dtypes of any kind, one device), started without waiting.

    One transfer per dtype, as :func:`to_host`; from a CUDA device into pinned host memory with ``non_blocking=True``,
    followed by an event on the current stream, so the caller goes on while the device works (the device sources are
    held until the copies are done). Host tensors are only concatenated. With a ``staging``, every transfer lands in
    one of its slices (host sources copied too), all taken at once (:meth:`try_stage`) and given back by
    :meth:`release`.

    Parameters
    ----------
    tensors : sequence of torch.Tensor
    staging : PinnedStaging, optional
    buffers : list of torch.Tensor, optional
        With ``staging``: its slices to land in, one per dtype of ``tensors`` in order of first appearance (as
        :meth:`try_stage` takes them); default: taken here (``RuntimeError`` when the staging has no room).

    Attributes
    ----------
    tensors : list of torch.Tensor
        The host copies, in order: read them only once :meth:`ready` (or after :meth:`wait`), and not after
        :meth:`release`.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], staging: Optional[PinnedStaging] = None,
                 buffers: Optional[List[torch.Tensor]] = None) -> None:  # fmt: skip
        if staging is not None and buffers is None:
            buffers = _take_slices(tensors, staging)
            if buffers is None:
                raise RuntimeError(f"staging: expected room for the copies, got {staging.largest_free_bytes} bytes "
                                   "free in one run")  # fmt: skip
        self.tensors: List[torch.Tensor] = [None] * len(tensors)  # type: ignore[list-item]
        self._sources: List[torch.Tensor] = []
        self._staging = staging
        self._buffers: List[torch.Tensor] = [] if staging is None else list(buffers or ())
        device = torch.device("cpu")
        try:
            for i, (idx, flat) in enumerate(_by_dtype(tensors)):
                device = flat.device
                if staging is not None:
                    host = self._buffers[i]
                    host.copy_(flat, non_blocking=flat.is_cuda)
                    self._sources.append(flat)
                elif flat.is_cuda:
                    host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
                    host.copy_(flat, non_blocking=True)
                    self._sources.append(flat)
                elif device.type != "cpu":
                    host = flat.cpu()
                else:
                    host = flat
                _split(tensors, idx, host, self.tensors)
        except BaseException:
            self._event = _copy_done_event(device)  # copies already queued write the slices: given back after them
            self.release()
            raise
        self._event = _copy_done_event(device)

    @classmethod
    def try_stage(cls, tensors: Sequence[torch.Tensor], staging: PinnedStaging) -> Optional["HostCopy"]:
        """A :class:`HostCopy` of ``tensors`` into slices of ``staging``, or ``None`` (nothing copied) when the
        staging cannot hold them all."""
        buffers = _take_slices(tensors, staging)
        return None if buffers is None else cls(tensors, staging, buffers)

    def ready(self) -> bool:
        """Whether the copies are done (never waits)."""
        if self._event is not None and not self._event.query():
            return False
        self._event, self._sources = None, []
        return True

    def wait(self) -> None:
        """Block until the copies are done (tests and shutdown only)."""
        if self._event is not None:
            self._event.synchronize()
        self._event, self._sources = None, []

    def release(self) -> None:
        """Give the staging's slices back once nothing reads :attr:`tensors` any more (waits for copies still
        running: a slice given back may be written by the next batch's copies at once)."""
        if self._buffers:
            self.wait()
            for buf in self._buffers:
                self._staging.give_back(buf)  # type: ignore[union-attr]
            self._buffers = []
        self.tensors = []


# a job waiting for its copies: layer, pages, their epochs after the seal, byte budget
_Job = Tuple[int, np.ndarray, np.ndarray, int]


@dataclass(eq=False)
class _PendingBatch:
    """A sealed batch whose host copies are on their way: the jobs to submit once they land.

    ``jobs``: per job, its layer, pages, their epochs after the seal and its byte budget; the copy holds three
    tensors per job (keys, values, queries), then, when ``shared`` names pages several requests read (with their
    epochs), their keys and values in every layer."""

    copy: HostCopy
    jobs: List[_Job]
    shared: Optional[Tuple[np.ndarray, np.ndarray]] = None
    landed: int = 0  # jobs handed to the worker so far (a tick lands jobs one at a time, within its budget)
    shared_kept: int = 0  # (layer, shared page) copies kept so far, layer by layer, a few pages a unit, before the jobs

    @property
    def done(self) -> bool:
        return self.shared is None and self.landed == len(self.jobs)


class SidecarBridge:
    """Submits sealed pages to a :class:`SidecarClient` and applies its plans to the pool (see the module docstring).

    Parameters
    ----------
    pool : MosaicMHATokenToKVPool
    window : QueryWindow
        The sealer's recent queries per layer (the statistics the sidecar plans with).
    config : SidecarConfig
        Of the worker; the bridge builds its :class:`SidecarClient` (not started: :meth:`start` starts it), with this
        bridge's :meth:`is_current` deciding which finished plans still apply.
    shadow_bytes : int
        Host memory for copies of sealed pages (the dense source of re-segmentation); 0 keeps no copies, so queued
        shared pages are skipped.
    resegment : bool
        Whether pages read by several requests are re-planned on idle ticks (``--mosaic-resegment``). ``False``:
        :meth:`observe_readers` records nothing, no page is queued and no host copy is kept (``shadow_bytes`` is
        ignored); sealed pages are still submitted and their plans applied.
    staging : PinnedStaging, optional
        The host memory that sealed batches' copies land in, lent a batch at a time; default: a page-locked arena of
        :func:`staging_bytes` when the pool is on CUDA, none otherwise (host pages are only concatenated). The K/V of
        the batches are counted in ``config.kv_dtype`` (what ``gather`` returns: the pool's dtype) when deciding what
        it holds.

    Attributes
    ----------
    plans_applied : int
        Jobs whose plans were applied (their pages re-packed).
    segments_applied : int
        Segments re-packed with a sidecar plan.
    plans_discarded : int
        Finished plans not applied: some page freed, reused or no longer sealed (when read or when applied), or no
        arena room for the new payloads next to the old.
    segments_submitted, segments_skipped : int
        Sealed segments (non-sink, all layers) handed to the sidecar (counted at sealing, while their copies to the
        host are on their way), and those that kept their fast plan because every slot was busy, because the staging
        had no room for their batch (or, once the copies landed, because the sidecar refused them).
    staging_full_batches : int
        Sealed batches that submitted nothing because the staging could not hold their jobs' copies (their pages kept
        their fast plans).
    staging_full_shadows : int
        Sealed batches submitted without the host copies of their shared pages, for want of staging room (the jobs
        were: those pages are not queued for re-segmentation by this batch).
    pages_shared : int
        Pages found read by more than one request (0 with ``resegment`` off: readers are not recorded).
    resegment_jobs, resegment_skipped : int
        Re-segmentation jobs submitted, and queued shared pages skipped for want of a host copy.
    resegment_pooled : int
        Re-segmentation jobs planned with every request's recent queries because none of their readers' queries was
        left in the window.
    tick_seconds, submit_seconds : float
        Scheduler time spent before forwards: in :meth:`tick` (copying landed batches into the slots, reading
        replies, applying plans) and in :meth:`submit_sealed` (gathering pages and starting their copies to the
        host); the sidecar's cost on the step time.
    land_seconds, apply_seconds : float
        Of that scheduler time (idle ticks included): handing landed copies to the worker's slots (and keeping host
        copies of shared pages), and applying finished plans (re-packing their pages). With the I/O thread running,
        landing is its work, not the scheduler's (:attr:`io_seconds`).
    io_seconds : float
        CPU time of the I/O thread's rounds (:meth:`start`): landing copies, reading replies, staging plans;
        not scheduler time, though the thread shares the interpreter with the scheduler (its wall time, waits for the
        interpreter's lock included, read 5 s of a 5.5 s load in the seventeenth run).
    idle_seconds : float
        Scheduler time spent in :meth:`on_idle` (idle ticks only: no step waits for it).
    tick_lock_skips : int
        Budgeted ticks that left their plans for a later tick because the I/O thread held the bridge's lock at that
        moment (:meth:`tick` never waits for it: 183 of the 206 stack samples of the 8B ITL server's ticks were that
        wait in the twenty-second GPU run).
    """

    def __init__(
        self, pool: "MosaicMHATokenToKVPool", window: "QueryWindow", config: SidecarConfig,
        shadow_bytes: int = DEFAULT_SHADOW_BYTES, resegment: bool = True, staging: Optional[PinnedStaging] = None,
    ) -> None:  # fmt: skip
        self.pool = pool
        if staging is None and torch.device(pool.device).type == "cuda":
            staging = PinnedStaging(pin=True, capacity_bytes=staging_bytes())
        self.staging = staging
        self._kv_dtype = config.kv_dtype
        self.window = window
        self.client = SidecarClient(config, is_current=self.is_current)
        h = int(pool.head_num)
        self.pages_per_job = max(1, config.max_segments // h)
        self.resegment = bool(resegment)
        self.shadow_bytes = int(shadow_bytes) if self.resegment else 0
        self.pages_shared = 0
        self.resegment_jobs = 0
        self.resegment_skipped = 0
        self.resegment_pooled = 0
        # one queue entry per (layer, page), keyed with head 0: pages are re-packed whole
        self.queue = ResegmentQueue(self.pages_per_job)
        self._shadow = PageCopies((h, pool.page_size, int(pool.head_dim)), config.kv_dtype, self.shadow_bytes)
        self._readers: Dict[int, Set[int]] = {}
        self._ratio = np.zeros(pool.num_logical_pages, dtype=np.float64)
        pool.free_listeners.append(self._on_free)
        self.plans_applied = 0
        self.segments_applied = 0
        self.plans_discarded = 0
        self.segments_submitted = 0
        self.segments_skipped = 0
        self.staging_full_batches = 0
        self.staging_full_shadows = 0
        self.tick_seconds = 0.0
        self.submit_seconds = 0.0
        self.land_seconds = 0.0
        self.apply_seconds = 0.0
        self.idle_seconds = 0.0
        self.tick_lock_skips = 0
        self._next_layer = 0
        self._pending: Deque[_PendingBatch] = collections.deque()
        self._reserved = 0
        # finished jobs read from the client but not yet applied (the tick's budget ran out), oldest first
        self._unapplied: Deque[JobOutcome] = collections.deque()
        self._slowest: Dict[str, float] = {}  # the longest unit of each kind since take_slowest (seconds)
        self._idle = False  # in an idle tick (its units are not the step's: not kept in _slowest)
        self._closed = False
        # the I/O thread (start(io_thread=True)) lands copies, reads replies and stages their re-seals; the scheduler
        # thread applies plans.
        # _lock guards what both touch (pending batches, reservations, the finished plans, host copies, the
        # re-segmentation queue and readers, counters). Landing has one thread at a time: the I/O thread while it
        # runs; ticks and drain only with it stopped
        self._lock = threading.RLock()
        self._io_thread: Optional[threading.Thread] = None
        self._io_stop = threading.Event()
        self._wake_fds: Optional[Tuple[int, int]] = None  # a pipe that wakes the I/O thread (a new batch, a stop)
        # with the I/O thread on CUDA: the plans' uploads run there (pinned first), on this stream; job id -> its
        # staged re-seal
        self._upload_stream: Optional["torch.cuda.Stream"] = None
        self._switch_before: Optional[float] = None  # the interpreter's switch interval before start() lowered it
        self._staged: Dict[int, StagedReseal] = {}
        self.io_seconds = 0.0

    @classmethod
    def create(
        cls, pool: "MosaicMHATokenToKVPool", window: "QueryWindow", shadow_bytes: int = DEFAULT_SHADOW_BYTES,
        **overrides: object,
    ) -> "SidecarBridge":  # fmt: skip
        """A bridge with a sidecar sized for ``pool`` (``overrides``: :class:`SidecarConfig` fields); re-segmentation
        as ``pool.mosaic_config.resegment`` says, the sidecar's menu restricted to ``pool.mosaic_config.axes``."""
        h = int(pool.head_num)
        kw = dict(window=window.window, kv_dtype=pool.store.dtype,
                  max_segments=max(h, DEFAULT_MAX_SEGMENTS // h * h))  # fmt: skip
        axes, s = pool.mosaic_config.axes, pool.page_size
        if axes != "both":
            kw["menu"] = axes_menu(axes, s, int(pool.head_dim), lowrank=True)
        kw.update(overrides)
        config = SidecarConfig.from_mosaic(pool.mosaic_config, head_dim=int(pool.head_dim),
                                           group_size=window.group_size, **kw)  # fmt: skip
        return cls(pool, window, config, shadow_bytes, resegment=pool.mosaic_config.resegment)

    def start(self, io_thread: Optional[bool] = None) -> "SidecarBridge":
        """Start the worker process (it gets ready in the background); closed at interpreter exit.

        ``io_thread`` (default: when the pool is on a CUDA device) starts a thread that lands the sealed batches'
        copies in the worker's slots, reads its replies, and on CUDA stages each plan's re-seal
        (:meth:`MosaicMHATokenToKVPool.stage_reseal`: checks, payload sizes, the uploads of its tokens and plan, on
        the thread's own stream), so that the scheduler thread's ticks only allocate, pack and swap (the sixteenth
        run's SmolLM2 decode steps took 1.4 ms more at the median with the landing on the scheduler thread; a whole
        apply took 2.3 ms of host time a job on an H200, ``bench.apply_cost``)."""
        device = torch.device(self.pool.device)
        if io_thread is None:
            io_thread = device.type == "cuda"
        interval = io_switch_interval() if io_thread else 0.0  # a bad value is refused before the worker starts
        self.client.start()
        atexit.register(self.close)
        if io_thread:
            if device.type == "cuda":
                self._upload_stream = torch.cuda.Stream(device)
            if 0.0 < interval < sys.getswitchinterval():
                self._switch_before = sys.getswitchinterval()
                sys.setswitchinterval(interval)
            self._start_io()
        return self

    def _start_io(self) -> None:
        self._io_stop.clear()
        self._wake_fds = os.pipe()
        for fd in self._wake_fds:
            os.set_blocking(fd, False)
        self._io_thread = threading.Thread(target=self._io_loop, name="mosaickv-sidecar-io", daemon=True)
        self._io_thread.start()

    def _wake_io(self) -> None:
        fds = self._wake_fds
        if fds is not None:
            try:
                os.write(fds[1], b"w")
            except (BlockingIOError, OSError):  # full: the thread has wake-ups waiting already
                pass

    def _stop_io(self) -> bool:
        """Stop the I/O thread after its round; returns whether it was running."""
        thread = self._io_thread
        if thread is None:
            return False
        self._io_stop.set()
        self._wake_io()
        thread.join()
        self._io_thread = None
        if self._wake_fds is not None:
            for fd in self._wake_fds:
                os.close(fd)
            self._wake_fds = None
        return True

    def close(self) -> None:
        """Stop the I/O thread and the worker; jobs in flight, finished plans not yet applied and batches whose copies
        have not been submitted are dropped (their fast plans stay)."""
        if not self._closed:
            self._stop_io()
            with self._lock:
                self._closed = True
                for batch in self._pending:
                    batch.copy.release()
                self._pending.clear()
                self._reserved = 0
                self._unapplied.clear()
                self._staged.clear()
            if self._switch_before is not None:
                sys.setswitchinterval(self._switch_before)
                self._switch_before = None
            self.client.close()

    @property
    def step_seconds(self) -> float:
        """Scheduler time before forwards so far: :attr:`tick_seconds` plus :attr:`submit_seconds`."""
        return self.tick_seconds + self.submit_seconds

    def counters(self) -> SidecarCounters:
        """The client's counters, with ``queue_depth`` counting the finished plans waiting to be applied too."""
        with self._lock:
            counters = self.client.counters
            return replace(counters, queue_depth=counters.queue_depth + len(self._unapplied))

    # --- staleness ----------------------------------------------------------------------------------------------------
    def is_current(self, key: SegmentKey) -> bool:
        """Whether the key's page still holds what the job was made from and is sealed in the key's layer."""
        return bool(self._current(key.layer, np.array([int(key.page)]), np.array([int(key.generation)]))[0])

    def _current(self, layer: int, pages: np.ndarray, epochs: np.ndarray) -> np.ndarray:
        """:meth:`is_current` of every page of ``pages`` (with ``epochs``) in ``layer`` at once: one read of the pool's
        seal state for the lot (a job's staleness check before a forward is one call, not one per page)."""
        return (self.pool.page_epoch[pages] == epochs) & np.asarray(self.pool.sealed_in_layer(pages, layer), dtype=bool)

    # --- submission ---------------------------------------------------------------------------------------------------
    def submit_sealed(self, pages: np.ndarray, dense_mask: np.ndarray, ratio: float, gather: Gather) -> int:
        """Queue the pages of a batch about to be sealed, as far as free slots allow; returns the segments queued.

        Call it just before :meth:`MosaicMHATokenToKVPool.seal_pages` of the same pages, both within
        :meth:`sealing`: the keys name the epoch the seal gives them.

        Parameters
        ----------
        pages : numpy.ndarray
            shape ``[P]``, int64; the batch's logical pages.
        dense_mask : numpy.ndarray
            shape ``[P]``, bool; pages sealed dense (sinks): not submitted.
        ratio : float
            The ratio the batch is planned at (each job gets the same byte budget per page).
        gather : callable
            ``gather(layer, pages) -> (keys, values)``: the pages' dense segments of a local layer, ``[P * H_kv, S,
            d]`` each, page-major, head-minor.
        """
        if self._closed or self.client.disabled:
            return 0
        t0 = time.perf_counter()
        try:
            with self._lock:
                return self._submit_sealed(pages, dense_mask, ratio, gather)
        finally:
            self.submit_seconds += time.perf_counter() - t0
            self._wake_io()

    def sealing(self) -> ContextManager[bool]:
        """Hold it (``with bridge.sealing():``) around :meth:`submit_sealed` and the seal of the same pages: the
        I/O thread lands no batch meanwhile, so the worker never plans pages whose seal has not ended (its reply
        would find them unsealed, hence stale)."""
        return self._lock

    @property
    def _free_slots(self) -> int:
        """Slots free and not reserved for a batch whose copies are on their way, nor counted for a finished plan
        waiting to be applied (the client frees a job's slot once it read its plan)."""
        return max(0, self.client.free_slots - self._reserved - len(self._unapplied))

    def _submit_sealed(self, pages: np.ndarray, dense_mask: np.ndarray, ratio: float, gather: Gather) -> int:
        todo = np.asarray(pages, dtype=np.int64)[~np.asarray(dense_mask, dtype=bool)]
        pool, h = self.pool, int(self.pool.head_num)
        self._ratio[todo] = ratio
        total = int(todo.size) * h * pool.layer_num
        jobs, queries, next_layer = self._choose(todo, ratio)
        shared: Optional[np.ndarray] = todo[[int(p) in self._readers and len(self._readers[int(p)]) > 1 for p in todo]]
        if not (shared.size and self.shadow_bytes):
            shared = None
        if self.staging is not None:
            jobs, queries, shared = self._fit_staging(jobs, queries, shared)
        parts: List[torch.Tensor] = []
        for (layer, job_pages, _, _), q in zip(jobs, queries):
            parts.extend(gather(layer, job_pages))
            parts.append(q)  # the layer's queries once ([H, W, G, d]): every page of the job reads its heads' rows
        if shared is not None:
            parts.extend(x for layer in range(pool.layer_num) for x in gather(layer, shared))
        if parts:
            copy = HostCopy(parts) if self.staging is None else HostCopy.try_stage(parts, self.staging)
            if copy is None:  # gathered in another dtype than counted, and the staging cannot hold that
                self.staging_full_batches += bool(jobs)
                jobs = []
            else:
                kept = None if shared is None else (shared, self.pool.page_epoch[shared] + 1)
                self._pending.append(_PendingBatch(copy, jobs, kept))
                self._reserved += len(jobs)
        if jobs:
            self._next_layer = next_layer
        submitted = sum(int(job[1].size) for job in jobs) * h
        self.segments_submitted += submitted
        self.segments_skipped += total - submitted
        return submitted

    def _fit_staging(
        self, jobs: List[_Job], queries: List[torch.Tensor], shared: Optional[np.ndarray]
    ) -> Tuple[List[_Job], List[torch.Tensor], Optional[np.ndarray]]:  # fmt: skip
        """What of a batch the staging holds now, before anything is gathered: its jobs with the host copies of its
        ``shared`` pages (every layer), else its jobs alone, else nothing (counted)."""
        assert self.staging is not None
        page = int(self.pool.head_num) * self.pool.page_size * int(self.pool.head_dim)
        need: List[Tuple[int, torch.dtype]] = []
        for (_, job_pages, _, _), q in zip(jobs, queries):  # in the order of the parts: keys, values, queries
            need += [(job_pages.size * page, self._kv_dtype)] * 2 + [(q.numel(), q.dtype)]
        if shared is not None:
            copies = [(shared.size * page, self._kv_dtype)] * (2 * self.pool.layer_num)
            if self.staging.fits(_dtype_sizes(need + copies)):
                return jobs, queries, shared
        if not jobs or self.staging.fits(_dtype_sizes(need)):
            self.staging_full_shadows += shared is not None
            return jobs, queries, None
        self.staging_full_batches += 1
        return [], [], None

    def _choose(self, todo: np.ndarray, ratio: float) -> Tuple[List[_Job], List[torch.Tensor], int]:
        """Jobs of whole pages of one layer, one per free slot, layers in turn from where the last batch stopped, the
        queries of each job's layer, and the layer the next batch starts from (kept only if these jobs are
        submitted)."""
        if todo.size == 0 or self._free_slots == 0:
            return [], [], self._next_layer
        pool, h = self.pool, int(self.pool.head_num)
        epoch = self.pool.page_epoch[todo] + 1
        seg = dense_segment_bytes(pool.page_size, int(pool.head_dim))
        chunks = [np.arange(i, min(i + self.pages_per_job, todo.size)) for i in range(0, todo.size, self.pages_per_job)]
        jobs: List[Tuple[int, np.ndarray, torch.Tensor]] = []
        free, layers, next_layer = self._free_slots, pool.layer_num, None
        for step in range(layers):
            layer = (self._next_layer + step) % layers
            q = self.window.queries(layer)
            if q is None:
                continue
            for idx in chunks:
                if len(jobs) == free:
                    next_layer = layer
                    break
                jobs.append((layer, idx, q))
            if next_layer is not None:
                break
        if next_layer is None:
            next_layer = (self._next_layer + 1) % layers
        chosen = [(layer, todo[idx], epoch[idx], seal_budget_bytes(int(idx.size) * h, 0, seg, ratio))
                  for layer, idx, _ in jobs]  # fmt: skip
        return chosen, [q for _, _, q in jobs], next_layer

    def _flush(self, wait: bool = False, deadline: Optional[float] = None) -> int:
        """Hand the jobs of the pending batches whose copies have landed to the worker, in order, a unit at a time
        (:meth:`_land_next`; ``wait``: all, waiting for the copies); with a ``deadline`` (``time.perf_counter()``),
        none after it but the first: a batch of 8 jobs is spread over ticks instead of landing in one step. Returns
        the units landed."""
        landed = 0
        while True:
            if landed and deadline is not None and time.perf_counter() >= deadline:
                return landed
            with self._lock:
                if not self._pending:
                    return landed
                batch = self._pending[0]
            if wait:
                batch.copy.wait()
            elif not batch.copy.ready():
                return landed
            kind = "shared copies" if batch.shared is not None else "job"
            t0 = time.perf_counter()
            try:
                self._land_next(batch)
            finally:
                took = self._note_unit(kind, t0)
                if not self._on_io_thread():
                    self.land_seconds += took
            landed += 1
            if batch.done:
                with self._lock:
                    self._pending.popleft()
                    batch.copy.release()

    def _land_next(self, batch: _PendingBatch) -> None:
        """The next unit of ``batch``: first the host copies of its shared pages, :data:`SHARED_PAGES_PER_UNIT` pages
        of one layer a unit, each layer's re-segmentation queued with its last copies; then its jobs to the worker,
        one a unit."""
        host, h = batch.copy.tensors, int(self.pool.head_num)
        if batch.shared is not None:
            pages, epochs = batch.shared
            layer, first = divmod(batch.shared_kept, pages.size)
            last = min(first + SHARED_PAGES_PER_UNIT, pages.size)
            base = 3 * len(batch.jobs) + 2 * layer
            with self._lock:
                self._remember(layer, pages[first:last], epochs[first:last], host[base][first * h : last * h],
                               host[base + 1][first * h : last * h])  # fmt: skip
                batch.shared_kept += last - first
                if last == pages.size:  # the layer's copies are all kept: its re-segmentation queued
                    live = self.pool.page_epoch[pages] == epochs
                    self._queue(pages[live], epochs[live], (layer,))
                if batch.shared_kept == self.pool.layer_num * pages.size:
                    batch.shared = None
            return
        j = batch.landed  # < len(batch.jobs): _flush lands units only of batches not done
        layer, pages, epochs, budget = batch.jobs[j]
        keys, values, queries = host[3 * j : 3 * j + 3]
        segs = [SegmentKey(layer, hd, p, e) for p, e in zip(pages.tolist(), epochs.tolist()) for hd in range(h)]
        with self._lock:
            self._remember(layer, pages, epochs, keys, values)
        job = None
        if not self.client.disabled:  # the slot's copy outside the bridge's lock: the client locks its own state
            job = self.client.try_submit(segs, keys, values, queries, budget_bytes=budget,
                                         group_ids=torch.arange(h).repeat(pages.size), reason=REASON_SEALED,
                                         queries_by_group=True)  # fmt: skip
        with self._lock:  # the reservation ends once the slot is taken (or refused): free slots never over-counted
            batch.landed += 1
            self._reserved -= 1
            if job is None:
                self.segments_submitted -= len(segs)
                self.segments_skipped += len(segs)

    # --- host copies (shadow) -------------------------------------------------------------------------------------
    def _remember(self, layer: int, pages: np.ndarray, epochs: np.ndarray, keys: torch.Tensor,
                  values: torch.Tensor) -> None:  # fmt: skip
        """Keep host copies of ``pages`` of ``layer`` (``keys``/``values`` ``[P * H, S, d]`` on the host) that still
        hold epoch ``epochs`` (a page freed since is skipped)."""
        if not self.shadow_bytes:
            return
        h = int(self.pool.head_num)
        live = (self.pool.page_epoch[pages] == epochs).tolist()
        for i, (p, e) in enumerate(zip(pages.tolist(), epochs.tolist())):
            if live[i]:  # copied into a slot: the oldest copy gives its slot up when all are taken
                self._shadow.put((layer, p), e, keys[i * h : (i + 1) * h], values[i * h : (i + 1) * h])

    def _queue(self, pages: np.ndarray, epochs: np.ndarray, layers: Optional[Sequence[int]] = None) -> None:
        """Queue the re-segmentation of ``pages`` (at ``epochs``) in ``layers`` (default: every layer)."""
        self.queue.add(
            SharedSegment(SegmentKey(layer, 0, int(p), int(e)), 0, tuple(sorted(self._readers.get(int(p), ()))))
            for layer in (range(self.pool.layer_num) if layers is None else layers)
            for p, e in zip(pages.tolist(), epochs.tolist())
        )  # fmt: skip

    def _on_free(self, pages: np.ndarray) -> None:
        """The pool freed ``pages``: forget their readers, host copies and queued re-segmentations."""
        with self._lock:
            for p in pages.tolist():
                self._readers.pop(p, None)
                for layer in range(self.pool.layer_num):
                    self._shadow.forget((layer, p))
            self.queue.discard_pages(pages.tolist())

    # --- shared prefixes --------------------------------------------------------------------------------------------
    def observe_readers(self, reads: Sequence[Tuple[int, torch.Tensor]]) -> None:
        """Record which request reads which complete pages. ``reads`` holds, per request of an extend batch, its id
        (SGLang's ``req_pool_indices``) and every slot it reads, prefix and new tokens alike. A page that gains a
        second reader (a prefix shared through the radix cache) is queued for re-segmentation once sealed. Nothing
        is recorded with re-segmentation off."""
        if not self.resegment:
            return
        with self._lock:
            self._observe_readers(reads)

    def _observe_readers(self, reads: Sequence[Tuple[int, torch.Tensor]]) -> None:
        s = self.pool.page_size
        newly: List[int] = []
        for reader, slots in reads:
            n = int(slots.numel()) // s * s
            if n == 0:
                continue
            for p in (slots[:n:s] // s).tolist():
                rs = self._readers.setdefault(p, set())
                if reader not in rs:
                    rs.add(reader)
                    if len(rs) == 2:
                        self.pages_shared += 1
                    if len(rs) >= 2:
                        newly.append(p)
        if newly:
            pages = np.unique(np.array(newly, dtype=np.int64))
            sealed = pages[self.pool.sealed_in_layer(pages, 0)]
            self._queue(sealed, self.pool.page_epoch[sealed])

    def on_idle(self) -> int:
        """An idle scheduler tick: apply finished plans, then submit up to :data:`IDLE_JOBS` re-segmentation jobs
        (whole pages of one layer each) while slots are free; returns the jobs submitted."""
        if self._closed:
            return 0
        t0 = time.perf_counter()
        try:
            self._idle = True
            try:
                self._tick(IDLE_TICK_MS)
            finally:
                self._idle = False
            with self._lock:
                return self._submit_idle_jobs()
        finally:
            self.idle_seconds += time.perf_counter() - t0

    def _submit_idle_jobs(self) -> int:
        submitted = 0
        while submitted < IDLE_JOBS and len(self.queue) and self._free_slots and not self.client.disabled:
            for job in self.queue.next_slice(self.pages_per_job):
                if self._free_slots == 0:
                    self.queue.add(job.segments)  # no slot left for this part of the slice: it waits its turn
                    continue
                submitted += self._submit_resegment(job.layer, [seg.key for seg in job.segments], job.readers)
        return submitted

    def _submit_resegment(self, layer: int, keys: List[SegmentKey], readers: Sequence[int] = ()) -> int:
        h, s, d = int(self.pool.head_num), self.pool.page_size, int(self.pool.head_dim)
        pages, epochs, ks, vs = [], [], [], []
        for key in sorted(keys, key=lambda k: k.page):
            copy = self._shadow.get((layer, key.page))
            if copy is None or copy[0] != key.generation or not self.is_current(key):
                self.resegment_skipped += 1
                continue
            pages.append(key.page)
            epochs.append(key.generation)
            ks.append(copy[1])
            vs.append(copy[2])
        if not pages:
            return 0
        q = self.window.reader_queries(layer, readers)
        own = q is not None
        if not own:
            q = self.window.queries(layer)
        if q is None:
            return 0
        heads = torch.arange(h).repeat(len(pages))
        segs = [SegmentKey(layer, hd, p, e) for p, e in zip(pages, epochs) for hd in range(h)]
        seg = dense_segment_bytes(s, d)
        budget = sum(seal_budget_bytes(h, 0, seg, float(max(r, 1.0))) for r in self._ratio[pages])
        job = self.client.try_submit(segs, torch.cat(ks), torch.cat(vs), q, budget_bytes=budget, group_ids=heads,
                                     reason=REASON_RESEGMENT, queries_by_group=True)  # fmt: skip
        if job is None:
            return 0
        self.resegment_jobs += 1
        self.resegment_pooled += not own
        return 1

    # --- application --------------------------------------------------------------------------------------------------
    def tick(self, budget_ms: Optional[float] = FORWARD_TICK_MS) -> int:
        """Submit the sealed batches whose copies have landed, read finished jobs (about ``budget_ms`` of client
        work; restarts a dead worker) and apply their plans, the oldest first, while the tick has taken less than
        ``budget_ms`` (at least one unit of landing or one plan; ``None``: all); the rest waits for later ticks. Returns
        the jobs applied. Never waits for the device."""
        if self._closed:
            return 0
        t0 = time.perf_counter()
        try:
            return self._tick(budget_ms)
        finally:
            self.tick_seconds += time.perf_counter() - t0

    def _tick(self, budget_ms: Optional[float]) -> int:
        deadline = None if budget_ms is None else time.perf_counter() + budget_ms / 1000.0
        landed = 0
        if self._io_thread is None:  # else the I/O thread lands copies and reads replies
            landed = self._flush(deadline=deadline)
            t0 = time.perf_counter()
            outcomes = self.client.tick(budget_ms)
            self._note_unit("replies", t0)
            with self._lock:
                self._unapplied.extend(outcomes)
        applied = taken = 0
        # a budgeted tick never waits for the I/O thread's hold on the lock: its plans wait for a later tick instead
        wait_for_lock = self._io_thread is None or budget_ms is None
        while True:
            # one unit of work a tick past its budget, a landing or a plan: both in one tick held the thirteenth
            # run's slowest decode steps. Plans cannot starve: the slots they hold keep new jobs from being submitted
            if (taken or landed) and deadline is not None and time.perf_counter() >= deadline:
                break
            if not self._lock.acquire(blocking=wait_for_lock):
                self.tick_lock_skips += 1
                break
            try:
                if not self._unapplied:
                    break
                outcome = self._unapplied.popleft()
                staged = self._staged.pop(outcome.job_id, None)  # in the same hold: the apply takes no lock
            finally:
                self._lock.release()
            t0 = time.perf_counter()
            try:
                applied += self._apply(outcome, staged)
            finally:
                self.apply_seconds += self._note_unit("apply", t0)
            taken += 1
        return applied

    # --- the I/O thread -------------------------------------------------------------------------------------------
    def _on_io_thread(self) -> bool:
        return self._io_thread is not None and threading.current_thread() is self._io_thread

    def _io_loop(self) -> None:
        """The I/O thread: rounds of :meth:`_io_round` until stopped, waiting (without the interpreter's lock) for
        a batch's copies, a reply or a new batch between rounds that found nothing to do."""
        while not self._io_stop.is_set():
            try:
                if not self._io_round():
                    self._io_wait()
            except Exception:  # never let the thread die silently: the scheduler's plans wait for it
                logger.exception("MosaicKV sidecar I/O thread (going on)")
                self._io_stop.wait(IO_WAIT_S)

    def _io_round(self) -> bool:
        """Land what has landed, read the replies and stage their re-seals (:meth:`_stage`); returns whether it did
        any."""
        t0 = time.thread_time()
        landed = self._flush()
        outcomes = [self._pinned(o) for o in self.client.tick(None)]
        staged = {o.job_id: st for o in outcomes if (st := self._stage(o)) is not None}
        if outcomes:
            with self._lock:
                self._staged.update(staged)
                self._unapplied.extend(outcomes)
        self.io_seconds += time.thread_time() - t0
        return bool(landed or outcomes)

    def _io_wait(self) -> None:
        """Sleep, without the interpreter's lock, until the first pending batch's copies land, or else until a reply,
        a new batch or a stop (at most :data:`IO_WAIT_S`)."""
        with self._lock:
            batch = self._pending[0] if self._pending else None
        if batch is not None:
            batch.copy.wait()  # a blocking CUDA event: the thread sleeps until the copies land
            return
        fds = self._wake_fds
        self.client.wait_io(IO_WAIT_S, also=() if fds is None else (fds[0],))
        if fds is not None:
            try:
                os.read(fds[0], 4096)
            except (BlockingIOError, OSError):
                pass

    def _pinned(self, outcome: JobOutcome) -> JobOutcome:
        """``outcome`` with its K/V and plan in pinned memory when the pool is on CUDA, so that their uploads need no
        staging copy."""
        if outcome.status is not JobStatus.OK or self._upload_stream is None:
            return outcome
        assert outcome.result is not None and outcome.keys is not None and outcome.values is not None
        return replace(outcome, keys=outcome.keys.pin_memory(), values=outcome.values.pin_memory(),
                       result=replace(outcome.result, plan=pin_plan(outcome.result.plan)))  # fmt: skip

    def _stage(self, outcome: JobOutcome) -> Optional[StagedReseal]:
        """On the I/O thread: what of ``outcome``'s re-seal needs no pool state (checks, payload sizes, and on CUDA the
        uploads of its tokens and plan, on the thread's stream), so that the scheduler's apply only allocates, packs
        and swaps. ``None`` for a failed, lost or stale job, or when the pages changed already (the apply discards
        those)."""
        if outcome.status is not JobStatus.OK or not all(outcome.valid):
            return None
        assert outcome.result is not None and outcome.keys is not None and outcome.values is not None
        layer, pages, _ = self._job_pages(outcome)
        try:
            return self.pool.stage_reseal(pages, layer, outcome.keys, outcome.values, outcome.result.plan,
                                          stream=self._upload_stream)  # fmt: skip
        except Exception:  # the apply re-seals it unstaged, on the scheduler thread (and reports what fails there)
            logger.exception("MosaicKV sidecar: staging job %d's re-seal on the I/O thread failed", outcome.job_id)
            return None

    def _job_pages(self, outcome: JobOutcome) -> Tuple[int, np.ndarray, np.ndarray]:
        """The layer of ``outcome``'s job and its pages and their epochs (one per page: jobs are whole pages)."""
        keys, h = outcome.segments, int(self.pool.head_num)
        pages = np.array([k.page for k in keys[::h]], dtype=np.int64)
        epochs = np.array([k.generation for k in keys[::h]], dtype=np.int64)
        return keys[0].layer, pages, epochs

    def _note_unit(self, kind: str, t0: float) -> float:
        """Seconds since ``t0`` (``time.perf_counter()``), kept as ``kind``'s longest unit when it is (not in an idle
        tick)."""
        took = time.perf_counter() - t0
        if not self._idle and not self._on_io_thread() and took > self._slowest.get(kind, 0.0):
            self._slowest[kind] = took
        return took

    def take_slowest(self) -> Dict[str, float]:
        """The longest single unit of each kind of work in the ticks before forwards since the last call (seconds;
        kinds: ``"shared copies"``, :data:`SHARED_PAGES_PER_UNIT` pages of one layer of a batch's shared-page host
        copies; ``"job"``, one job handed to the worker; ``"replies"``, the client's part of a tick; ``"apply"``, one
        plan applied), then forgets them: a tick past its budget is one of these. Idle ticks, which no step waits
        for, are not counted."""
        out, self._slowest = self._slowest, {}
        return out

    def _apply(self, outcome: JobOutcome, staged: Optional[StagedReseal]) -> int:
        """Re-pack ``outcome``'s pages with its plan (``staged``: its uploads, done by the I/O thread), unless it
        failed or its pages changed; returns 1 if applied."""
        if outcome.status is JobStatus.STALE:
            self.plans_discarded += 1
            return 0
        if outcome.status is not JobStatus.OK:
            return 0  # FAILED / LOST: counted by the client; the fast plan stays
        layer, pages, epochs = self._job_pages(outcome)
        # the valid mask was taken when the reply was read; the pages may have changed since (a plan that waited for
        # a later tick): check again, the job's pages in one call
        if not all(outcome.valid) or not self._current(layer, pages, epochs).all():
            self.plans_discarded += 1
            return 0
        assert outcome.result is not None and outcome.keys is not None and outcome.values is not None
        try:
            if staged is not None:  # uploaded by the I/O thread: allocate, pack and swap
                handle = self.pool.reseal_staged(staged)
            else:
                handle = self.pool.reseal_pages(pages, layer, outcome.keys, outcome.values, outcome.result.plan)
        except ArenaFullError as err:
            logger.debug("MosaicKV sidecar: no arena room to apply job %d (%s); its fast plan stays",
                         outcome.job_id, err)  # fmt: skip
            self.plans_discarded += 1
            return 0
        self.pool.release_resealed(handle)
        self.plans_applied += 1
        self.segments_applied += len(outcome.segments)
        return 1

    def drain(self, timeout: float) -> int:
        """Block up to ``timeout`` seconds until no job is in flight, applying each; batches whose copies are on
        their way are waited for and submitted first (tests and shutdown only)."""
        end, applied = time.monotonic() + timeout, 0
        io = self._stop_io()  # drained on this thread, the I/O thread resumed after
        try:
            if not self._closed:
                self._flush(wait=True)
            while time.monotonic() < end:
                applied += self.tick(None)
                if self.client.counters.queue_depth == 0 and not self._pending and not self._unapplied:
                    break
                time.sleep(0.01)
        finally:
            if io and not self._closed:
                self._start_io()
        return applied

    def status(self) -> str:
        """A short status for the sealer's log line."""
        c = self.counters()
        return (f"sidecar: {c.queue_depth} jobs queued, {self.plans_applied} plans applied ({self.segments_applied} "
                f"segments), {self.plans_discarded} discarded, {self.segments_skipped} segments kept fast plans "
                f"(queue full, or no staging room for {self.staging_full_batches} batches), {c.restarts} restarts, "
                f"{1e3 * self.step_seconds:.0f} ms scheduler time before forwards"
                + ("" if self.resegment else ", resegment off"))

