# SPDX-License-Identifier: Apache-2.0
"""Fakes of what :class:`~mosaickv_sglang.sidecar.bridge.SidecarBridge` reads and writes besides its client: the copy
event, the pool's page state and re-packs, and the query window (shared by the bridge tests)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, List, Optional, Tuple

import torch

from bench.sidecar_cost import StandInPool

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


class FakePool(StandInPool):
    """:class:`bench.sidecar_cost.StandInPool` (page epochs and sealed flags) of this module's shapes that records
    every re-pack ``(layer, pages, plan)`` (``on_reseal`` is called first, e.g. to charge a fake clock) and counts the
    releases."""

    def __init__(self, on_reseal: Optional[Callable[[], None]] = None) -> None:
        super().__init__(SimpleNamespace(kv_heads=H, head_dim=D, page_size=S, layers=LAYERS), PAGES)
        self.on_reseal = on_reseal
        self.resealed: List[Tuple[int, List[int], object]] = []
        self.released = 0
        self.staged = 0  # re-seals staged (by the I/O thread)

    def reseal_pages(self, pages, layer, keys, values, plan):
        if self.on_reseal is not None:
            self.on_reseal()
        self.resealed.append((layer, pages.tolist(), plan))
        return plan

    def stage_reseal(self, pages, layer, keys, values, plan, stream=None):
        self.staged += 1
        return (pages, layer, keys, values, plan)

    def reseal_staged(self, staged):
        return self.reseal_pages(*staged)

    def release_resealed(self, handle) -> None:
        self.released += 1


class FakeWindow:
    """Seeded recent queries, ``[H, 4, 1, D]`` per layer."""

    def __init__(self) -> None:
        self.q = torch.randn(LAYERS, H, 4, 1, D, generator=torch.Generator().manual_seed(1))

    def queries(self, layer: int) -> torch.Tensor:
        return self.q[layer]
