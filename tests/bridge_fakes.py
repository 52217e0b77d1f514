# SPDX-License-Identifier: Apache-2.0
"""Fakes of what :class:`~mosaickv_sglang.sidecar.bridge.SidecarBridge` reads and writes besides its client: the copy
event, the pool's page state and re-packs, and the query window (shared by the bridge tests)."""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

H, S, D, LAYERS, PAGES = 2, 16, 64, 2, 32


class FakeEvent:
    """A host copy's event: done once the test says so, or once someone waited for it."""

    def __init__(self) -> None:
        self.done = False
        self.waited = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = True
        self.done = True


class FakePool:
    """Page epochs and sealed flags; records every re-pack ``(layer, pages, plan)`` (``on_reseal`` is called first,
    e.g. to charge a fake clock) and counts the releases."""

    head_num, head_dim, page_size, layer_num, num_logical_pages = H, D, S, LAYERS, PAGES

    def __init__(self, on_reseal: Optional[Callable[[], None]] = None) -> None:
        self.on_reseal = on_reseal
        self.page_epoch = np.zeros(PAGES, dtype=np.int64)
        self.sealed = np.zeros((LAYERS, PAGES), dtype=bool)
        self.free_listeners: list = []
        self.resealed: List[Tuple[int, List[int], object]] = []
        self.released = 0

    def seal(self, pages) -> None:
        self.page_epoch[pages] += 1
        self.sealed[:, pages] = True

    def free(self, pages) -> None:
        pages = np.asarray(pages, dtype=np.int64)
        self.page_epoch[pages] += 1
        self.sealed[:, pages] = False
        for listener in self.free_listeners:
            listener(pages)

    def sealed_in_layer(self, pages: np.ndarray, layer: int) -> np.ndarray:
        return self.sealed[layer, pages]

    def reseal_pages(self, pages, layer, keys, values, plan):
        if self.on_reseal is not None:
            self.on_reseal()
        self.resealed.append((layer, pages.tolist(), plan))
        return plan

    def release_resealed(self, handle) -> None:
        self.released += 1


class FakeWindow:
    """Seeded recent queries, ``[H, 4, 1, D]`` per layer."""

    def __init__(self) -> None:
        self.q = torch.randn(LAYERS, H, 4, 1, D, generator=torch.Generator().manual_seed(1))

    def queries(self, layer: int) -> torch.Tensor:
        return self.q[layer]
