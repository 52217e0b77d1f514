# SPDX-License-Identifier: Apache-2.0
"""Where a scheduler's host waits for the GPU: the stacks of its synchronizing CUDA calls (``MOSAICKV_SYNC_AUDIT``).

Under SGLang's overlap loop the host prepares a step while the GPU runs the one before. A call that waits for the
device (``.item()``, ``.tolist()`` or ``.cpu()`` of a GPU tensor, ``torch.bincount`` on CUDA, a stream's or the
device's synchronize) makes the next step wait for the whole one in flight: a decode period of about two steps. With
``MOSAICKV_SYNC_AUDIT=PATH`` set, the first decode batch a scheduler runs turns on torch's sync debug mode
(``torch.cuda.set_sync_debug_mode("warn")``) and each such call's Python stack is counted; the counts replace ``PATH``
(``PATH.tp<rank>`` with tensor parallelism) at most every :data:`WRITE_EVERY_S` seconds and when the scheduler goes
idle, in the collapsed format of the stack samples (:mod:`mosaickv_sglang.stack_sampler`; ``python -m
bench.stack_summary PATH`` ranks them). It works on any server that loads the plugin, stock ones included.

A diagnostic, not for serving: each wait then costs a stack walk, and torch's mode does not see waits on events.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from collections import Counter
from types import FrameType
from typing import Any, Callable, Dict, Optional

from mosaickv_sglang.stack_sampler import collapse, rank_path, write_collapsed

__all__ = ["ENV_VAR", "SYNC_WARNING", "SyncAudit", "WRITE_EVERY_S", "maybe_start", "started"]

logger = logging.getLogger(__name__)

ENV_VAR = "MOSAICKV_SYNC_AUDIT"
# how torch's warning begins (c10/cuda/CUDAFunctions.cpp, warn_or_error_on_sync)
SYNC_WARNING = "called a synchronizing CUDA operation"
WRITE_EVERY_S = 5.0
_WARNINGS_FILE = warnings.__file__

_started: Optional["SyncAudit"] = None


def _set_sync_debug_mode(mode: str) -> None:
    import torch

    torch.cuda.set_sync_debug_mode(mode)


class SyncAudit:
    """Counts of the distinct stacks that made synchronizing CUDA calls, written to a file now and then.

    Parameters
    ----------
    path : str
        File the counts replace at every write.
    write_every_s : float
        Seconds at least between two writes made by counted waits (> 0).
    clock : callable
        Monotonic seconds (tests pass their own).
    set_mode : callable, optional
        Sets torch's sync debug mode (``"warn"`` on :meth:`install`, ``"default"`` on :meth:`uninstall`; default
        ``torch.cuda.set_sync_debug_mode``); tests without a GPU pass their own.
    """

    def __init__(self, path: str, write_every_s: float = WRITE_EVERY_S, clock: Callable[[], float] = time.monotonic,
                 set_mode: Optional[Callable[[str], None]] = None) -> None:  # fmt: skip
        if not write_every_s > 0:
            raise ValueError(f"write_every_s: expected a number of seconds > 0, got {write_every_s}")
        self.path = path
        self.write_every_s = float(write_every_s)
        self._clock = clock
        self._set_mode = _set_sync_debug_mode if set_mode is None else set_mode
        self.counts: Counter = Counter()
        self.waits = 0
        self._written_waits = 0
        self._written_at = clock()
        self._previous_show: Optional[Callable[..., Any]] = None

    def note(self, frame: Optional[FrameType]) -> None:
        """Count the stack ending at ``frame`` (the frame that made the call); write if due."""
        self.counts[collapse(frame)] += 1
        self.waits += 1
        if self._clock() - self._written_at >= self.write_every_s:
            self.write()

    def write(self) -> None:
        """Replace the file with the counts so far (nothing new since the last write: nothing written)."""
        if self.waits != self._written_waits:
            self._write()

    def _write(self) -> None:
        write_collapsed(self.path, self.counts, "host waits")
        self._written_waits = self.waits
        self._written_at = self._clock()

    def _show(self, message: Any, category: Any, filename: str, lineno: int, file: Any = None,
              line: Optional[str] = None) -> None:  # fmt: skip
        if not str(message).startswith(SYNC_WARNING):
            assert self._previous_show is not None
            self._previous_show(message, category, filename, lineno, file, line)
            return
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename in (_WARNINGS_FILE, __file__):
            frame = frame.f_back
        self.note(frame)
        del frame

    def install(self) -> "SyncAudit":
        """Count from now on (the file written, empty): torch's warning on every synchronizing call, shown to
        :meth:`_show`."""
        if self._previous_show is None:
            self._write()
            warnings.filterwarnings("always", message=SYNC_WARNING)
            self._previous_show = warnings.showwarning
            warnings.showwarning = self._show
            self._set_mode("warn")
        return self

    def uninstall(self) -> None:
        """Stop counting (torch's mode and ``showwarning`` as before) and write the counts."""
        if self._previous_show is not None:
            self._set_mode("default")
            warnings.showwarning = self._previous_show
            self._previous_show = None
            self.write()


def started() -> Optional[SyncAudit]:
    """This process's audit, once :func:`maybe_start` started one."""
    return _started


def maybe_start(tp_rank: int = 0, tp_size: int = 1, env: Optional[Dict[str, str]] = None) -> Optional[SyncAudit]:
    """Start counting this process's synchronizing CUDA calls when ``MOSAICKV_SYNC_AUDIT`` is set (once per process:
    later calls return the audit already started, or ``None`` when the variable is unset)."""
    global _started
    if _started is not None:
        return _started
    path = rank_path(os.environ if env is None else env, ENV_VAR, tp_rank, tp_size)
    if path is None:
        return None
    _started = SyncAudit(path).install()
    logger.info("MosaicKV: counting the scheduler's synchronizing CUDA calls into %s (%s)", path, ENV_VAR)
    return _started
