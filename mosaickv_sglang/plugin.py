# SPDX-License-Identifier: Apache-2.0
"""SGLang plugin entry point (group ``sglang.srt.plugins``, name ``mosaic``).

SGLang calls :func:`register` in every process it starts (the launcher, each scheduler/TP worker, the
detokenizer) before any model, KV pool or attention backend exists. Processes that do not load plugins
(``python -m sglang.bench_one_batch``) can call it by hand; it is idempotent.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_REGISTERED = False


def register() -> None:
    """Register MosaicKV's options and hooks with SGLang. Safe to call more than once per process."""
    global _REGISTERED
    if _REGISTERED:
        return
    from mosaickv_sglang import patches

    patches.apply()
    _REGISTERED = True
    logger.debug("mosaickv-sglang plugin registered")
