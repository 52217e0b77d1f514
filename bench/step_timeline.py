# SPDX-License-Identifier: Apache-2.0
"""A served load's GPU trace split into its steps: which steps were slow, and what the GPU did in them.

``python -m bench.step_timeline TRACE.trace.json.gz`` reads the GPU kernels of a torch profiler trace (SGLang's
``/start_profile`` with ``activities: ["GPU"]``; ``device_served.sh sidecar-itl`` with ``PROFILE_ITL=N`` keeps one a
server) and cuts it into steps at each launch of a kernel that runs once a step (``--step-kernel REGEX``; by
default the forward stream's costliest kernel among those launched at most a twentieth as often as its most
frequent one: the LM head's GEMM of a decode step). For each step it measures the span (marker to next marker), the
forward stream's busy time, the other streams' busy time inside the span (a seal's kernels beside the step), and
prints the span's percentiles and every step over ``--slow`` times the median span, with the kernels that filled
it. Busy close to span means the step waited for the GPU; span well over busy, for the host.
"""

from __future__ import annotations

import argparse
import bisect
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

from bench.profile_summary import busy_time, raw_complete_events, read_trace


class Kernel(NamedTuple):
    name: str
    start_us: float
    dur_us: float
    stream: int


def kernel_events(trace: Dict[str, Any]) -> List[Kernel]:
    """The trace's GPU kernels (complete events of category ``kernel``), by start time."""
    out = [Kernel(str(ev.get("name", "")), float(ev["ts"]), float(ev["dur"]),
                  int((ev.get("args") or {}).get("stream", ev.get("tid", 0))))
           for ev in raw_complete_events(trace, "kernel")]  # fmt: skip
    return sorted(out, key=lambda k: k.start_us)


def forward_stream(kernels: Sequence[Kernel]) -> int:
    """The stream with the most kernel time: the one the steps run on."""
    if not kernels:
        raise ValueError("trace: expected GPU kernel events, got none")
    total: Dict[int, float] = defaultdict(float)
    for k in kernels:
        total[k.stream] += k.dur_us
    return max(total, key=total.__getitem__)


def default_step_kernel(kernels: Sequence[Kernel], stream: int) -> str:
    """The name of the forward stream's costliest kernel launched at most 1/20 as often as its most frequent one."""
    counts: Dict[str, int] = defaultdict(int)
    totals: Dict[str, float] = defaultdict(float)
    for k in kernels:
        if k.stream == stream:
            counts[k.name] += 1
            totals[k.name] += k.dur_us
    rare = [n for n, c in counts.items() if 2 <= c <= max(counts.values()) // 20]
    if not rare:
        raise ValueError(f"step kernel: expected a kernel launched once a step on stream {stream}, got none; "
                         "pass --step-kernel")  # fmt: skip
    return max(rare, key=totals.__getitem__)


def split_steps(kernels: Sequence[Kernel], step_kernel: str, stream: Optional[int] = None) -> List[Dict[str, Any]]:
    """One record a step, from one start of a kernel matching ``step_kernel`` (a regex) on the forward stream to the
    next: span, forward busy and other streams' busy inside the span (ms), and the step's kernels by total time."""
    stream = forward_stream(kernels) if stream is None else stream
    rx = re.compile(step_kernel)
    marks = [k.start_us for k in kernels if k.stream == stream and rx.search(k.name)]
    if len(marks) < 2:
        raise ValueError(f"--step-kernel: expected at least 2 launches of {step_kernel!r} on stream {stream}, "
                         f"got {len(marks)}")  # fmt: skip
    starts = [k.start_us for k in kernels]
    # kernels started before a step and still running in it (a long one on a side stream), carried step to step
    carry = [k for k in kernels[: bisect.bisect_left(starts, marks[0])] if k.start_us + k.dur_us > marks[0]]
    steps = []
    for a, b in zip(marks, marks[1:]):
        inside = [k for k in carry if k.start_us + k.dur_us > a]
        inside += kernels[bisect.bisect_left(starts, a): bisect.bisect_left(starts, b)]
        carry = [k for k in inside if k.start_us + k.dur_us > b]
        clipped: Dict[bool, List[tuple]] = {True: [], False: []}
        by_name: Dict[str, float] = defaultdict(float)
        for k in inside:
            s, e = max(k.start_us, a), min(k.start_us + k.dur_us, b)
            clipped[k.stream == stream].append((s, e - s))
            by_name[k.name if k.stream == stream else f"[stream {k.stream}] {k.name}"] += e - s
        steps.append({
            "start_us": a,
            "span_ms": (b - a) / 1e3,
            "forward_busy_ms": busy_time(clipped[True]) / 1e3,
            "other_busy_ms": busy_time(clipped[False]) / 1e3,
            "kernels": sorted(((n, t / 1e3) for n, t in by_name.items()), key=lambda nt: -nt[1]),
        })
    return steps


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def summarize(steps: Sequence[Dict[str, Any]], slow: float = 1.2) -> Dict[str, Any]:
    """Span percentiles, median busy times, and the steps over ``slow`` x the median span."""
    spans = sorted(s["span_ms"] for s in steps)
    median = statistics.median(spans)
    return {
        "steps": len(steps),
        "span_ms": {"p50": median, "p90": _percentile(spans, 0.9), "p99": _percentile(spans, 0.99),
                    "max": spans[-1]},  # fmt: skip
        "forward_busy_ms_p50": statistics.median(s["forward_busy_ms"] for s in steps),
        "other_busy_ms_total": sum(s["other_busy_ms"] for s in steps),
        "slow": [dict(s, index=i) for i, s in enumerate(steps) if s["span_ms"] > slow * median],
    }


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--slow: expected a positive number, got {text}")
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.step_timeline", description=__doc__.split("\n\n")[0])
    ap.add_argument("traces", type=Path, nargs="+", help="chrome trace files (.json or .json.gz), one report each")
    ap.add_argument("--step-kernel", help="regex of a kernel launched once a step (default: chosen, see above)")
    ap.add_argument("--slow", type=_positive, default=1.2, help="list steps over this x the median span (1.2)")
    ap.add_argument("--top", type=int, default=4, help="kernels listed a slow step (default 4)")
    args = ap.parse_args(argv)
    for path in args.traces:
        try:
            kernels = kernel_events(read_trace(path))
            stream = forward_stream(kernels)
            marker = args.step_kernel or default_step_kernel(kernels, stream)
            s = summarize(split_steps(kernels, marker, stream), args.slow)
        except (OSError, ValueError) as err:
            print(f"step_timeline: {path}: {err}", file=sys.stderr)
            return 2
        span = s["span_ms"]
        print(f"{path.name}: {s['steps']} steps on stream {stream}, cut at {marker[:60]!r}")
        print(f"  span p50 {span['p50']:.2f} p90 {span['p90']:.2f} p99 {span['p99']:.2f} max {span['max']:.2f} ms; "
              f"forward busy p50 {s['forward_busy_ms_p50']:.2f} ms; other streams {s['other_busy_ms_total']:.1f} ms "
              f"in all; {len(s['slow'])} steps over {args.slow}x the median")  # fmt: skip
        for step in s["slow"]:
            top = ", ".join(f"{n[:50]} {t:.2f}" for n, t in step["kernels"][: args.top])
            print(f"  step {step['index']}: span {step['span_ms']:.2f} ms, forward busy {step['forward_busy_ms']:.2f}, "
                  f"other streams {step['other_busy_ms']:.2f}; {top}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
