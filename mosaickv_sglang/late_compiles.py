# SPDX-License-Identifier: Apache-2.0
"""A warning for each MosaicKV Triton kernel variant compiled after the warmup.

The warmup (:mod:`.warmup`) compiles every variant serving launches; a variant it misses compiles on first use, and
the scheduler waits for the compiler (hundreds of milliseconds) in the middle of a step. :class:`LateCompileWatch`
chains itself onto Triton's ``knobs.runtime.jit_post_compile_hook`` and logs each of our kernels compiled after it
is installed, with the variant's specialization, so the stall is named in the server log instead of showing up only
as a slow step.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, List, Optional

__all__ = ["LateCompileWatch", "KERNEL_MODULE_PREFIX"]

logger = logging.getLogger(__name__)

# The package of MosaicKV's Triton kernels (``mosaickv_sglang.kernels`` maps onto it).
KERNEL_MODULE_PREFIX = "mosaickv_sglang."


class LateCompileWatch:
    """Counts and logs the compiles of MosaicKV kernels from :meth:`install` on, calling any hook installed before.

    Attributes
    ----------
    compiles : list of str
        The kernel names compiled since :meth:`install`, in order.
    """

    def __init__(self) -> None:
        self.compiles: List[str] = []
        self._previous: Optional[Callable[..., Any]] = None
        self._installed = False

    def __call__(self, *, key: Any, repr: str, fn: Any, compile: Any, is_manual_warmup: bool,
                 already_compiled: bool) -> Any:  # fmt: skip
        """Triton's post-compile hook signature (``triton.runtime.jit.JITFunction._call_hook``)."""
        result = None
        if self._previous is not None:
            result = self._previous(key=key, repr=repr, fn=fn, compile=compile, is_manual_warmup=is_manual_warmup,
                                    already_compiled=already_compiled)  # fmt: skip
        if str(getattr(fn, "module", "")).startswith(KERNEL_MODULE_PREFIX) and not is_manual_warmup:
            self.compiles.append(str(fn.name))
            logger.warning("MosaicKV: kernel %s compiled after the warmup (%d so far): the step waited for the "
                           "compiler; a variant the warmup misses: %s", fn.name, len(self.compiles), repr)  # fmt: skip
        return result

    def install(self) -> "LateCompileWatch":
        """Become Triton's post-compile hook (once), keeping the one installed before to call first; when a watch
        already holds the hook (a second backend in the process), that watch, so each compile is logged once."""
        if self._installed:
            return self
        from triton import knobs

        current = knobs.runtime.jit_post_compile_hook
        if isinstance(current, LateCompileWatch):
            return current
        self._previous = current
        knobs.runtime.jit_post_compile_hook = self
        self._installed = True
        return self

    def uninstall(self) -> None:
        """Give the hook back to the one installed before, if this watch still holds it."""
        if not self._installed:
            return
        from triton import knobs

        if knobs.runtime.jit_post_compile_hook is self:
            knobs.runtime.jit_post_compile_hook = self._previous
        self._installed = False
