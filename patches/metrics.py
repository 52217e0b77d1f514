# SPDX-License-Identifier: Apache-2.0
"""Hooks that refresh MosaicKV's Prometheus series where SGLang 0.5.17's scheduler reports its own.

Targets: AFTER ``SchedulerMetricsReporter.report_decode_stats``, ``report_prefill_stats`` and
``_maybe_log_idle_metrics`` (``sglang.srt.managers.scheduler_components.metrics_reporter``), so the series stay fresh
while decoding, prefilling or idle; BEFORE ``Scheduler.run_batch``, a clock read per step for the decode step
histogram (:mod:`mosaickv_sglang.step_timer`), drained into it on those refreshes. Why hooks: SGLang's
``stat_loggers`` can replace the scheduler's metrics collector class, but not add series beside it, no registry hands
a plugin the scheduler's periodic report, and none times its steps. Remove when SGLang offers a per-scheduler metrics
callback.

Every hook is a no-op unless this process built a ``mosaic`` attention backend (``--kv-compressor mosaic``, see
:func:`mosaickv_sglang.runtime.current_sealer`) and this scheduler exports metrics (``--enable-metrics``, and
attention-TP rank 0 unless ``--enable-metrics-for-all-schedulers``, as SGLang decides). It then costs a clock read
per call and exports at most every :data:`~mosaickv_sglang.metrics.REFRESH_INTERVAL` seconds.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch

from mosaickv_sglang.runtime import current_sealer
from mosaickv_sglang.step_timer import DecodeStepTimer
from mosaickv_sglang.step_trace import StepTrace, step_trace_prefix

from . import seam

logger = logging.getLogger(__name__)


def refresh_mosaic_metrics(result: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER the reporter's decode, prefill and idle reports: refresh MosaicKV's series if they are due."""
    if not getattr(self, seam.REPORTER_METRICS_ENABLED_ATTR, False):
        return
    sealer = current_sealer()
    if sealer is None:
        return
    exporter = getattr(self, seam.METRICS_EXPORTER_ATTR, None)
    if exporter is False:  # failed once: metrics must never stop the scheduler
        return
    try:
        if exporter is None:
            from mosaickv_sglang.metrics import MosaicMetricsExporter

            collector = getattr(self, seam.REPORTER_COLLECTOR_ATTR)
            exporter = MosaicMetricsExporter(getattr(collector, seam.COLLECTOR_LABELS_ATTR))
            setattr(self, seam.METRICS_EXPORTER_ATTR, exporter)
        timer = getattr(self, seam.STEP_TIMER_ATTR, None)
        if timer is not None:
            exporter.observe_decode_steps(timer.drain(), timer.drain_behind_prefill())
        exporter.maybe_refresh(sealer)
    except Exception:
        logger.warning("MosaicKV: metrics export failed; MosaicKV metrics are off for this scheduler", exc_info=True)
        setattr(self, seam.METRICS_EXPORTER_ATTR, False)


def time_decode_steps(self: Any, batch: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE ``Scheduler.run_batch``: mark the step's start on the reporter's :class:`DecodeStepTimer`, telling it
    whether the scheduler runs SGLang's overlap loop."""
    reporter = getattr(self, seam.SCHEDULER_REPORTER_ATTR, None)
    if reporter is None or not getattr(reporter, seam.REPORTER_METRICS_ENABLED_ATTR, False):
        return None
    timer = getattr(reporter, seam.STEP_TIMER_ATTR, None)
    if timer is None:
        if current_sealer() is None:
            return None
        timer = DecodeStepTimer()
        setattr(reporter, seam.STEP_TIMER_ATTR, timer)
    mode = getattr(batch, "forward_mode", None)
    overlapped = bool(getattr(self, seam.SCHEDULER_OVERLAP_ATTR, False))
    timer.step(bool(mode is not None and mode.is_decode()), overlapped=overlapped)
    return None


_trace: Optional[StepTrace] = None  # this scheduler process's step trace (MOSAICKV_STEP_TRACE), once its first step
_trace_failed = False


def trace_steps(self: Any, batch: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE ``Scheduler.run_batch``, with ``MOSAICKV_STEP_TRACE`` set: a row of the step trace (stock servers
    too: the MosaicKV counts are then left empty)."""
    global _trace, _trace_failed
    if _trace_failed:
        return None
    try:
        if _trace is None:
            prefix = step_trace_prefix()
            if prefix is None:
                return None
            _trace = StepTrace(f"{prefix}.{os.getpid()}.csv")
            logger.info("MosaicKV: step trace in %s", _trace.path)
        mode = getattr(batch, "forward_mode", None)
        _trace.record(bool(mode is not None and mode.is_decode()), bool(getattr(self, seam.SCHEDULER_OVERLAP_ATTR,
                      False)), batch.batch_size(), _context_tokens(batch), current_sealer(), _forward_stream(self))
    except Exception:
        logger.warning("MosaicKV: step trace failed; it is off for this scheduler", exc_info=True)
        _trace_failed = True
    return None


def _forward_stream(scheduler: Any) -> Any:
    """The scheduler's forward stream on a GPU (the step trace's GPU periods), else ``None``."""
    stream = getattr(scheduler, seam.SCHEDULER_FORWARD_STREAM_ATTR, None)
    return stream if isinstance(stream, torch.cuda.Stream) else None


def _context_tokens(batch: Any) -> int:
    total = getattr(batch, seam.BATCH_SEQ_LENS_SUM_ATTR, None)
    if total is None:
        lens = getattr(batch, seam.BATCH_SEQ_LENS_CPU_ATTR, None)
        total = 0 if lens is None else int(lens.sum())
    return int(total)


def flush_step_trace(*args: Any, **kwargs: Any) -> None:
    """AFTER ``Scheduler.on_idle``: the trace's rows so far on disk (a load's last steps before the server stops)."""
    if _trace is not None and not _trace_failed:
        try:
            _trace.flush(wait=True)
        except OSError:
            logger.warning("MosaicKV: step trace flush failed", exc_info=True)


def apply() -> None:
    """Register the metrics hooks, and the step trace's when ``MOSAICKV_STEP_TRACE`` is set."""
    for target in (seam.REPORT_DECODE_STATS, seam.REPORT_PREFILL_STATS, seam.LOG_IDLE_METRICS):
        seam.register_hook(target, refresh_mosaic_metrics, "AFTER")
    seam.register_hook(seam.SCHEDULER_RUN_BATCH, time_decode_steps, "BEFORE")
    if step_trace_prefix() is not None:
        seam.register_hook(seam.SCHEDULER_RUN_BATCH, trace_steps, "BEFORE")
        seam.register_hook(seam.SCHEDULER_ON_IDLE, flush_step_trace, "AFTER")
