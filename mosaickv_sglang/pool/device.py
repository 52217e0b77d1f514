# SPDX-License-Identifier: Apache-2.0
"""Host-to-device copies that do not make the host wait."""

from __future__ import annotations

from typing import Union

import torch

__all__ = ["to_device"]


def to_device(x: torch.Tensor, device: Union[torch.device, str]) -> torch.Tensor:
    """``x`` on ``device`` without the host waiting for it: a host tensor bound for CUDA is staged in pinned memory and
    copied with ``non_blocking=True`` (a plain ``.to`` from pageable memory waits until every queued kernel is done).
    The copy is ordered on the current stream like any kernel, so later kernels read it whole."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
