# SPDX-License-Identifier: Apache-2.0
"""Hooks on SGLang 0.5.17's scheduler loop (``--kv-compressor mosaic``).

- AFTER ``Scheduler.on_idle``: a few milliseconds of sidecar work on idle scheduler ticks
  (:meth:`~mosaickv_sglang.sidecar.bridge.SidecarBridge.on_idle`: apply finished plans, re-plan a slice of the
  prefix-shared segments). Busy steps tick the sidecar from the sealer instead, before each forward.
- AFTER ``Scheduler.on_idle``: once, after the first decode batches, freeze the garbage collector's heap
  (:func:`~mosaickv_sglang.gc_freeze.maybe_freeze`; ``MOSAICKV_GC_FREEZE=0`` skips).
- AFTER ``Scheduler.on_idle``: after seal graphs were captured, give their warm-up runs' cached blocks back to the
  device (:meth:`~mosaickv_sglang.seal_graphs.SealGraphs.release_cache`), with nothing in flight to wait for.
- BEFORE ``Scheduler.run_batch``, with ``--mosaic-overlap-schedule on``: note the batch's request indices (host),
  new slots and the scheduler's stream (:func:`~mosaickv_sglang.batch_inputs.note_scheduled_batch`), so that the
  plans of its forward read them back without waiting for the step in flight.
- AFTER ``Scheduler.run_batch``: forget that note (no later plan may take it for its own batch).
- AFTER ``Scheduler.run_batch``: pack a pending seal that the next plan would pack, and plan the first half whose
  pages the plan just made chose, now, beside the step just launched
  (:meth:`~mosaickv_sglang.sealer.Sealer.after_launch`: ``MOSAICKV_SEAL_ASYNC`` with the seal beside the step), while
  the scheduler would otherwise wait for the step before.
- BEFORE ``Scheduler.run_batch``, with ``MOSAICKV_STACK_SAMPLES`` set: the first batch starts sampling this
  scheduler thread's stacks (:mod:`mosaickv_sglang.stack_sampler`), in any server that loads the plugin.
- BEFORE ``Scheduler.run_batch``, with ``MOSAICKV_SYNC_AUDIT`` set: the first decode batch starts counting this
  process's synchronizing CUDA calls by stack (:mod:`mosaickv_sglang.sync_audit`), in any server that loads the
  plugin; AFTER ``Scheduler.on_idle``, the counts so far written.

The first four and the sixth are no-ops unless this process built a ``mosaic`` attention backend, the first with the
sidecar on, the third with seal graphs, the fourth with the overlap scheduler on, the sixth unless seals run in two
halves beside the step (``MOSAICKV_SEAL_ASYNC`` and ``MOSAICKV_SEAL_BESIDE_STEP=1``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from mosaickv_sglang.batch_inputs import clear_scheduled_batch, note_scheduled_batch
from mosaickv_sglang.gc_freeze import maybe_freeze
from mosaickv_sglang.runtime import current_sealer
from mosaickv_sglang.stack_sampler import maybe_start as maybe_start_stack_sampler
from mosaickv_sglang.sync_audit import maybe_start as maybe_start_sync_audit
from mosaickv_sglang.sync_audit import started as sync_audit_started

from . import seam

logger = logging.getLogger(__name__)


def sidecar_idle_tick(result: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``Scheduler.on_idle``: the sidecar's idle slice (a few ms), when this process has one."""
    sealer = current_sealer()
    bridge = None if sealer is None else sealer.sidecar
    if bridge is not None:
        bridge.on_idle()


def freeze_gc_after_warmup(result: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``Scheduler.on_idle``: freeze the heap once this mosaic scheduler has served decode batches."""
    maybe_freeze(current_sealer())


def release_seal_graph_cache(result: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``Scheduler.on_idle``: nothing in flight, so the seal graphs' captures give their warm-up's cached blocks
    back (:meth:`~mosaickv_sglang.seal_graphs.SealGraphs.release_cache`, a device-wide wait) when this process has
    seal graphs."""
    sealer = current_sealer()
    graphs = None if sealer is None else sealer.seal_graphs
    if graphs is not None:
        graphs.release_cache()


def note_batch_inputs(self: Any, batch: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE ``Scheduler.run_batch``: note a generation batch's request indices, new slots and the scheduler's
    current stream when this process has a mosaic backend with the overlap scheduler on (else forget any note)."""
    sealer = current_sealer()
    indices = getattr(batch, seam.BATCH_REQ_POOL_INDICES_CPU_ATTR, None)
    loc = getattr(batch, seam.BATCH_OUT_CACHE_LOC_ATTR, None)
    if sealer is None or not sealer.pool.mosaic_config.overlap_schedule or not isinstance(indices, torch.Tensor) \
            or not isinstance(loc, torch.Tensor) or indices.device.type != "cpu":  # fmt: skip
        clear_scheduled_batch()
        return
    stream = torch.cuda.current_stream(loc.device) if loc.is_cuda else None
    note_scheduled_batch(indices, loc, stream)


def forget_batch_inputs(result: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``Scheduler.run_batch``: forget the note of the batch just launched."""
    clear_scheduled_batch()


def seal_after_launch(result: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``Scheduler.run_batch``: the sealer's :meth:`~mosaickv_sglang.sealer.Sealer.after_launch` (a due pack, a
    chosen first half), when this process has a mosaic backend."""
    sealer = current_sealer()
    if sealer is not None:
        sealer.after_launch()


def _tp_rank_and_size(scheduler: Any) -> "tuple[int, int]":
    """The scheduler's tensor-parallel rank and size (0 and 1 when its parallel state does not say)."""
    ps = getattr(scheduler, seam.SCHEDULER_PARALLEL_STATE_ATTR, None)
    return int(getattr(ps, "tp_rank", 0) or 0), int(getattr(ps, "tp_size", 1) or 1)


def sample_stacks(self: Any, batch: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE ``Scheduler.run_batch``: with ``MOSAICKV_STACK_SAMPLES`` set, the first batch starts sampling this
    scheduler thread's stacks (any server that loads the plugin, stock ones included)."""
    maybe_start_stack_sampler(*_tp_rank_and_size(self))


def audit_syncs(self: Any, batch: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE ``Scheduler.run_batch``: with ``MOSAICKV_SYNC_AUDIT`` set, the first decode batch starts counting the
    synchronizing CUDA calls (after start-up and CUDA graph capture, whose waits are expected)."""
    mode = getattr(batch, "forward_mode", None)
    if mode is not None and mode.is_decode():
        maybe_start_sync_audit(*_tp_rank_and_size(self))


def write_sync_audit(result: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``Scheduler.on_idle``: the sync audit's counts so far on disk, when one was started."""
    audit = sync_audit_started()
    if audit is not None:
        audit.write()


def apply() -> None:
    """Register the scheduler hooks."""
    seam.register_hook(seam.SCHEDULER_ON_IDLE, sidecar_idle_tick, "AFTER")
    seam.register_hook(seam.SCHEDULER_ON_IDLE, freeze_gc_after_warmup, "AFTER")
    seam.register_hook(seam.SCHEDULER_ON_IDLE, release_seal_graph_cache, "AFTER")
    seam.register_hook(seam.SCHEDULER_RUN_BATCH, note_batch_inputs, "BEFORE")
    seam.register_hook(seam.SCHEDULER_RUN_BATCH, forget_batch_inputs, "AFTER")
    seam.register_hook(seam.SCHEDULER_RUN_BATCH, seal_after_launch, "AFTER")
    seam.register_hook(seam.SCHEDULER_RUN_BATCH, sample_stacks, "BEFORE")
    seam.register_hook(seam.SCHEDULER_RUN_BATCH, audit_syncs, "BEFORE")
    seam.register_hook(seam.SCHEDULER_ON_IDLE, write_sync_audit, "AFTER")
