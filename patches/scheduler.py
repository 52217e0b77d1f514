# SPDX-License-Identifier: Apache-2.0
"""Hooks on SGLang 0.5.17's scheduler loop (``--kv-compressor mosaic``).

- AFTER ``Scheduler.on_idle``: a few milliseconds of sidecar work on idle scheduler ticks
  (:meth:`~mosaickv_sglang.sidecar.bridge.SidecarBridge.on_idle`: apply finished plans, re-plan a slice of the
  prefix-shared segments). Busy steps tick the sidecar from the sealer instead, before each forward.

A no-op unless this process built a ``mosaic`` attention backend with the sidecar on.
"""

from __future__ import annotations

import logging
from typing import Any

from mosaickv_sglang.runtime import current_sealer

from . import seam

logger = logging.getLogger(__name__)


def sidecar_idle_tick(result: Any, self: Any, *args: Any, **kwargs: Any) -> None:
    """AFTER ``Scheduler.on_idle``: the sidecar's idle slice (a few ms), when this process has one."""
    sealer = current_sealer()
    bridge = None if sealer is None else sealer.sidecar
    if bridge is not None:
        bridge.on_idle()


def apply() -> None:
    """Register the scheduler hooks."""
    seam.register_hook(seam.SCHEDULER_ON_IDLE, sidecar_idle_tick, "AFTER")
