# SPDX-License-Identifier: Apache-2.0
"""The scheduler-side handle of the CPU sidecar: start, submit, poll, restart, close.

One :class:`SidecarClient` per scheduler (TP rank). It owns the shared slot buffers and one worker process
(``spawn`` start method, as SGLang uses), and never blocks the scheduler: :meth:`SidecarClient.try_submit` copies a
job into a free slot and returns ``None`` when none is free (the fast plan stays), :meth:`SidecarClient.tick` does at
most a given number of milliseconds of work (reading replies, copying plans out of the slots, restarting a dead
worker), and every submitted job ends exactly once as a :class:`JobOutcome`:

* ``OK``: the plan, with a per-segment ``valid`` mask (segments whose page generation changed since submission are
  invalid and must not be applied);
* ``STALE``: every segment's page was freed or reused meanwhile; the plan was discarded unread;
* ``FAILED``: the planner raised in the worker (for example, an unreachable budget);
* ``LOST``: the worker died (or hung past ``job_timeout_s``, or the client closed) while it owned the job.

Call it from the scheduler thread. Besides, a watchdog thread (every ``watchdog_s``) restarts a worker that died
while the scheduler was not ticking (a long first-use compile, a long forward), so the sidecar is back within
seconds whatever the scheduler does; the client's state is guarded by a lock that the scheduler's calls hold only
while they run.

Examples
--------
>>> cfg = SidecarConfig(seg_size=16, head_dim=64, group_size=2, window=4, num_slots=2, max_segments=4)
>>> with SidecarClient(cfg) as sc:                                     # doctest: +SKIP
...     key = sc.generations.key(layer=0, head=0, page=7)
...     job = sc.try_submit([key], k, v, q, ratio=2.0)                 # None: no free slot, keep the fast plan
...     outcomes = sc.tick(budget_ms=2.0)                              # on idle scheduler ticks
"""

from __future__ import annotations

import collections
import enum
import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Tuple, Type

import torch
import torch.multiprocessing  # noqa: F401  (registers the reducers that share tensor storage with the worker)

from mosaickv_sglang.config import MosaicKVConfig
from mosaickv_sglang.importance import SegmentImportance
from mosaickv_sglang.kernels import format as fmt
from mosaickv_sglang.kernels._checks import check_int
from mosaickv_sglang.planner import PlanResult
from mosaickv_sglang.sidecar.protocol import (
    PROTOCOL_VERSION,
    REASON_RESEGMENT,
    REASON_SEALED,
    STATUS_OK,
    PlanReply,
    PlanRequest,
    Ready,
    SegmentKey,
    Shutdown,
)
from mosaickv_sglang.sidecar.shared_buffers import KV_DTYPES, SlotBuffers, SlotPool, SlotShape
from mosaickv_sglang.sidecar.worker import WorkerSpec, worker_main
from mosaickv_sglang.strategies import Candidate, default_menu

logger = logging.getLogger(__name__)

# Niceness the worker adds by default: below the scheduler's priority, so a busy sidecar never takes a CPU the
# scheduler's step wants (the kernel still gives it every idle cycle).
DEFAULT_WORKER_NICE = 10
# Thread-pool sizes a spawned worker inherits from the environment.
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

__all__ = [
    "DEFAULT_WORKER_NICE", "JobOutcome", "JobStatus", "PageGenerations", "SidecarClient", "SidecarConfig",
    "SidecarCounters",
]


@dataclass(frozen=True)
class SidecarConfig:
    """Sizes and policies of one sidecar.

    Attributes
    ----------
    seg_size, head_dim : int
        ``S`` and ``d``.
    group_size : int
        ``G``, query heads per KV head.
    window : int
        ``W``, recent queries per segment at most.
    num_slots : int
        Jobs in flight at most (the queue bound).
    max_segments : int
        Segments per job at most.
    kv_dtype : torch.dtype
        dtype of K and V in the shared buffers (fp32, fp16 or bf16; inputs are converted on copy).
    menu : tuple of Candidate, optional
        The planner's menu; default :func:`~mosaickv_sglang.strategies.default_menu` with low-rank forms.
    sm_scale : float, optional
        Softmax scale (default ``1 / sqrt(d)``).
    num_threads, nice : int
        Worker intra-op threads (1: deterministic, leaves the cores to the scheduler) and niceness increment
        (default :data:`DEFAULT_WORKER_NICE`: where the worker and the scheduler share a CPU, the scheduler's step
        goes first; planning is never on the decode path, so the worker is the one to wait).
    restart_delay_s, max_restart_delay_s : float
        Delay before restarting a dead worker; doubled per consecutive death before the worker became ready.
    max_start_failures : int
        Consecutive deaths before ready after which the client gives up (the fast planner serves alone).
    start_timeout_s : float
        A worker not ready after this long is killed and restarted.
    job_timeout_s : float
        A worker that makes no progress for this long while owning jobs is considered hung: killed and restarted.
    shutdown_timeout_s : float
        :meth:`SidecarClient.close` waits this long for a clean exit before terminating the worker.
    parent_check_s : float
        How often an idle worker checks that its parent lives.
    watchdog_s : float
        How often the client's watchdog thread checks for a dead worker and restarts it when due, without waiting for
        the scheduler's next tick (0: restarts happen on ticks only).
    job_delay_s : float
        Fault injection for tests: the worker sleeps this long before each job (0 in production).
    """

    seg_size: int = fmt.DEFAULT_SEG_SIZE
    head_dim: int = 128
    group_size: int = 1
    window: int = 32
    num_slots: int = 8
    max_segments: int = 32
    kv_dtype: torch.dtype = torch.float32
    menu: Optional[Tuple[Candidate, ...]] = None
    sm_scale: Optional[float] = None
    num_threads: int = 1
    nice: int = DEFAULT_WORKER_NICE
    restart_delay_s: float = 0.1
    max_restart_delay_s: float = 2.0
    max_start_failures: int = 5
    start_timeout_s: float = 120.0
    job_timeout_s: float = 60.0
    shutdown_timeout_s: float = 2.0
    parent_check_s: float = 0.5
    watchdog_s: float = 0.5
    job_delay_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("seg_size", "head_dim", "group_size", "window", "num_slots", "max_segments", "num_threads",
                     "max_start_failures"):
            check_int(getattr(self, name), name, lo=1)
        check_int(self.nice, "nice", lo=0)
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype: expected one of {[str(t) for t in KV_DTYPES]}, got {self.kv_dtype}")
        for name in ("restart_delay_s", "max_restart_delay_s", "start_timeout_s", "job_timeout_s",
                     "shutdown_timeout_s", "parent_check_s", "watchdog_s", "job_delay_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {v!r}")
        if self.menu is not None and (not self.menu or not all(isinstance(c, Candidate) for c in self.menu)):
            raise ValueError(f"menu: expected a non-empty tuple of Candidate, got {self.menu!r}")
        object.__setattr__(self, "menu", self.resolved_menu())

    def resolved_menu(self) -> Tuple[Candidate, ...]:
        """The menu the worker plans with (the default one when ``menu`` is ``None``)."""
        if self.menu is not None:
            return tuple(self.menu)
        return default_menu(self.seg_size, self.head_dim, lowrank=True)

    @property
    def max_rank(self) -> int:
        """Largest low-rank ``r`` of the menu (0 without low-rank candidates): the factor columns of a slot."""
        ranks = [
            p for c in self.resolved_menu() for f, p in ((c.k_form, c.k_param), (c.v_form, c.v_param))
            if f == fmt.FORM_LOWRANK
        ]
        return max(ranks, default=0)

    def slot_shape(self) -> SlotShape:
        return SlotShape(
            self.num_slots, self.max_segments, self.seg_size, self.head_dim, self.window, self.group_size,
            self.max_rank, self.kv_dtype,
        )

    @classmethod
    def from_mosaic(
        cls, config: MosaicKVConfig, *, head_dim: int, group_size: int, **overrides: object
    ) -> "SidecarConfig":
        """The sidecar config of a server: ``S`` from ``config.segment_size``, shapes from the model."""
        if not isinstance(config, MosaicKVConfig):
            raise TypeError(f"config: expected MosaicKVConfig, got {type(config).__name__}")
        kw: Dict[str, Any] = dict(overrides)
        return cls(seg_size=config.segment_size, head_dim=head_dim, group_size=group_size, **kw)


class JobStatus(enum.Enum):
    """How a job ended."""

    OK = "ok"
    STALE = "stale"
    FAILED = "failed"
    LOST = "lost"


@dataclass(frozen=True, eq=False)
class JobOutcome:
    """The end of one submitted job.

    Attributes
    ----------
    job_id : int
    status : JobStatus
    segments : tuple of SegmentKey
        The job's segments, in slot row order.
    reason : int
        :data:`~mosaickv_sglang.sidecar.protocol.REASON_SEALED` or ``REASON_RESEGMENT``.
    result : PlanResult, optional
        The plan (``OK`` only), owning its memory.
    valid : tuple of bool
        Per segment, whether its page generation still matched when the reply was read (``OK``: apply only these).
    error : str
        Why a job failed or was lost.
    keys, values : torch.Tensor, optional
        ``OK`` only: the job's dense inputs, shape ``[N, S, d]`` (host copies out of the slot): what the plan is
        applied to.
    """

    job_id: int
    status: JobStatus
    segments: Tuple[SegmentKey, ...]
    reason: int = REASON_SEALED
    result: Optional[PlanResult] = field(default=None, repr=False)
    valid: Tuple[bool, ...] = ()
    error: str = ""
    keys: Optional[torch.Tensor] = field(default=None, repr=False)
    values: Optional[torch.Tensor] = field(default=None, repr=False)


@dataclass(frozen=True)
class SidecarCounters:
    """A snapshot of the sidecar's counters, for metrics.

    Attributes
    ----------
    submitted : int
        Jobs accepted by :meth:`SidecarClient.try_submit`.
    rejected_full : int
        Submissions refused because every slot was busy (their fast plan stayed).
    completed : int
        Jobs ended ``OK`` (plans delivered).
    failed : int
        Jobs ended ``FAILED``.
    discarded_stale : int
        Jobs ended ``STALE`` (every segment freed or reused meanwhile).
    segments_discarded : int
        Stale segments, in ``STALE`` jobs and as invalid rows of ``OK`` jobs.
    lost : int
        Jobs ended ``LOST``.
    restarts : int
        Worker restarts.
    resegmentations : int
        ``OK`` jobs that re-planned shared segments (``REASON_RESEGMENT``).
    queue_depth : int
        Jobs in flight now.
    """

    submitted: int = 0
    rejected_full: int = 0
    completed: int = 0
    failed: int = 0
    discarded_stale: int = 0
    segments_discarded: int = 0
    lost: int = 0
    restarts: int = 0
    resegmentations: int = 0
    queue_depth: int = 0


class PageGenerations:
    """Generation counter per page: bump it when a page is freed or reused, so plans of its old data are dropped.

    The pool may keep its own counters and give the client an ``is_current`` callable instead; this is the default.
    """

    def __init__(self) -> None:
        self._gen: Dict[int, int] = {}

    def current(self, page: int) -> int:
        return self._gen.get(page, 0)

    def bump(self, pages: Iterable[int]) -> None:
        """Invalidate every plan in flight for ``pages``."""
        for p in pages:
            self._gen[p] = self._gen.get(p, 0) + 1

    def key(self, layer: int, head: int, page: int) -> SegmentKey:
        """The key of a segment with its page's current generation."""
        return SegmentKey(layer, head, page, self.current(page))

    def is_current(self, key: SegmentKey) -> bool:
        return self.current(key.page) == key.generation


@dataclass(eq=False)
class _Job:
    request: PlanRequest
    sent_at: Optional[float] = None  # None: not yet handed to the worker (the slot is still client-owned)


@dataclass
class _Worker:
    proc: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    started_at: float
    ready: bool = False
    last_progress: float = field(default=0.0)


class SidecarClient:
    """Handle of one sidecar worker process (see the module docstring).

    Parameters
    ----------
    config : SidecarConfig
    is_current : callable, optional
        ``is_current(key) -> bool``: whether a segment's page still holds the data the key was made for. Default:
        :attr:`generations` (a :class:`PageGenerations`).
    """

    def __init__(self, config: SidecarConfig, *, is_current: Optional[Callable[[SegmentKey], bool]] = None) -> None:
        if not isinstance(config, SidecarConfig):
            raise TypeError(f"config: expected SidecarConfig, got {type(config).__name__}")
        self.config = config
        self.menu: Tuple[Candidate, ...] = config.resolved_menu()
        self.generations = PageGenerations()
        self._is_current = is_current if is_current is not None else self.generations.is_current
        self._ctx = multiprocessing.get_context("spawn")
        self._pool: Optional[SlotPool] = None
        self._worker: Optional[_Worker] = None
        self._jobs: Dict[int, _Job] = {}
        self._unsent: Deque[int] = collections.deque()
        self._finished: List[JobOutcome] = []
        self._next_job_id = 0
        self._restart_at: Optional[float] = None
        self._start_failures = 0
        self._disabled = False
        self._closed = False
        self._lock = threading.RLock()
        self._stop_watchdog = threading.Event()
        self._watchdog: Optional[threading.Thread] = None
        self._count: Dict[str, int] = {
            f: 0 for f in SidecarCounters.__dataclass_fields__ if f != "queue_depth"
        }

    # --- lifecycle ------------------------------------------------------------------------------------------------
    def start(self) -> "SidecarClient":
        """Allocate the shared buffers and start the worker (returns at once; the worker gets ready in the
        background, and jobs submitted meanwhile wait in their slots)."""
        if self._pool is not None:
            raise RuntimeError("start: expected a client not started yet, got one already started")
        with self._lock:
            self._pool = SlotPool(SlotBuffers.allocate(self.config.slot_shape()))
            self._spawn()
        logger.info("MosaicKV sidecar started (pid %s, %d slots)", self.pid, self.config.num_slots)
        if self.config.watchdog_s > 0:
            self._watchdog = threading.Thread(target=self._watch, name="mosaickv-sidecar-watchdog", daemon=True)
            self._watchdog.start()
        return self

    def _watch(self) -> None:
        """The watchdog thread: a dead worker is handled (its jobs end LOST) and restarted when its delay is due.
        Only deaths: hangs and start timeouts are judged on the scheduler's ticks, once it has read the pipe."""
        while not self._stop_watchdog.wait(self.config.watchdog_s):
            with self._lock:
                if self._closed:
                    return
                w = self._worker
                if (w is None and self._restart_at is not None) or (w is not None and w.proc.exitcode is not None):
                    try:
                        self._check_worker(time.monotonic())
                    except Exception:  # never let the watchdog die silently; the scheduler's ticks still restart
                        logger.exception("MosaicKV sidecar watchdog")

    def __enter__(self) -> "SidecarClient":
        return self.start()

    def __exit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.close()

    def close(self, timeout: Optional[float] = None) -> List[JobOutcome]:
        """Stop the worker: ``Shutdown``, then terminate, then kill, each after ``timeout`` (default
        ``config.shutdown_timeout_s``). Jobs still in flight end ``LOST``; their outcomes are returned."""
        self._stop_watchdog.set()
        with self._lock:
            out = self._close(timeout)
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(5.0)
        return out

    def _close(self, timeout: Optional[float]) -> List[JobOutcome]:
        if self._closed:
            return []
        self._closed = True
        wait = self.config.shutdown_timeout_s if timeout is None else timeout
        w = self._worker
        if w is not None:
            try:
                w.conn.send(Shutdown())
            except (OSError, ValueError):
                pass
            self._stop_process(w, wait)
            self._worker = None
        for job_id in list(self._jobs):
            self._lose(job_id, "sidecar closed")
        out, self._finished = self._finished, []
        return sorted(out, key=lambda o: o.job_id)

    @property
    def pid(self) -> Optional[int]:
        return None if self._worker is None else self._worker.proc.pid

    @property
    def is_alive(self) -> bool:
        return self._worker is not None and self._worker.proc.is_alive()

    @property
    def is_ready(self) -> bool:
        return self._worker is not None and self._worker.ready

    @property
    def disabled(self) -> bool:
        """True after ``max_start_failures`` consecutive failed starts: submissions are refused."""
        return self._disabled

    @property
    def counters(self) -> SidecarCounters:
        return SidecarCounters(**self._count, queue_depth=len(self._jobs))

    @property
    def free_slots(self) -> int:
        return 0 if self._pool is None else self._pool.num_free

    @property
    def buffers(self) -> SlotBuffers:
        """The shared slot tensors (after :meth:`start`)."""
        return self._slots.buffers

    @property
    def _slots(self) -> SlotPool:
        if self._pool is None:
            raise RuntimeError("sidecar: expected a started client, got one not started")
        return self._pool

    # --- submission -----------------------------------------------------------------------------------------------
    def try_submit(
        self,
        segments: Sequence[SegmentKey],
        keys: torch.Tensor,
        values: torch.Tensor,
        queries: torch.Tensor,
        *,
        ratio: Optional[float] = None,
        budget_bytes: Optional[int] = None,
        importance: Optional[SegmentImportance] = None,
        group_ids: Optional[torch.Tensor] = None,
        always_dense: Optional[torch.Tensor] = None,
        reason: int = REASON_SEALED,
        queries_by_group: bool = False,
    ) -> Optional[int]:
        """Queue one planning job without blocking.

        Parameters
        ----------
        segments : sequence of SegmentKey
            ``N`` keys, one per row of ``keys``.
        keys, values : torch.Tensor
            shape ``[N, S, d]``, float, any device (copied into shared memory here).
        queries : torch.Tensor
            shape ``[N, W', G, d]``, float, ``W' <= W``; recent queries of each segment's group.
        ratio, budget_bytes, importance, group_ids, always_dense
            As in :func:`~mosaickv_sglang.planner.plan_exact` (exactly one of ``ratio`` and ``budget_bytes``).
        reason : int
            ``REASON_SEALED`` or ``REASON_RESEGMENT``.
        queries_by_group : bool
            ``queries`` holds one row per group (``[R, W', G, d]``), segment ``i`` reading row ``group_ids[i]``
            (:meth:`SlotBuffers.write_inputs`): pages of one layer send their heads' queries once.

        Returns
        -------
        int or None
            The job id, or ``None`` when no slot is free or the sidecar is disabled (the fast plan stays).
        """
        if self._pool is None or self._closed:
            raise RuntimeError("try_submit: expected a started, open client, got one not started or closed")
        if (ratio is None) == (budget_bytes is None):
            raise ValueError(
                f"ratio/budget_bytes: expected exactly one of them, got ratio={ratio!r}, budget_bytes={budget_bytes!r}"
            )
        if reason not in (REASON_SEALED, REASON_RESEGMENT):
            raise ValueError(f"reason: expected REASON_SEALED or REASON_RESEGMENT, got {reason!r}")
        segs = tuple(segments)
        if not all(isinstance(k, SegmentKey) for k in segs):
            raise TypeError("segments: expected a sequence of SegmentKey, got other items")
        if not isinstance(keys, torch.Tensor) or len(segs) != keys.shape[0]:
            got = keys.shape[0] if isinstance(keys, torch.Tensor) else type(keys).__name__
            raise ValueError(f"segments: expected one key per segment of keys ({got}), got {len(segs)}")
        with self._lock:
            if self._disabled:
                self._count["rejected_full"] += 1
                return None
            slot = self._pool.try_acquire()
            if slot is None:
                self._count["rejected_full"] += 1
                return None
        try:  # outside the lock: the copy is the slow part, and the slot is ours
            self._pool.buffers.write_inputs(slot, keys, values, queries, importance=importance, group_ids=group_ids,
                                            always_dense=always_dense, queries_by_group=queries_by_group)  # fmt: skip
        except BaseException:
            with self._lock:
                self._pool.release(slot)
            raise
        with self._lock:
            return self._enqueue(slot, segs, queries, ratio, budget_bytes, importance, group_ids, always_dense,
                                 reason, int(queries.shape[0]) if queries_by_group else 0)  # fmt: skip

    def _enqueue(self, slot: int, segs: Tuple[SegmentKey, ...], queries: torch.Tensor, ratio: Optional[float],
                 budget_bytes: Optional[int], importance: Optional[SegmentImportance],
                 group_ids: Optional[torch.Tensor], always_dense: Optional[torch.Tensor], reason: int,
                 query_rows: int = 0) -> int:
        job_id = self._next_job_id
        self._next_job_id += 1
        cfg = self.config
        req = PlanRequest(
            job_id=job_id, slot=slot, keys=segs, num_segments=len(segs), num_queries=int(queries.shape[1]),
            seg_size=cfg.seg_size, head_dim=cfg.head_dim, group_size=cfg.group_size,
            ratio=None if ratio is None else float(ratio), budget_bytes=budget_bytes,
            has_importance=importance is not None,
            has_q_mean=importance is not None and importance.q_mean is not None,
            has_group_ids=group_ids is not None, has_always_dense=always_dense is not None, reason=reason,
            query_rows=query_rows,
        )
        self._jobs[job_id] = _Job(req)
        self._unsent.append(job_id)
        self._count["submitted"] += 1
        self._flush(time.monotonic())
        return job_id

    # --- progress -------------------------------------------------------------------------------------------------
    def tick(self, budget_ms: Optional[float] = None) -> List[JobOutcome]:
        """Do at most about ``budget_ms`` of client work (``None``: all that is available), without blocking.

        Checks the worker (restarting it when dead or hung), hands queued jobs to it, reads replies and copies
        plans out of their slots. Returns the jobs that ended since the last call, by job id.
        """
        with self._lock:
            if self._pool is None or self._closed:
                return []
            now = time.monotonic()
            deadline = None if budget_ms is None else now + budget_ms / 1000.0
            self._check_worker(now)
            self._receive(deadline)
            self._flush(time.monotonic())
            out, self._finished = self._finished, []
        return sorted(out, key=lambda o: o.job_id)

    def poll(self) -> List[JobOutcome]:
        """:meth:`tick` without a time budget (still non-blocking)."""
        return self.tick(None)

    def wait_ready(self, timeout: float) -> bool:
        """Block up to ``timeout`` seconds until the worker is ready (startup and tests, not the scheduler loop)."""
        end = time.monotonic() + timeout
        while not self.is_ready and time.monotonic() < end:
            ended = self.tick()  # evaluated first: tick() replaces the list, so extend the current one after it
            with self._lock:
                self._finished.extend(ended)
            self.wait_io(0.05)
        return self.is_ready

    def drain(self, timeout: float) -> List[JobOutcome]:
        """Block up to ``timeout`` seconds until no job is in flight; returns the outcomes (tests, shutdown)."""
        end = time.monotonic() + timeout
        out: List[JobOutcome] = []
        while True:
            out.extend(self.tick())
            if not self._jobs or time.monotonic() >= end or self._closed:
                return sorted(out, key=lambda o: o.job_id)
            self.wait_io(0.05)

    # --- internals ------------------------------------------------------------------------------------------------
    def wait_io(self, timeout: float, also: Sequence[int] = ()) -> None:
        """Block up to ``timeout`` seconds, without the interpreter's lock, until the worker sends something or
        dies (its reply is read by the next :meth:`tick`), or one of the file descriptors ``also`` is readable."""
        w = self._worker
        waited = list(also) + ([] if w is None else [w.conn, w.proc.sentinel])
        if not waited:
            time.sleep(timeout)
            return
        try:
            multiprocessing.connection.wait(waited, timeout)
        except (OSError, ValueError):
            time.sleep(timeout)

    def _spawn(self) -> None:
        cfg = self.config
        spec = WorkerSpec(
            parent_pid=os.getpid(), menu=self.menu, sm_scale=cfg.sm_scale, num_threads=cfg.num_threads,
            parent_check_s=cfg.parent_check_s, nice=cfg.nice, job_delay_s=cfg.job_delay_s,
        )
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=worker_main, args=(child_conn, self._slots.buffers, spec), name="mosaickv-sidecar", daemon=True
        )
        # the spawned interpreter imports torch (and its BLAS/OpenMP pools) before worker_main runs: cap those pools
        # through the environment it inherits, not only with torch.set_num_threads inside the worker
        saved = {k: os.environ.get(k) for k in _THREAD_ENV}
        os.environ.update({k: str(cfg.num_threads) for k in _THREAD_ENV})
        try:
            proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        child_conn.close()  # so that the worker's death reads as EOF here
        now = time.monotonic()
        self._worker = _Worker(proc, parent_conn, started_at=now, last_progress=now)
        self._restart_at = None

    def _check_worker(self, now: float) -> None:
        w = self._worker
        if w is None:
            if self._restart_at is not None and now >= self._restart_at and not self._disabled:
                self._spawn()
                self._count["restarts"] += 1  # after the new worker is in place: a reader of the count sees it
                logger.warning("MosaicKV sidecar restarted (pid %s)", self.pid)
            return
        if w.proc.exitcode is not None:
            self._on_death(w, f"exited with code {w.proc.exitcode}")
        elif self._has_unread(w):
            # a scheduler blocked for long (a kernel warmup, a long forward) left the worker's Ready or replies
            # unread: the timeouts below are judged only once the client has read what the worker sent
            return
        elif not w.ready and now - w.started_at > self.config.start_timeout_s:
            self._on_death(w, f"not ready after {self.config.start_timeout_s:.1f} s")
        elif w.ready:
            sent = [j.sent_at for j in self._jobs.values() if j.sent_at is not None]
            if sent and now - max(w.last_progress, min(sent)) > self.config.job_timeout_s:
                self._on_death(w, f"no progress for {self.config.job_timeout_s:.1f} s")

    @staticmethod
    def _has_unread(w: _Worker) -> bool:
        try:
            return bool(w.conn.poll(0))
        except (EOFError, OSError):
            return False

    def _stop_process(self, w: _Worker, wait: float) -> None:
        w.proc.join(wait)
        if w.proc.is_alive():
            logger.warning("MosaicKV sidecar %s did not exit in %.1f s, terminating", w.proc.pid, wait)
            w.proc.terminate()
            w.proc.join(1.0)
        if w.proc.is_alive():
            w.proc.kill()
            w.proc.join()
        w.conn.close()

    def _on_death(self, w: _Worker, why: str) -> None:
        """The worker died or is declared hung: read what it finished, stop it, lose what it owned, plan restart."""
        if self._worker is not w:
            return
        self._worker = None
        self._drain(w, None)  # replies sent before death are complete and valid
        if w.proc.is_alive():
            w.proc.kill()
        self._stop_process(w, 1.0)
        lost = [jid for jid, j in self._jobs.items() if j.sent_at is not None]
        for jid in lost:
            self._lose(jid, f"sidecar {why}")
        if not w.ready:
            self._start_failures += 1
        if self._start_failures >= self.config.max_start_failures:
            self._disabled = True
            for jid in list(self._jobs):
                self._lose(jid, "sidecar disabled")
            logger.warning(
                "MosaicKV sidecar %s %s; %d failed starts in a row, giving up: the fast planner serves alone",
                w.proc.pid, why, self._start_failures,
            )
            return
        delay = min(self.config.restart_delay_s * 2 ** self._start_failures, self.config.max_restart_delay_s)
        self._restart_at = time.monotonic() + delay
        logger.warning(
            "MosaicKV sidecar %s %s; %d job(s) lost (their fast plans stay), restarting in %.2f s",
            w.proc.pid, why, len(lost), delay,
        )

    def _lose(self, job_id: int, why: str) -> None:
        job = self._jobs.pop(job_id)
        slot = job.request.slot
        if job.sent_at is None:
            self._slots.release(slot)
            try:
                self._unsent.remove(job_id)
            except ValueError:
                pass
        else:
            self._slots.reclaim(slot)
        self._count["lost"] += 1
        self._finished.append(JobOutcome(job_id, JobStatus.LOST, job.request.keys, job.request.reason, error=why))

    def _flush(self, now: float) -> None:
        w = self._worker
        if w is None or not w.ready:
            return
        while self._unsent:
            job = self._jobs[self._unsent[0]]
            try:
                w.conn.send(job.request)
            except (OSError, ValueError) as exc:
                self._on_death(w, f"pipe broken ({exc})")
                return
            self._unsent.popleft()
            self._slots.mark_submitted(job.request.slot)
            job.sent_at = now

    def _receive(self, deadline: Optional[float]) -> None:
        w = self._worker
        if w is not None and not self._drain(w, deadline):
            w.proc.join(1.0)
            code = w.proc.exitcode
            self._on_death(w, "closed its pipe" if code is None else f"exited with code {code}")

    def _drain(self, w: _Worker, deadline: Optional[float]) -> bool:
        """Handle the messages waiting on ``w``'s pipe until ``deadline``; False when the pipe hit EOF."""
        while deadline is None or time.monotonic() < deadline:
            try:
                if not w.conn.poll(0):
                    return True
                msg = w.conn.recv()
            except (EOFError, OSError):
                return False
            if isinstance(msg, Ready):
                self._on_ready(w, msg)
            elif isinstance(msg, PlanReply):
                w.last_progress = time.monotonic()
                self._on_reply(msg)
            else:
                logger.warning("MosaicKV sidecar: ignoring unknown message %s", type(msg).__name__)
        return True

    def _on_ready(self, w: _Worker, msg: Ready) -> None:
        if msg.version != PROTOCOL_VERSION:
            logger.warning(
                "MosaicKV sidecar: protocol version %d, expected %d; disabling the sidecar",
                msg.version, PROTOCOL_VERSION,
            )
            self._start_failures = self.config.max_start_failures
            self._on_death(w, "speaks another protocol version")
            return
        w.ready = True
        w.last_progress = time.monotonic()
        self._start_failures = 0
        logger.debug("MosaicKV sidecar %d ready", msg.pid)

    def _on_reply(self, reply: PlanReply) -> None:
        job = self._jobs.pop(reply.job_id, None)
        if job is None or job.request.slot != reply.slot:
            logger.warning("MosaicKV sidecar: reply for unknown job %d ignored", reply.job_id)
            return
        req = job.request
        self._slots.mark_ready(req.slot)
        try:
            if reply.status != STATUS_OK:
                self._count["failed"] += 1
                outcome = JobOutcome(req.job_id, JobStatus.FAILED, req.keys, req.reason, error=reply.error)
            else:
                valid = tuple(bool(self._is_current(k)) for k in req.keys)
                stale = sum(1 for v in valid if not v)
                self._count["segments_discarded"] += stale
                if stale == len(valid):
                    self._count["discarded_stale"] += 1
                    outcome = JobOutcome(req.job_id, JobStatus.STALE, req.keys, req.reason, valid=valid)
                else:
                    buffers = self._slots.buffers
                    result = buffers.read_plan(reply, self.menu)
                    n = req.num_segments
                    keys, values = buffers.keys[req.slot, :n].clone(), buffers.values[req.slot, :n].clone()
                    self._count["completed"] += 1
                    if req.reason == REASON_RESEGMENT:
                        self._count["resegmentations"] += 1
                    outcome = JobOutcome(req.job_id, JobStatus.OK, req.keys, req.reason, result=result, valid=valid,
                                         keys=keys, values=values)  # fmt: skip
        finally:
            self._slots.release(req.slot)
        self._finished.append(outcome)
