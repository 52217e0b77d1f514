# SPDX-License-Identifier: Apache-2.0
"""Target of the spawn test (tests/test_plugin.py): what SGLang's scheduler process does first.

It lives in its own module, importable by name through PYTHONPATH, because a spawned child imports its
target by module name and pytest's test modules are not importable that way.
"""

from __future__ import annotations

import os
import pkgutil
from typing import Any


def scheduler_like_child(server_args: Any, queue: Any) -> None:
    """Load plugins as ``run_scheduler_process`` does, then report the config the child sees."""
    from sglang.srt.plugins import load_plugins

    load_plugins()
    from mosaickv_sglang.patches import seam

    hooked = all(hasattr(pkgutil.resolve_name(t), "__wrapped__") for t in seam.HOOK_TARGETS)
    queue.put((seam.config_of(server_args).to_options(), hooked, os.getpid()))
