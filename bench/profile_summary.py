# SPDX-License-Identifier: Apache-2.0
"""Where the time of a few served steps goes, from a torch profiler trace (what SGLang's ``/start_profile`` writes).

``python -m bench.profile_summary TRACE.trace.json.gz`` reads the trace's complete events of one category (GPU
kernels by default) and prints the busy time (union of the events' intervals) against their span (first start to
last end: busy well under span means the GPU waited for the host), the time of each ``--group`` (regular expressions
on the event name; defaults for MosaicKV's kernels, FlashInfer's, GEMMs and top-k / sort), and the ``--top`` events
by total time (CPU ops nest, so their totals overlap; GPU kernels do not). ``--json OUT`` writes the same as JSON.
A multi-MB trace becomes a few lines that can travel back from the GPU machine.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from bench.textio import read_text

DEFAULT_GROUPS: Tuple[Tuple[str, str], ...] = (
    ("mosaic", r"_sparse_decode|_segment_scores|_segment_select|_pack_segments|_unpack_segments|_extend_attn"),
    ("flashinfer", r"(?i)flashinfer|BatchDecode|BatchPrefill|PersistentVariableLength"),
    ("gemm", r"(?i)gemm|cutlass|xmma|nvjet|cublas"),
    ("topk/sort", r"(?i)topk|sort|radix"),
)


def read_trace(path: Path) -> Dict[str, Any]:
    """A chrome trace file (``.json`` or ``.json.gz``)."""
    return json.loads(read_text(path))


def raw_complete_events(trace: Dict[str, Any], category: str) -> Iterator[Dict[str, Any]]:
    """The trace's complete (``ph == "X"``) events of ``category`` that have a duration, as the trace holds them."""
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") == "X" and ev.get("cat") == category and "dur" in ev:
            yield ev


def complete_events(trace: Dict[str, Any], category: str) -> List[Tuple[str, float, float]]:
    """``(name, start us, duration us)`` of the trace's complete (``ph == "X"``) events of ``category``."""
    return [(str(ev.get("name", "")), float(ev["ts"]), float(ev["dur"])) for ev in raw_complete_events(trace, category)]


def busy_time(intervals: Iterable[Tuple[float, float]]) -> float:
    """Length of the union of ``(start, duration)`` intervals."""
    total, end = 0.0, float("-inf")
    for start, dur in sorted(intervals):
        stop = start + dur
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def summarize(events: Sequence[Tuple[str, float, float]], groups: Sequence[Tuple[str, str]] = DEFAULT_GROUPS,
              top: int = 20) -> Dict[str, Any]:  # fmt: skip
    """Busy time, span, per-group and per-name totals (milliseconds) of ``events``."""
    if not events:
        return {"events": 0, "busy_ms": 0.0, "span_ms": 0.0, "groups": {}, "top": []}
    span = max(s + d for _, s, d in events) - min(s for _, s, _ in events)
    by_name: Dict[str, List[float]] = {}
    for name, _, dur in events:
        by_name.setdefault(name, []).append(dur)
    compiled = [(label, re.compile(rx)) for label, rx in groups]
    group_ms = {label: 0.0 for label, _ in compiled}
    for name, durs in by_name.items():
        for label, rx in compiled:
            if rx.search(name):
                group_ms[label] += sum(durs) / 1e3
                break
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "events": len(events),
        "busy_ms": busy_time((s, d) for _, s, d in events) / 1e3,
        "span_ms": span / 1e3,
        "groups": group_ms,
        "top": [{"name": n, "count": len(d), "total_ms": sum(d) / 1e3, "mean_us": sum(d) / len(d)} for n, d in ranked],
    }


def _group(text: str) -> Tuple[str, str]:
    label, sep, rx = text.partition("=")
    if not sep or not label or not rx:
        raise argparse.ArgumentTypeError(f"--group: expected LABEL=REGEX, got {text!r}")
    re.compile(rx)
    return label, rx


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile_summary", description=__doc__.split("\n\n")[0])
    ap.add_argument("traces", type=Path, nargs="+", help="chrome trace files (.json or .json.gz), one summary each")
    ap.add_argument("--category", default="kernel", help="event category: kernel (GPU, default), cpu_op, ...")
    ap.add_argument("--group", type=_group, action="append", help="LABEL=REGEX, repeatable (default: built-in groups)")
    ap.add_argument("--top", type=int, default=20, help="events by total time to list (default 20)")
    ap.add_argument("--json", type=Path, help="also write the summaries to this JSON file")
    args = ap.parse_args(argv)
    results = {}
    for path in args.traces:
        try:
            trace = read_trace(path)
        except (OSError, ValueError) as err:
            print(f"profile_summary: {path}: {err}", file=sys.stderr)
            return 2
        s = summarize(complete_events(trace, args.category), args.group or DEFAULT_GROUPS, args.top)
        results[str(path)] = s
        print(f"{path.name}: {s['events']} {args.category} events, busy {s['busy_ms']:.2f} ms of a "
              f"{s['span_ms']:.2f} ms span")  # fmt: skip
        print("  groups: " + ", ".join(f"{k} {v:.2f} ms" for k, v in s["groups"].items()))
        for row in s["top"]:
            print(f"  {row['total_ms']:9.3f} ms  {row['count']:6d} x {row['mean_us']:9.1f} us  {row['name'][:100]}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
