# SPDX-License-Identifier: Apache-2.0
"""Where a scheduler's host time goes, all of it: sampled Python stacks of its thread (``MOSAICKV_STACK_SAMPLES``).

The metrics time MosaicKV's own calls and ``MOSAICKV_PROFILE`` names the functions inside them; neither sees the rest
of the scheduler loop (SGLang's scheduling, result processing, request intake), which is where a host-bound decode
step's remaining time goes, in a stock server as much as in ours. With ``MOSAICKV_STACK_SAMPLES=PATH`` set, the first
batch a scheduler runs starts a daemon thread that reads the scheduler thread's stack every
``MOSAICKV_STACK_SAMPLE_MS`` (default 2 ms) and counts each distinct stack; every :data:`WRITE_EVERY_S` seconds the
counts so far replace ``PATH`` (``PATH.tp<rank>`` with tensor parallelism) in the collapsed format that flame-graph
tools read (``frame;frame;...;leaf count``, root first). ``python -m bench.stack_summary PATH`` ranks the functions.

It works on any server that loads the plugin, stock ones included (``--kv-compressor`` not needed). Time inside a C
call is counted on the Python line that made it; a sample waits for the GIL, so stacks where the thread holds the
GIL for long stretches are seen late but still counted once per interval.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
from collections import Counter
from types import CodeType, FrameType
from typing import Callable, Dict, Optional

__all__ = ["ENV_VAR", "INTERVAL_ENV_VAR", "StackSampler", "collapse", "collapsed_text", "maybe_start", "rank_path",
           "WRITE_EVERY_S", "write_collapsed"]

logger = logging.getLogger(__name__)

ENV_VAR = "MOSAICKV_STACK_SAMPLES"
INTERVAL_ENV_VAR = "MOSAICKV_STACK_SAMPLE_MS"
DEFAULT_INTERVAL_MS = 2.0
WRITE_EVERY_S = 5.0
MAX_DEPTH = 96

_started: Optional["StackSampler"] = None


@functools.lru_cache(maxsize=8192)  # one label per code object: a sample then costs a walk of the frames
def _label(code: CodeType) -> str:
    parts = code.co_filename.replace("\\", "/").split("/")
    where = "/".join(parts[-2:])
    return f"{code.co_name} ({where}:{code.co_firstlineno})"


def collapse(frame: Optional[FrameType], max_depth: int = MAX_DEPTH) -> str:
    """The stack ending at ``frame`` as ``root;...;leaf`` (each frame ``function (dir/file.py:first line)``, the leaf
    with `` @<line>``, the line it was running: a C call that waits shows as the line that made it), the
    ``max_depth`` innermost frames at most."""
    labels = []
    leaf = frame
    while frame is not None and len(labels) < max_depth:
        labels.append(_label(frame.f_code))
        frame = frame.f_back
    if labels:
        labels[0] = f"{labels[0]} @{leaf.f_lineno}"
    return ";".join(reversed(labels))


def collapsed_text(counts: Dict[str, int]) -> str:
    """``{stack: count}`` as collapsed-stack lines (``stack count``), the most frequent first (then by stack)."""
    return "".join(f"{stack} {n}\n" for stack, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def write_collapsed(path: str, counts: Dict[str, int], what: str) -> None:
    """Replace ``path`` with :func:`collapsed_text` of ``counts`` (through a temporary file beside it); a write error
    is logged with ``what`` the counts are, never raised (the server goes on)."""
    try:
        with open(f"{path}.tmp", "w") as f:
            f.write(collapsed_text(counts))
        os.replace(f"{path}.tmp", path)
    except OSError as err:
        logger.warning("MosaicKV: could not write the %s to %s: %s", what, path, err)


class StackSampler:
    """Counts of the distinct stacks of one thread, sampled at an interval, written to a file now and then.

    Parameters
    ----------
    path : str
        File the counts replace at every write.
    thread_id : int
        ``threading.get_ident()`` of the thread to sample.
    interval_s : float
        Seconds between samples (> 0).
    write_every_s : float
        Seconds between writes while sampling (> 0).
    clock : callable
        Monotonic seconds (tests pass their own).
    """

    def __init__(self, path: str, thread_id: int, interval_s: float = DEFAULT_INTERVAL_MS / 1000.0,
                 write_every_s: float = WRITE_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s: expected a number of seconds > 0, got {interval_s}")
        if not write_every_s > 0:
            raise ValueError(f"write_every_s: expected a number of seconds > 0, got {write_every_s}")
        self.path = path
        self.thread_id = int(thread_id)
        self.interval_s = float(interval_s)
        self.write_every_s = float(write_every_s)
        self._clock = clock
        self.counts: Counter = Counter()
        self.samples = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._written_at = clock()

    def sample_once(self) -> bool:
        """Count the sampled thread's current stack; ``False`` when the thread no longer exists."""
        frame = sys._current_frames().get(self.thread_id)
        if frame is None:
            return False
        stack = collapse(frame)
        del frame
        with self._lock:
            self.counts[stack] += 1
            self.samples += 1
        return True

    def write(self) -> None:
        """Replace the file with the counts so far, most frequent stack first (:func:`write_collapsed`)."""
        with self._lock:
            counts = dict(self.counts)
        write_collapsed(self.path, counts, "stack samples")
        self._written_at = self._clock()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            if not self.sample_once():
                break
            if self._clock() - self._written_at >= self.write_every_s:
                self.write()
        self.write()

    def start(self) -> "StackSampler":
        """Sample on a daemon thread until :meth:`stop` or the sampled thread ends."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mosaickv-stack-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop sampling and write the counts (waits up to ``timeout`` seconds for the thread)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


def _interval_s(env: Dict[str, str]) -> float:
    raw = env.get(INTERVAL_ENV_VAR, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_MS / 1000.0
    try:
        ms = float(raw)
    except ValueError:
        ms = float("nan")
    if not ms > 0:
        raise ValueError(f"{INTERVAL_ENV_VAR}: expected a number of milliseconds > 0, got {raw!r}")
    return ms / 1000.0


def rank_path(env: Dict[str, str], var: str, tp_rank: int, tp_size: int) -> Optional[str]:
    """The path ``env[var]`` names for this rank (``PATH.tp<rank>`` with tensor parallelism), ``None`` when unset."""
    path = env.get(var, "").strip()
    if not path:
        return None
    return f"{path}.tp{tp_rank}" if tp_size > 1 else path


def maybe_start(tp_rank: int = 0, tp_size: int = 1, env: Optional[Dict[str, str]] = None) -> Optional[StackSampler]:
    """Start sampling the calling thread when ``MOSAICKV_STACK_SAMPLES`` is set (once per process: later calls return
    the sampler already started, or ``None`` when the variable is unset)."""
    global _started
    if _started is not None:
        return _started
    env = os.environ if env is None else env
    path = rank_path(env, ENV_VAR, tp_rank, tp_size)
    if path is None:
        return None
    _started = StackSampler(path, threading.get_ident(), _interval_s(env)).start()
    logger.info("MosaicKV: sampling the scheduler's stacks every %.1f ms into %s (%s)", _started.interval_s * 1e3,
                path, ENV_VAR)  # fmt: skip
    return _started
