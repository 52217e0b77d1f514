# SPDX-License-Identifier: Apache-2.0
"""The step's streams above the seals' on the GPU (``MOSAICKV_STEP_PRIORITY``, on unless ``0``).

A seal runs its planner and its pack on a side stream beside the decode steps (``MOSAICKV_SEAL_BESIDE_STEP``), tens of
milliseconds of GPU work each, and at equal stream priority the GPU hands its SMs to whichever kernel's blocks are
queued first: a step that overlaps a seal waits for the seal's blocks. With this on, SGLang's forward stream and the
side stream that gathers a plan's request rows are created at the device's highest stream priority, and the seals'
streams stay at the default, the lowest: the block scheduler then starts a step's blocks before any queued seal block
(running blocks are not preempted). CUDA graphs replayed on the forward stream take its priority.
"""

from __future__ import annotations

from typing import Union

import torch

from mosaickv_sglang.config import flag_env

__all__ = ["STEP_PRIORITY_ENV", "step_priority_enabled", "step_stream"]

STEP_PRIORITY_ENV = "MOSAICKV_STEP_PRIORITY"


def step_priority_enabled() -> bool:
    """``MOSAICKV_STEP_PRIORITY``: ``1`` (the default) or ``0``; whether the step's streams outrank the seals'."""
    return flag_env(STEP_PRIORITY_ENV, default=True)


def step_stream(device: Union[torch.device, int]) -> "torch.cuda.Stream":
    """A new CUDA stream on ``device``: at the highest priority the device has when :func:`step_priority_enabled`,
    else at the default (the lowest)."""
    if not step_priority_enabled():
        return torch.cuda.Stream(device=device)
    _, greatest = torch.cuda.Stream.priority_range()
    return torch.cuda.Stream(device=device, priority=greatest)
