# SPDX-License-Identifier: Apache-2.0
"""A seal in two halves: planned in one scheduler step, packed in the next (``MOSAICKV_SEAL_ASYNC=1``).

A seal reads one thing from the device: its payload sizes, which the host's arena allocator needs before the pack.
Read at once, they make the scheduler wait for the planner's device work, which shares the GPU with the step in
flight (a prefill can hold it for hundreds of milliseconds), while it could be launching the next step. Split, the
first half launches the planner and copies the sizes to pinned host memory without waiting
(:func:`sizes_to_host`); the second half, at the next plan, finds the copy done (or waits for what is left of it),
allocates and packs. In between the pages stay dense, so nothing reads a half-sealed page.

A page freed or sealed in between (its :attr:`~mosaickv_sglang.kv_pool.MosaicMHATokenToKVPool.page_epoch` moved)
voids the plan: :meth:`PendingSeal.live` says which pages still hold what was planned.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from mosaickv_sglang.kernels.format import SegmentPlan, plans_granules

__all__ = ["PendingSeal", "SEAL_ASYNC_ENV", "seal_async_enabled", "sizes_to_host"]

SEAL_ASYNC_ENV = "MOSAICKV_SEAL_ASYNC"


def seal_async_enabled() -> bool:
    """``MOSAICKV_SEAL_ASYNC=1``: policy seals are packed at the plan after the one that planned them."""
    return os.environ.get(SEAL_ASYNC_ENV, "0").strip() == "1"


@dataclass(eq=False)
class PendingSeal:
    """A planned seal waiting for its pack.

    Attributes
    ----------
    pages, sink_mask : numpy.ndarray
        The pages as chosen (int64, distinct) and their sink flags.
    epochs : numpy.ndarray
        The pages' epochs when planned.
    ratio : float
        The ratio planned for.
    dense_mask : numpy.ndarray
        The pages kept dense at that ratio (the sinks, or none in the last retry).
    reserve : numpy.ndarray
        The arena ledger's reservation for the pages (:meth:`~mosaickv_sglang.pool.ArenaLedger.reservation`).
    plans : list of SegmentPlan
        One per layer.
    sizes : torch.Tensor
        The plans' payload granules, ``[L, P * H_kv * 2]`` on the host (pinned on CUDA), filled by a copy that
        completes with ``ready``.
    ready : torch.cuda.Event or None
        Recorded after that copy on CUDA; ``None`` elsewhere (the copy is done).
    """

    pages: np.ndarray
    sink_mask: np.ndarray
    epochs: np.ndarray
    ratio: float
    dense_mask: np.ndarray
    reserve: np.ndarray
    plans: List[SegmentPlan]
    sizes: torch.Tensor
    ready: Optional["torch.cuda.Event"]

    def live(self, page_epoch: np.ndarray) -> np.ndarray:
        """shape ``[P]``, bool: the pages neither freed nor sealed since they were planned."""
        return page_epoch[self.pages] == self.epochs

    def host_sizes(self) -> np.ndarray:
        """The payload granules, waiting for their copy if it is still running."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.sizes.numpy()


def sizes_to_host(plans: List[SegmentPlan]) -> "tuple[torch.Tensor, Optional[torch.cuda.Event]]":
    """Start copying the plans' payload granules to the host without waiting: ``(host tensor, event)``, the event
    (CUDA only) recorded on the current stream after the copy."""
    sizes = plans_granules(plans).reshape(len(plans), -1)
    if sizes.device.type != "cuda":
        return sizes, None
    host = torch.empty(sizes.shape, dtype=sizes.dtype, pin_memory=True)
    host.copy_(sizes, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready
