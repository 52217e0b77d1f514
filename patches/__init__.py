# SPDX-License-Identifier: Apache-2.0
"""Hooks into SGLang's own code, for what no SGLang registry covers (packaged as ``mosaickv_sglang.patches``).

One module per SGLang target; ``seam`` names every target and private attribute. Nothing is patched at
import time: :func:`apply` registers the hooks and is called by ``mosaickv_sglang.plugin.register``.
"""

from . import kv_cache, metrics, requests, scheduler, seam, server_args


def apply() -> None:
    """Register every MosaicKV hook with SGLang's HookRegistry and apply them if SGLang will not."""
    server_args.apply()
    kv_cache.apply()
    scheduler.apply()
    requests.apply()
    metrics.apply()
    seam.apply_hooks_outside_plugin_loading()
