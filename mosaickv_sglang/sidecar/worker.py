# SPDX-License-Identifier: Apache-2.0
"""The sidecar process: plans segments with :func:`~mosaickv_sglang.planner.plan_exact`, off the decode path.

:func:`worker_main` is the target of a ``spawn`` process started by
:class:`~mosaickv_sglang.sidecar.client.SidecarClient`. It runs single-threaded (``torch.set_num_threads``, default
1) so it does not take the scheduler's cores and so its results are bit-reproducible: two TP ranks fed the same
inputs get byte-identical plans. It exits on :class:`~mosaickv_sglang.sidecar.protocol.Shutdown`, when the pipe to
the client closes (EOF), or when its parent process is gone (checked every ``parent_check_s``).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Optional, Tuple

import torch

from mosaickv_sglang.planner import plan_exact
from mosaickv_sglang.sidecar.protocol import (
    PROTOCOL_VERSION,
    STATUS_FAILED,
    STATUS_OK,
    PlanReply,
    PlanRequest,
    Ready,
    Shutdown,
)
from mosaickv_sglang.sidecar.shared_buffers import SlotBuffers
from mosaickv_sglang.strategies import Candidate

logger = logging.getLogger(__name__)

__all__ = ["WorkerSpec", "handle_request", "worker_main"]


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs besides its pipe and buffers (picklable, fixed for the worker's life).

    Attributes
    ----------
    parent_pid : int
        The client's process id; the worker exits when its parent changes (the client died).
    menu : tuple of Candidate
        The planner's menu (the client resolves the default once, so client and worker agree on indices).
    sm_scale : float, optional
        Softmax scale (default ``1 / sqrt(d)``).
    num_threads : int
        Intra-op threads of the worker (1: leave the cores to the scheduler; deterministic).
    parent_check_s : float
        How often an idle worker checks its parent.
    nice : int
        Added to the worker's niceness (0: unchanged).
    job_delay_s : float
        Fault injection for tests: sleep this long before each job (0 in production).
    log_level : int, optional
        Logging level of the worker's root logger (``None``: leave the default).
    """

    parent_pid: int
    menu: Tuple[Candidate, ...]
    sm_scale: Optional[float] = None
    num_threads: int = 1
    parent_check_s: float = 0.5
    nice: int = 0
    job_delay_s: float = 0.0
    log_level: Optional[int] = None


def handle_request(req: PlanRequest, buffers: SlotBuffers, spec: WorkerSpec) -> PlanReply:
    """Plan one job: read the slot, run :func:`plan_exact`, write the plan into the slot.

    A planner error becomes a :data:`~mosaickv_sglang.sidecar.protocol.STATUS_FAILED` reply (the client keeps the
    fast plan); the worker goes on.
    """
    t0 = time.perf_counter()
    if spec.job_delay_s > 0:
        time.sleep(spec.job_delay_s)
    try:
        inputs = buffers.read_inputs(req)
        result = plan_exact(
            inputs.pop("keys"), inputs.pop("values"), inputs.pop("queries"),
            ratio=req.ratio, budget_bytes=req.budget_bytes, menu=spec.menu, sm_scale=spec.sm_scale,
            **inputs,  # type: ignore[arg-type]
        )
        k_cols, v_cols = buffers.write_plan(req.slot, result)
    except (ValueError, TypeError, RuntimeError) as exc:
        logger.warning("MosaicKV sidecar: job %d failed, the fast plan stays: %s", req.job_id, exc)
        return PlanReply(req.job_id, req.slot, STATUS_FAILED, elapsed_s=time.perf_counter() - t0, error=str(exc))
    return PlanReply(
        req.job_id, req.slot, STATUS_OK,
        num_segments=req.num_segments, k_rank_cols=k_cols, v_rank_cols=v_cols,
        budget_bytes=result.budget_bytes, dense_bytes=result.dense_bytes,
        lagrange_multiplier=result.lagrange_multiplier, elapsed_s=time.perf_counter() - t0,
    )


def worker_main(conn: Connection, buffers: SlotBuffers, spec: WorkerSpec) -> None:
    """Main loop of the sidecar process.

    Parameters
    ----------
    conn : multiprocessing.connection.Connection
        The worker's end of the duplex pipe to the client.
    buffers : SlotBuffers
        The shared slot tensors.
    spec : WorkerSpec
    """
    if spec.log_level is not None:
        logging.basicConfig(level=spec.log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the server; the client shuts us down
    torch.set_num_threads(spec.num_threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (parallel work ran before): keep it
        pass
    if spec.nice:
        os.nice(spec.nice)
    pid = os.getpid()
    try:
        conn.send(Ready(PROTOCOL_VERSION, pid))
        while True:
            if os.getppid() != spec.parent_pid:
                logger.warning("MosaicKV sidecar %d: parent %d is gone, exiting", pid, spec.parent_pid)
                return
            if not conn.poll(spec.parent_check_s):
                continue
            msg = conn.recv()
            if isinstance(msg, Shutdown):
                logger.debug("MosaicKV sidecar %d: shutdown", pid)
                return
            if isinstance(msg, PlanRequest):
                conn.send(handle_request(msg, buffers, spec))
            else:
                logger.warning("MosaicKV sidecar %d: ignoring unknown message %s", pid, type(msg).__name__)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        logger.debug("MosaicKV sidecar %d: pipe closed, exiting", pid)
    finally:
        conn.close()
