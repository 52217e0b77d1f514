# SPDX-License-Identifier: Apache-2.0
"""What the slow decode steps share, from a server's step trace (``MOSAICKV_STEP_TRACE``).

``python -m bench.step_trace TRACE.csv[.gz]... [--window 3] [--since T] [--top 15]``: the decode step periods of each
trace (the step timer's rule, :class:`mosaickv_sglang.step_timer.DecodeStepTimer`: periods behind a prefill under the
overlap loop kept apart), their p50 / p90 / p99, and each period set beside what happened in the ``--window`` scheduler
iterations that end with it: MosaicKV GPU work launched (a seal call, a seal or pack beside the step, after a launch),
sidecar plans applied, a garbage collection, a change of batch size. For each of those, the periods with it and
without it: count, p50, p99 and how many are slow (over 1.1x the p50 of all, issue #5's bound). The periods with
none of them ("quiet") give the tail that the load's own steps have; the slowest periods are listed with their
batch, context and the work beside them. A trace from a GPU adds the forward stream's periods (``gpu_ms``) of the same
rows: a host period far above its GPU period is a host delay that the GPU did not wait for (the next host period is
then short), one with its GPU period as long is time on the device.

Under SGLang's overlap loop the period between two step launches holds the GPU time of the step launched two
iterations before, and work put on a side stream runs beside the steps after its launch: the default window of 3
iterations covers both.

A trace with GPU periods adds what each kind of seal work costs the step it runs beside: over windows of one iteration
(a row's GPU period holds the work its own iteration launched), the GPU period's excess over the median of the periods
of the same batch size with no MosaicKV GPU work, for the periods with nothing launched, with a planner's first or later
layer slice, with a pack (by its pages), with a pack that planned layer slices itself and with a pack that waited for
its planner; and how many of them are over 1.1x that median. Then the same for the planner's and the pack's layer slices
by the pages of the seal each belongs to.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from bench.textio import read_text
from mosaickv_sglang.step_timer import DecodeStepTimer
from mosaickv_sglang.step_trace import SEALER_COUNTS

SLOW_OVER_P50 = 1.1
# what is looked for in a period's window, as (name, the trace's counts whose growth means it)
GPU_WORK = ("seal_calls", "side_seals", "async_seals", "packs_after_launch", "starts_after_launch",
            "slices_after_launch", "pack_slices_after_launch", "slices_caught_up")  # fmt: skip
CAUSES = (("MosaicKV GPU work launched", GPU_WORK), ("sidecar plans applied", ("plans_applied",)),
          ("garbage collection", ("gc_collections",)))  # fmt: skip
BATCH_CHANGE = "batch size changed"
# what one iteration launched, for the seal work's table, in the order the table lists them
NOTHING = "no MosaicKV GPU work"
FIRST_SLICE, LATER_SLICE = "a planner's first layer slice", "a later layer slice"
PACK_16, PACK_32, PACK_MORE = "a pack of 16 pages or fewer", "a pack of 17-32 pages", "a pack of more than 32 pages"
PACK_SLICE = "a pack's layer slice (MOSAICKV_PACK_LAYER_SLICES)"
PACK_CAUGHT_UP = "a pack that planned layer slices itself"
PACK_WAITED, OTHER = "a pack that waited for its planner", "other seal work"
LAUNCHED = (NOTHING, FIRST_SLICE, LATER_SLICE, PACK_16, PACK_32, PACK_MORE, PACK_SLICE, PACK_CAUGHT_UP, PACK_WAITED,
            OTHER)  # fmt: skip
MIN_BASELINE_PERIODS = 20  # periods with nothing launched a batch size needs for its median to be the baseline
PLANNER_SLICE, PACK_SLICE_OF_SEAL = "planner slice", "pack slice"
SEAL_SIZES = ((16, "16 or fewer"), (32, "17-32"), (64, "33-64"), (None, "more than 64"))  # the seal graphs' buckets


@dataclass
class Period:
    """A decode step period closed at row ``row`` of its trace, and what its window held."""

    row: int
    seconds: float
    batch_size: int
    context_tokens: int
    grew: Dict[str, int]  # counts that grew over the window, by how much
    batch_changed: bool
    gpu_seconds: float = float("nan")  # the row's forward stream period (gpu_ms), NaN when the trace has none


def read_trace(path: str) -> Dict[str, np.ndarray]:
    """The trace's columns as arrays (empty counts, a stock server's, read as 0; an empty ``gpu_ms`` as NaN); a path
    ending in ``.gz`` is read through gzip, as the archived traces in ``bench/results`` are kept."""
    rows = list(csv.DictReader(io.StringIO(read_text(path), newline="")))
    if not rows:
        raise ValueError(f"{path}: expected a step trace with rows, got none")
    columns: Dict[str, np.ndarray] = {}
    for name in rows[0]:
        kind, missing = (float, np.nan) if name in ("t", "gpu_ms") else (np.int64, 0)
        columns[name] = np.array([kind(r[name]) if r[name] not in ("", None) else missing for r in rows])
    return columns


def decode_periods(trace: Dict[str, np.ndarray], window: int = 3, since: float = 0.0) -> List[Period]:
    """The decode step periods of ``trace`` (rows at or after clock ``since``) with their windows' growth."""
    if window < 1:
        raise ValueError(f"window: expected >= 1 iterations, got {window}")
    t = trace["t"]
    clock = iter(t.tolist())
    timer = DecodeStepTimer(clock=lambda: next(clock))
    counts = {name: trace[name] for name in SEALER_COUNTS + ("plans_applied", "gc_collections") if name in trace}
    sizes = trace["batch_size"]
    gpu_ms = trace.get("gpu_ms", np.full(len(t), np.nan))
    out: List[Period] = []
    for k in range(len(t)):
        seconds = timer.step(bool(trace["decode"][k]), overlapped=bool(trace["overlapped"][k]))
        if seconds is None or t[k] < since:
            continue
        lo = max(0, k - window)
        grew = {name: int(c[k] - c[lo]) for name, c in counts.items() if c[k] > c[lo]}
        out.append(Period(k, seconds, int(sizes[k - 1]), int(trace["context_tokens"][k - 1]), grew,
                          bool(np.any(sizes[lo:k + 1] != sizes[k])), float(gpu_ms[k]) / 1e3))  # fmt: skip
    return out


def _stats(seconds: Sequence[float], slow_s: float) -> str:
    if not seconds:
        return "| 0 | | | 0 |"
    ms = np.asarray(seconds) * 1e3
    return (f"| {len(ms)} | {np.percentile(ms, 50):.2f} | {np.percentile(ms, 99):.2f} "
            f"| {int(np.count_nonzero(ms > slow_s * 1e3))} |")  # fmt: skip


def report(periods: List[Period], top: int = 15) -> str:
    """The quantiles, the causes table and the slowest periods, as text."""
    if not periods:
        return "no decode step periods"
    seconds = np.array([p.seconds for p in periods])
    p50, p90, p99 = np.percentile(seconds, [50, 90, 99])
    slow_s = SLOW_OVER_P50 * p50
    lines = [f"decode step periods {len(periods)}  p50 {p50 * 1e3:.2f} ms  p90 {p90 * 1e3:.2f} ms  "
             f"p99 {p99 * 1e3:.2f} ms ({p99 / p50:.2f}x p50)  slow (over {SLOW_OVER_P50}x p50, "
             f"{slow_s * 1e3:.2f} ms) {int(np.count_nonzero(seconds > slow_s))}"]  # fmt: skip
    gpu = np.array([p.gpu_seconds for p in periods])
    if np.isfinite(gpu).any():
        g50, g90, g99 = np.percentile(gpu[np.isfinite(gpu)], [50, 90, 99])
        lines.append(f"the same periods on the GPU (forward stream, {int(np.isfinite(gpu).sum())} timed)  p50 "
                     f"{g50 * 1e3:.2f} ms  p90 {g90 * 1e3:.2f} ms  p99 {g99 * 1e3:.2f} ms ({g99 / g50:.2f}x p50)  "
                     f"over {SLOW_OVER_P50}x their p50 {int(np.count_nonzero(gpu > SLOW_OVER_P50 * g50))}")  # fmt: skip
    lines += ["", "| in the window | periods | p50 ms | p99 ms | slow |", "|---|---|---|---|---|"]

    def has(p: Period, names: Sequence[str]) -> bool:
        return any(name in p.grew for name in names)

    tests = [(name, (lambda p, n=names: has(p, n))) for name, names in CAUSES]
    tests.append((BATCH_CHANGE, lambda p: p.batch_changed))
    for name, test in tests:
        lines.append(f"| {name} " + _stats([p.seconds for p in periods if test(p)], slow_s))
        lines.append(f"| not {name} " + _stats([p.seconds for p in periods if not test(p)], slow_s))
    quiet = [p.seconds for p in periods if not any(test(p) for _, test in tests)]
    lines.append("| none of these (quiet) " + _stats(quiet, slow_s))
    lines += ["", f"the {min(top, len(periods))} slowest periods", "",
              "| row | ms | x p50 | GPU ms | batch | context tokens | in the window |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in sorted(periods, key=lambda p: -p.seconds)[:top]:
        held = ", ".join(f"{name} +{n}" for name, n in p.grew.items())
        if p.batch_changed:
            held = ", ".join(x for x in (held, BATCH_CHANGE) if x)
        gpu_ms = f"{p.gpu_seconds * 1e3:.2f}" if np.isfinite(p.gpu_seconds) else ""
        lines.append(f"| {p.row} | {p.seconds * 1e3:.2f} | {p.seconds / p50:.2f} | {gpu_ms} | {p.batch_size} "
                     f"| {p.context_tokens} | {held} |")  # fmt: skip
    return "\n".join(lines)


def launched(p: Period) -> str:
    """What the iteration closing ``p`` launched (``p`` from windows of one iteration), as one of :data:`LAUNCHED`: a
    pack over a slice, a waited pack over any other, then a pack that planned the slices its launches had not
    (``slices_caught_up``, in traces that count it); a pack after a launch that sealed no page is the
    first of a pack's layer slices (or a pack that voided its seal)."""
    g = p.grew
    if "packs_waited" in g:
        return PACK_WAITED
    if "slices_caught_up" in g:
        return PACK_CAUGHT_UP
    if "pack_slices_after_launch" in g or ("packs_after_launch" in g and "pages_sealed" not in g):
        return PACK_SLICE
    if any(name in g for name in ("packs_after_launch", "async_seals", "seal_calls")):
        pages = g.get("pages_sealed", 0)
        return PACK_16 if pages <= 16 else PACK_32 if pages <= 32 else PACK_MORE
    if "starts_after_launch" in g:
        return FIRST_SLICE
    if "slices_after_launch" in g:
        return LATER_SLICE
    return OTHER if any(name in g for name in GPU_WORK) else NOTHING


def seal_work_report(periods: List[Period]) -> str:
    """The seal work's cost to the step beside it (module docstring), as a table; ``periods`` from windows of one
    iteration. Periods with a batch change, no GPU period or a batch size short of :data:`MIN_BASELINE_PERIODS` quiet
    ones are left out."""
    steady = [p for p in periods if not p.batch_changed and np.isfinite(p.gpu_seconds)]
    baseline = _gpu_baseline(steady)
    excess: Dict[str, List[float]] = {name: [] for name in LAUNCHED}
    over: Dict[str, int] = {name: 0 for name in LAUNCHED}
    for p in steady:
        base = baseline.get(p.batch_size)
        if base is None:
            continue
        kind = launched(p)
        excess[kind].append((p.gpu_seconds - base) * 1e3)
        over[kind] += int(p.gpu_seconds > SLOW_OVER_P50 * base)
    lines = [f"the seal work's cost on the GPU, one iteration at a time (excess over the median GPU period of the same "
             f"batch size with {NOTHING}; over {SLOW_OVER_P50}x that median)", "",
             "| what the iteration launched | periods | excess p50 ms | excess p90 ms | over |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name in LAUNCHED:
        ms = excess[name]
        if ms:
            lines.append(f"| {name} | {len(ms)} | {np.percentile(ms, 50):.2f} | {np.percentile(ms, 90):.2f} "
                         f"| {over[name]} ({100 * over[name] / len(ms):.0f}%) |")  # fmt: skip
    return "\n".join(lines)


def _gpu_baseline(periods: List[Period]) -> Dict[int, float]:
    """The median GPU period of each batch size's steady periods with nothing launched (at least
    :data:`MIN_BASELINE_PERIODS` of them)."""
    quiet: Dict[int, List[float]] = {}
    for p in periods:
        if not p.batch_changed and np.isfinite(p.gpu_seconds) and launched(p) == NOTHING:
            quiet.setdefault(p.batch_size, []).append(p.gpu_seconds)
    return {b: float(np.median(v)) for b, v in quiet.items() if len(v) >= MIN_BASELINE_PERIODS}


def seal_pages_of(row: int, pages_sealed: np.ndarray) -> Optional[int]:
    """The pages of the seal that work launched at ``row`` belongs to: the next growth of the trace's running
    ``pages_sealed`` at or after ``row`` (a sealer has one seal in flight, sealed by its pack's last step); ``None``
    when the trace ends first."""
    before = pages_sealed[row - 1] if row > 0 else 0
    sealed_at = int(np.searchsorted(pages_sealed, before, side="right"))
    if sealed_at >= len(pages_sealed):
        return None
    return int(pages_sealed[sealed_at] - (pages_sealed[sealed_at - 1] if sealed_at > 0 else 0))


def slices_by_seal_report(periods: List[Period], pages_sealed: np.ndarray) -> str:
    """The layer slices' cost to the step beside them by the pages of the seal each belongs to (a planner slice's
    cost grows with its seal's page bucket), as a table; ``periods`` from windows of one iteration, ``pages_sealed``
    the trace's running count. Excess and over as in :func:`seal_work_report`, and the same periods left out; a seal
    voided before its pack has its slices counted with the next seal's."""
    baseline = _gpu_baseline(periods)
    excess: Dict[tuple, List[float]] = {}
    over: Dict[tuple, int] = {}
    for p in periods:
        kind = launched(p)
        work = {FIRST_SLICE: PLANNER_SLICE, LATER_SLICE: PLANNER_SLICE, PACK_SLICE: PACK_SLICE_OF_SEAL}.get(kind)
        base = baseline.get(p.batch_size)
        if work is None or base is None or p.batch_changed or not np.isfinite(p.gpu_seconds):
            continue
        pages = seal_pages_of(p.row, pages_sealed)
        if pages is None:
            continue
        size = next(name for top, name in SEAL_SIZES if top is None or pages <= top)
        excess.setdefault((size, work), []).append((p.gpu_seconds - base) * 1e3)
        over[(size, work)] = over.get((size, work), 0) + int(p.gpu_seconds > SLOW_OVER_P50 * base)
    if not excess:
        return ""
    lines = ["the layer slices' cost on the GPU by their seal's pages (as above, each slice with the seal whose pack "
             "next sealed pages)", "", "| seal's pages | slice | periods | excess p50 ms | excess p90 ms | over |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for _, size in SEAL_SIZES:
        for work in (PLANNER_SLICE, PACK_SLICE_OF_SEAL):
            ms = excess.get((size, work))
            if ms:
                n = over[(size, work)]
                lines.append(f"| {size} | {work} | {len(ms)} | {np.percentile(ms, 50):.2f} "
                             f"| {np.percentile(ms, 90):.2f} | {n} ({100 * n / len(ms):.0f}%) |")  # fmt: skip
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("traces", nargs="+",
                    help="step trace CSV files (MOSAICKV_STEP_TRACE=<prefix>: <prefix>.<pid>.csv), or gzipped (.csv.gz)")
    ap.add_argument("--window", type=int, default=3, help="scheduler iterations a period's window spans (default 3)")
    ap.add_argument("--since", type=float, default=0.0, help="only periods closed at or after this trace clock (s)")
    ap.add_argument("--top", type=int, default=15, help="slowest periods listed (default 15)")
    args = ap.parse_args(argv)
    for path in args.traces:
        try:
            trace = read_trace(path)
            periods = decode_periods(trace, args.window, args.since)
        except (OSError, ValueError) as e:
            print(f"{path}: {e}", file=sys.stderr)
            return 1
        print(f"## {path}\n\n{report(periods, args.top)}\n")
        if np.isfinite(trace.get("gpu_ms", np.array([np.nan]))).any():
            one_iteration = decode_periods(trace, 1, args.since)
            print(f"{seal_work_report(one_iteration)}\n")
            by_seal = slices_by_seal_report(one_iteration, trace["pages_sealed"]) if "pages_sealed" in trace else ""
            if by_seal:
                print(f"{by_seal}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
