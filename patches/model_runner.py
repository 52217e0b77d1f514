# SPDX-License-Identifier: Apache-2.0
"""Hook on SGLang 0.5.17's model runner (``--kv-compressor mosaic``).

- BEFORE ``ModelRunner.initialize``, with ``MOSAICKV_FORWARD_PRIORITY=high`` (an experiment, off by default): the
  runner's forward stream, made just before at the default priority, is replaced by a stream of the device's highest
  priority, before the memory pool, the CUDA graphs and the scheduler take it. MosaicKV's side streams (the seals'
  graphs and packs, the sidecar's uploads) keep the default priority, so the GPU gives free SMs to the decode step's
  pending blocks before theirs. Blocks already running are not preempted.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch

from . import seam

logger = logging.getLogger(__name__)

ENV_VAR = "MOSAICKV_FORWARD_PRIORITY"
_CHOICES = ("default", "high")


def forward_priority() -> str:
    """``MOSAICKV_FORWARD_PRIORITY``: ``high`` or ``default`` (unset or empty: ``default``)."""
    raw = os.environ.get(ENV_VAR, "").strip().lower() or "default"
    if raw not in _CHOICES:
        raise ValueError(f"{ENV_VAR}: expected one of {', '.join(_CHOICES)}, got {os.environ.get(ENV_VAR)!r}")
    return raw


def prioritize_forward_stream(self: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE ``ModelRunner.initialize``: a mosaic runner's CUDA forward stream at the highest priority when
    ``MOSAICKV_FORWARD_PRIORITY=high``."""
    if forward_priority() != "high" or seam.config_of(getattr(self, "server_args", None)).compressor != "mosaic":
        return
    stream: Optional[Any] = getattr(self, seam.MODEL_RUNNER_FORWARD_STREAM_ATTR, None)
    if not isinstance(stream, torch.cuda.Stream):
        logger.warning("MosaicKV: %s=high ignored: the forward stream is not a CUDA stream (%s)", ENV_VAR,
                       type(stream).__name__)  # fmt: skip
        return
    highest = min(torch.cuda.Stream.priority_range())
    setattr(self, seam.MODEL_RUNNER_FORWARD_STREAM_ATTR, torch.cuda.Stream(device=stream.device, priority=highest))
    logger.info("MosaicKV: the forward stream runs at priority %d, the highest (%s=high); MosaicKV's side streams at "
                "the default", highest, ENV_VAR)  # fmt: skip


def apply() -> None:
    """Register the model runner hook."""
    seam.register_hook(seam.MODEL_RUNNER_INITIALIZE, prioritize_forward_stream, "BEFORE")
