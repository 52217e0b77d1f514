# SPDX-License-Identifier: Apache-2.0
"""Freeze the scheduler's garbage-collector heap once the server has served its first batches.

A scheduler process holds many long-lived Python objects (the model, SGLang's state, the CUDA graphs'
bookkeeping). CPython's full (generation 2) collections scan all of them: on the 8B shape the longest took 378-515 ms
of a scheduler's time (`bench/RESULTS.md`, "twenty-sixth run"): before the first load on every server, and in the
second load on each server whose sidecar bridge makes many short-lived objects (30-60 times the collections of the
server without it), in the load's prefill phase, where it delays first tokens.
``gc.freeze()`` moves every object alive at that moment to a permanent generation that collections skip; SGLang
offers the same as its ``/freeze_gc`` endpoint, to be called after a few warm-up requests. With
``--kv-compressor mosaic`` the scheduler does it by itself at its first idle tick after a decode batch (SGLang's own
warm-up request is one), once. ``MOSAICKV_GC_FREEZE=0`` leaves the heap as SGLang has it.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

from mosaickv_sglang.config import flag_env

logger = logging.getLogger(__name__)

__all__ = ["ENV_VAR", "gc_freeze_enabled", "maybe_freeze"]

ENV_VAR = "MOSAICKV_GC_FREEZE"

_frozen = False


def gc_freeze_enabled() -> bool:
    """``MOSAICKV_GC_FREEZE``: ``1`` (the default) or ``0``; any other value is refused by name."""
    return flag_env(ENV_VAR, default=True)


def maybe_freeze(sealer: Any) -> bool:
    """At an idle tick of a scheduler with a mosaic ``sealer``: freeze the heap if this process has not yet, the sealer
    has planned a decode batch and the setting allows it. Returns whether it froze now."""
    global _frozen
    if _frozen or sealer is None or getattr(sealer, "decode_plans", 0) <= 0 or not gc_freeze_enabled():
        return False
    before = gc.get_count()
    gc.freeze()
    _frozen = True
    logger.info("MosaicKV: froze the scheduler's heap after its first decode batches: %d objects that garbage "
                "collections no longer scan (generation counts before: %s; %s=0 keeps SGLang's default)",
                gc.get_freeze_count(), before, ENV_VAR)  # fmt: skip
    return True


def _reset_for_tests() -> None:
    """Forget that this process froze its heap (tests; :func:`gc.unfreeze` is the caller's)."""
    global _frozen
    _frozen = False
