# SPDX-License-Identifier: Apache-2.0
"""A cProfile of the plugin's host work in a running server, written to a file (``MOSAICKV_PROFILE=PATH``).

Metrics say how long the scheduler spends in MosaicKV's plan, sealing and sidecar calls; this names the Python and
torch calls inside them, on the machine and under the load where it happens. With ``MOSAICKV_PROFILE`` set, each kind
of call runs under its own ``cProfile.Profile`` of the scheduler thread (the attention backend's plans: ``decode`` and
``extend``, sealing and the sidecar's tick included), and the functions of most cumulative and of most own time are
written to ``PATH.<kind>`` (``PATH.tp<rank>.<kind>`` with tensor parallelism) every :data:`DUMP_EVERY` calls of that
kind, replacing the previous dump, with the callers of the :data:`TOP_CALLERS` functions of most own time (which of
the plugin's calls pays for a ``copy_`` or a ``torch.empty``), and the whole profile beside it in pstats' format
(``PATH.<kind>.prof``: ``python -m pstats PATH.<kind>.prof``). Unset (the default), a section is a no-op.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import logging
import os
import pstats
from typing import Dict, Iterator, Optional

__all__ = ["CallProfile", "ENV_VAR", "DUMP_EVERY", "TOP_CALLERS", "TOP_FUNCTIONS"]

logger = logging.getLogger(__name__)

ENV_VAR = "MOSAICKV_PROFILE"
DUMP_EVERY = 20
TOP_FUNCTIONS = 60
TOP_CALLERS = 15


class CallProfile:
    """Profilers of a scheduler's calls, one per kind (a section inside another is counted in the outer one only).

    Parameters
    ----------
    path : str or None
        Prefix of the files written (``<path>.<kind>``); ``None`` disables profiling.
    dump_every : int
        Calls of a kind between its dumps.
    """

    def __init__(self, path: Optional[str], dump_every: int = DUMP_EVERY) -> None:
        if dump_every < 1:
            raise ValueError(f"dump_every: expected an integer >= 1, got {dump_every}")
        self.path = path or None
        self.dump_every = int(dump_every)
        self.calls: Dict[str, int] = {}
        self._profilers: Dict[str, cProfile.Profile] = {}
        self._active = False

    @classmethod
    def from_env(cls, tp_rank: int = 0, tp_size: int = 1) -> "CallProfile":
        """From ``MOSAICKV_PROFILE`` (unset or empty: disabled); with several tensor-parallel ranks each writes to
        ``PATH.tp<rank>.<kind>``."""
        path = os.environ.get(ENV_VAR, "").strip() or None
        if path is not None and tp_size > 1:
            path = f"{path}.tp{tp_rank}"
        if path is not None:
            logger.info("MosaicKV: profiling the plugin's host calls into %s.<kind> (%s)", path, ENV_VAR)
        return cls(path)

    @property
    def enabled(self) -> bool:
        return self.path is not None

    @contextlib.contextmanager
    def section(self, kind: str) -> Iterator[None]:
        """Profile the body as a call of ``kind`` (a no-op when disabled or inside another section)."""
        if self.path is None or self._active:
            yield
            return
        profiler = self._profilers.get(kind)
        if profiler is None:
            profiler = self._profilers[kind] = cProfile.Profile()
        try:
            profiler.enable()
        except ValueError as err:  # another profiler holds the interpreter's hooks (Python 3.12+): stop profiling
            logger.warning("MosaicKV: %s profiling stopped: %s", ENV_VAR, err)
            self.path = None
            yield
            return
        self._active = True
        try:
            yield
        finally:
            profiler.disable()
            self._active = False
            n = self.calls[kind] = self.calls.get(kind, 0) + 1
            if n % self.dump_every == 0:
                self.dump(kind)

    def dump(self, kind: Optional[str] = None) -> None:
        """Write the statistics of ``kind`` (default: every kind) so far, by cumulative then by own time, to
        ``<path>.<kind>``, replacing the last dump; a write error is logged, never raised (the server goes on)."""
        if self.path is None:
            return
        for k in [kind] if kind is not None else list(self._profilers):
            profiler = self._profilers.get(k)
            if profiler is None:
                continue
            out = io.StringIO()
            out.write(f"MosaicKV host calls of kind {k}: {self.calls.get(k, 0)} profiled\n")
            stats = pstats.Stats(profiler, stream=out)
            stats.sort_stats("cumulative").print_stats(TOP_FUNCTIONS)
            stats.sort_stats("tottime").print_stats(TOP_FUNCTIONS)
            stats.print_callers(TOP_CALLERS)
            target = f"{self.path}.{k}"
            try:
                with open(f"{target}.tmp", "w") as f:
                    f.write(out.getvalue())
                os.replace(f"{target}.tmp", target)
                stats.dump_stats(f"{target}.prof.tmp")
                os.replace(f"{target}.prof.tmp", f"{target}.prof")
            except OSError as err:
                logger.warning("MosaicKV: could not write the host-call profile to %s: %s", target, err)
