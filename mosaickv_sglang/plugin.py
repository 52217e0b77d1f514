# SPDX-License-Identifier: Apache-2.0
"""SGLang plugin entry point (group ``sglang.srt.plugins``, name ``mosaic``).

SGLang calls :func:`register` in every process it starts (the launcher, each scheduler/TP worker, the
detokenizer) before any model, KV pool or attention backend exists. Processes that do not load plugins
(``python -m sglang.bench_one_batch``) can call it by hand; it is idempotent.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

_REGISTERED = False


ATTENTION_BACKEND_NAME = "mosaic"


def register() -> None:
    """Register MosaicKV's options, its ``mosaic`` attention backend and its hooks with SGLang.

    Safe to call more than once per process.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    from mosaickv_sglang import patches

    if ATTENTION_BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([ATTENTION_BACKEND_NAME])
    register_attention_backend(ATTENTION_BACKEND_NAME)(create_mosaic_attention_backend)
    patches.apply()
    _REGISTERED = True
    logger.debug("mosaickv-sglang plugin registered")


def create_mosaic_attention_backend(runner: Any) -> Any:
    """SGLang attention-registry factory for ``mosaic``; imports the backend (and its kernels) only when used."""
    from mosaickv_sglang.attention_backend import create_mosaic_backend

    return create_mosaic_backend(runner)
