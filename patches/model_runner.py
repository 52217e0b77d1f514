# SPDX-License-Identifier: Apache-2.0
"""Hook on SGLang 0.5.17's ModelRunner (``--kv-compressor mosaic``).

- BEFORE ``ModelRunner.initialize``: the forward stream, which ``ModelRunner.__init__`` creates just before and nothing
  has read yet, is replaced by one at the device's highest priority (:mod:`mosaickv_sglang.stream_priority`), so that
  every step outranks the seals beside it. A no-op without ``--kv-compressor mosaic``, off CUDA, or with
  ``MOSAICKV_STEP_PRIORITY=0``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from mosaickv_sglang.stream_priority import STEP_PRIORITY_ENV, step_priority_enabled, step_stream

from . import seam

logger = logging.getLogger(__name__)


def prioritize_forward_stream(self: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE ``ModelRunner.initialize``: a mosaic server's forward stream at the device's highest priority."""
    stream = getattr(self, seam.MODEL_RUNNER_FORWARD_STREAM_ATTR, None)
    server_args = getattr(self, seam.MODEL_RUNNER_SERVER_ARGS_ATTR, None)
    if not isinstance(stream, torch.cuda.Stream) or not seam.config_of(server_args).enabled \
            or not step_priority_enabled():  # fmt: skip
        return
    fast = step_stream(stream.device)
    setattr(self, seam.MODEL_RUNNER_FORWARD_STREAM_ATTR, fast)
    logger.info("MosaicKV: the forward stream runs at priority %d, above the seals' side streams (%s=0 leaves it at "
                "the default)", fast.priority, STEP_PRIORITY_ENV)


def apply() -> None:
    """Register the ModelRunner hook."""
    seam.register_hook(seam.MODEL_RUNNER_INITIALIZE, prioritize_forward_stream, "BEFORE")
