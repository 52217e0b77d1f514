# SPDX-License-Identifier: Apache-2.0
"""The first half of a seal planned on a thread of its own (``MOSAICKV_SEAL_PLAN_THREAD=1``, experimental).

With ``MOSAICKV_SEAL_ASYNC=N`` and ``MOSAICKV_SEAL_BESIDE_STEP=1`` a policy seal is planned beside the step in flight
and packed N plans later, but the planner's host time (its kernel launches: 15-50 ms a seal on the 8B shape) still
runs inside one scheduler plan, and those plans are the decode-step tail of issue #5 (`bench/RESULTS.md`,
"twenty-sixth run"). Here the scheduler hands the planner's launches to one worker thread and goes on with its
steps. PyTorch releases the interpreter lock while it dispatches each operation, so the two threads interleave at
operation granularity.

The scheduler prepares everything that depends on its state before handing the job over (the pages' physical
pages, views of the query window's snapshot, the stream); the worker gathers the pages' tokens, plans and starts the
copy of the payload sizes to the host. The scheduler joins the worker (:meth:`PlannerThread.join`) before anything
else that seals, packs or makes the forward stream wait for the side stream, so the worker only ever overlaps the
scheduler's other work, and every decision still depends only on host state (plans counted, not the worker's
progress): tensor-parallel ranks decide alike. A page freed meanwhile may be rewritten before the worker gathers it:
its plan is then voided at the pack, as any pending seal's whose page changed.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional

from mosaickv_sglang.config import flag_env

__all__ = ["PlannerThread", "SEAL_PLAN_THREAD_ENV", "seal_plan_thread_enabled"]

SEAL_PLAN_THREAD_ENV = "MOSAICKV_SEAL_PLAN_THREAD"


def seal_plan_thread_enabled() -> bool:
    """``MOSAICKV_SEAL_PLAN_THREAD``: ``1`` plans the first half of seals on a worker thread, ``0`` (the default) on
    the scheduler's; any other value is refused by name."""
    return flag_env(SEAL_PLAN_THREAD_ENV)


class PlannerThread:
    """One worker thread (``mosaickv-seal-planner``) running one planner job at a time.

    Attributes
    ----------
    jobs : int
        Jobs submitted.
    worker_seconds : float
        The jobs' own time on the worker.
    join_seconds : float
        Time the caller waited in :meth:`join` for a job still running.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mosaickv-seal-planner")
        self._job: Optional[Future] = None
        self.jobs = 0
        self.worker_seconds = 0.0
        self.join_seconds = 0.0

    @property
    def busy(self) -> bool:
        """A job was submitted and not joined yet."""
        return self._job is not None

    def submit(self, job: Callable[[], Any]) -> None:
        """Run ``job`` on the worker; the previous job must have been joined."""
        if self._job is not None:
            raise RuntimeError("PlannerThread.submit: the previous job was not joined")

        def timed() -> Any:
            t0 = time.perf_counter()
            try:
                return job()
            finally:
                self.worker_seconds += time.perf_counter() - t0

        self._job = self._pool.submit(timed)
        self.jobs += 1

    def join(self) -> Any:
        """The running job's result, once it is done (``None`` when none runs); its exception is raised here."""
        job, self._job = self._job, None
        if job is None:
            return None
        t0 = time.perf_counter()
        try:
            return job.result()
        finally:
            self.join_seconds += time.perf_counter() - t0

    def close(self) -> None:
        """Wait for the running job and stop the worker."""
        try:
            self.join()
        finally:
            self._pool.shutdown(wait=True)
