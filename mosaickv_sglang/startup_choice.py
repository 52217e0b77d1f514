# SPDX-License-Identifier: Apache-2.0
"""The pattern shared by the startup choices between equivalent methods (:mod:`.chan_drop_select`,
:mod:`.estimate_terms_select`): an environment variable fixes the method (``auto``, the default, times them), else
the fastest timed method wins, else the current default stays; one log line says which and why."""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = ["fixed_method", "choose_fastest"]


def fixed_method(env_var: str, methods: Sequence[str]) -> Optional[str]:
    """The method ``env_var`` fixes (case and surrounding spaces ignored), or ``None`` for ``auto`` / unset."""
    value = os.environ.get(env_var, "auto").strip().lower()
    if value == "auto":
        return None
    if value not in methods:
        raise ValueError(f"{env_var}: expected auto or one of {', '.join(methods)}, got {value!r}")
    return value


def choose_fastest(
    what: str,
    env_var: str,
    methods: Sequence[str],
    current: str,
    device: torch.device,
    time_methods: Callable[[], Dict[str, float]],
    timings: Optional[Dict[str, float]] = None,
) -> str:
    """``env_var``'s method, or else the fastest of ``timings`` (default: ``time_methods()``, after which a CUDA
    ``device``'s cache is emptied: the server's memory budget was set before), or else ``current`` when nothing was
    timed. Logs ``MosaicKV: <what> method M (...)``."""
    fixed = fixed_method(env_var, methods)
    if fixed is not None:
        logger.info("MosaicKV: %s method %s (%s)", what, fixed, env_var)
        return fixed
    if timings is None:
        timings = time_methods()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    choice = min(timings, key=timings.__getitem__) if timings else current
    logger.info("MosaicKV: %s method %s (%s)", what, choice,
                ", ".join(f"{m} {1e3 * s:.2f} ms" for m, s in timings.items()) or "no timing")  # fmt: skip
    return choice
