# SPDX-License-Identifier: Apache-2.0
"""The server side of the sidecar: what the sealer hands it, and how its plans reach the pool.

One :class:`SidecarBridge` per scheduler (TP rank), owned by the :class:`~mosaickv_sglang.sealer.Sealer`:

* **Submission.** When the sealer seals a batch of pages with the fast planner, :meth:`SidecarBridge.submit_sealed`
  copies the dense K/V of as many of those pages as free sidecar slots allow (whole pages of one layer per job, the
  layers taken in turn so that every layer gets refined) into the shared slot buffers, with the layer's recent
  queries and the byte budget the fast plan had for those pages. Sink pages (kept dense) are not submitted. A batch
  that finds no free slot keeps its fast plans: the queue is bounded by the slots.
* **Application.** :meth:`SidecarBridge.tick` (before each forward, and on idle scheduler ticks) reads the finished
  jobs and re-packs each one's pages with the sidecar's plan (:meth:`MosaicMHATokenToKVPool.reseal_pages`): new
  payloads next to the old, descriptors swapped, then the old payloads freed. Freeing them at once is safe here
  because ticks run between steps on the scheduler thread, decode and prefill run eagerly with overlap scheduling
  off (``--kv-compressor mosaic`` implies both), and every later kernel that could reuse the freed granules is
  queued after the swap on the same stream.
* **Staleness.** A job's segment keys carry the page's epoch (:attr:`MosaicMHATokenToKVPool.page_epoch`, bumped
  when a page is sealed or freed). A plan is applied only if every page of the job still holds the contents it was
  made for and is still sealed in that layer; otherwise it is discarded.

The plans keep each page within the byte budget the fast plan had (the arena ledger's reservation is unchanged), so
applying them, early or late, alters no page-level decision: TP ranks whose sidecars finish at different times still
agree on every allocation.
"""

from __future__ import annotations

import atexit
import logging
import time
from typing import TYPE_CHECKING, Callable, List, Optional, Tuple

import numpy as np
import torch

from mosaickv_sglang.pool import ArenaFullError, seal_budget_bytes
from mosaickv_sglang.sidecar.client import JobOutcome, JobStatus, SidecarClient, SidecarConfig, SidecarCounters
from mosaickv_sglang.sidecar.protocol import REASON_SEALED, SegmentKey
from mosaickv_sglang.strategies.base import dense_segment_bytes

if TYPE_CHECKING:
    from mosaickv_sglang.kv_pool import MosaicMHATokenToKVPool
    from mosaickv_sglang.sealer import QueryWindow

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_SEGMENTS", "SidecarBridge"]

# Segments per job at most (rounded down to whole pages): small jobs keep each slot's copy and plan short.
DEFAULT_MAX_SEGMENTS = 32
# Client work per tick before a forward (ms): reading replies and copying plans out; applying is extra.
FORWARD_TICK_MS = 1.0

Gather = Callable[[int, np.ndarray], Tuple[torch.Tensor, torch.Tensor]]


class SidecarBridge:
    """Submits sealed pages to a :class:`SidecarClient` and applies its plans to the pool (see the module docstring).

    Parameters
    ----------
    pool : MosaicMHATokenToKVPool
    window : QueryWindow
        The sealer's recent queries per layer (the statistics the sidecar plans with).
    client : SidecarClient
        Not yet started; :meth:`start` starts it. Its ``is_current`` must be this bridge's :meth:`is_current`
        (:meth:`create` builds it so).

    Attributes
    ----------
    plans_applied : int
        Jobs whose plans were applied (their pages re-packed).
    segments_applied : int
        Segments re-packed with a sidecar plan.
    plans_discarded : int
        Finished plans not applied: some page freed, reused or no longer sealed, or no arena room for the new
        payloads next to the old.
    segments_submitted, segments_skipped : int
        Sealed segments (non-sink, all layers) handed to the sidecar, and those that kept their fast plan because
        every slot was busy.
    """

    def __init__(self, pool: "MosaicMHATokenToKVPool", window: "QueryWindow", client: SidecarClient) -> None:
        self.pool = pool
        self.window = window
        self.client = client
        h = int(pool.head_num)
        self.pages_per_job = max(1, client.config.max_segments // h)
        self.plans_applied = 0
        self.segments_applied = 0
        self.plans_discarded = 0
        self.segments_submitted = 0
        self.segments_skipped = 0
        self._next_layer = 0
        self._closed = False

    @classmethod
    def create(cls, pool: "MosaicMHATokenToKVPool", window: "QueryWindow", **overrides: object) -> "SidecarBridge":
        """A bridge with a client sized for ``pool`` (``overrides``: :class:`SidecarConfig` fields)."""
        h = int(pool.head_num)
        kw = dict(window=window.window, kv_dtype=pool.store.dtype,
                  max_segments=max(h, DEFAULT_MAX_SEGMENTS // h * h))  # fmt: skip
        kw.update(overrides)
        config = SidecarConfig.from_mosaic(pool.mosaic_config, head_dim=int(pool.head_dim),
                                           group_size=window.group_size, **kw)  # fmt: skip
        bridge = cls.__new__(cls)
        client = SidecarClient(config, is_current=bridge.is_current)
        bridge.__init__(pool, window, client)
        return bridge

    def start(self) -> "SidecarBridge":
        """Start the worker process (it gets ready in the background); closed at interpreter exit."""
        self.client.start()
        atexit.register(self.close)
        return self

    def close(self) -> None:
        """Stop the worker; jobs in flight are dropped (their fast plans stay)."""
        if not self._closed:
            self._closed = True
            self.client.close()

    def counters(self) -> SidecarCounters:
        return self.client.counters

    # --- staleness ----------------------------------------------------------------------------------------------------
    def is_current(self, key: SegmentKey) -> bool:
        """Whether the key's page still holds what the job was made from and is sealed in the key's layer."""
        page = int(key.page)
        return bool(self.pool.page_epoch[page] == key.generation and self.pool.sealed_in_layer(
            np.array([page]), key.layer)[0])  # fmt: skip

    # --- submission ---------------------------------------------------------------------------------------------------
    def submit_sealed(self, pages: np.ndarray, dense_mask: np.ndarray, ratio: float, gather: Gather) -> int:
        """Queue the pages of a batch about to be sealed, as far as free slots allow; returns the segments queued.

        Call it just before :meth:`MosaicMHATokenToKVPool.seal_pages` of the same pages: the keys name the epoch
        the seal gives them.

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
        todo = np.asarray(pages, dtype=np.int64)[~np.asarray(dense_mask, dtype=bool)]
        pool, h = self.pool, int(self.pool.head_num)
        total = int(todo.size) * h * pool.layer_num
        submitted = self._submit(todo, ratio, gather)
        self.segments_submitted += submitted
        self.segments_skipped += total - submitted
        return submitted

    def _submit(self, todo: np.ndarray, ratio: float, gather: Gather) -> int:
        """Jobs of whole pages of one layer, layers in turn from where the last batch stopped; returns the segments
        submitted."""
        if todo.size == 0 or self.client.free_slots == 0:
            return 0
        pool, h = self.pool, int(self.pool.head_num)
        epoch = self.pool.page_epoch[todo] + 1
        seg = dense_segment_bytes(pool.page_size, int(pool.head_dim))
        chunks = [np.arange(i, min(i + self.pages_per_job, todo.size)) for i in range(0, todo.size, self.pages_per_job)]
        done, layers = 0, pool.layer_num
        for step in range(layers):
            layer = (self._next_layer + step) % layers
            q = self.window.queries(layer)
            if q is None:
                continue
            for idx in chunks:
                if self.client.free_slots == 0:
                    self._next_layer = layer
                    return done
                sel = todo[idx]
                heads = torch.arange(h, device=q.device).repeat(sel.size)
                keys, values = gather(layer, sel)
                segs = [SegmentKey(layer, hd, int(p), int(e)) for p, e in zip(sel, epoch[idx]) for hd in range(h)]
                job = self.client.try_submit(
                    segs, keys, values, q[heads], budget_bytes=seal_budget_bytes(len(segs), 0, seg, ratio),
                    group_ids=heads.cpu(), reason=REASON_SEALED,
                )  # fmt: skip
                if job is None:
                    self._next_layer = layer
                    return done
                done += len(segs)
        self._next_layer = (self._next_layer + 1) % layers
        return done

    # --- application --------------------------------------------------------------------------------------------------
    def tick(self, budget_ms: Optional[float] = FORWARD_TICK_MS) -> int:
        """Read finished jobs (about ``budget_ms`` of client work; restarts a dead worker) and apply their plans;
        returns the jobs applied."""
        if self._closed:
            return 0
        applied = 0
        for outcome in self.client.tick(budget_ms):
            applied += self._apply(outcome)
        return applied

    def _apply(self, outcome: JobOutcome) -> int:
        if outcome.status is JobStatus.STALE:
            self.plans_discarded += 1
            return 0
        if outcome.status is not JobStatus.OK:
            return 0  # FAILED / LOST: counted by the client; the fast plan stays
        keys = outcome.segments
        h = int(self.pool.head_num)
        layer = keys[0].layer
        pages = np.array([k.page for k in keys[::h]], dtype=np.int64)
        # the valid mask was taken when the reply was read; the pages may have changed since (same tick: they
        # cannot, but a caller may hold outcomes): check again
        if not all(outcome.valid) or not all(self.is_current(k) for k in keys[::h]):
            self.plans_discarded += 1
            return 0
        assert outcome.result is not None and outcome.keys is not None and outcome.values is not None
        try:
            handle = self.pool.reseal_pages(pages, layer, outcome.keys, outcome.values, outcome.result.plan)
        except ArenaFullError as err:
            logger.debug("MosaicKV sidecar: no arena room to apply job %d (%s); its fast plan stays",
                         outcome.job_id, err)  # fmt: skip
            self.plans_discarded += 1
            return 0
        self.pool.release_resealed(handle)
        self.plans_applied += 1
        self.segments_applied += len(keys)
        return 1

    def drain(self, timeout: float) -> int:
        """Block up to ``timeout`` seconds until no job is in flight, applying each (tests and shutdown only)."""
        end, applied = time.monotonic() + timeout, 0
        while time.monotonic() < end:
            applied += self.tick(None)
            if self.client.counters.queue_depth == 0:
                break
            time.sleep(0.01)
        return applied

    def status(self) -> str:
        """A short status for the sealer's log line."""
        c = self.counters()
        return (f"sidecar: {c.queue_depth} jobs queued, {self.plans_applied} plans applied ({self.segments_applied} "
                f"segments), {self.plans_discarded} discarded, {self.segments_skipped} segments kept fast plans "
                f"(queue full), {c.restarts} restarts")

