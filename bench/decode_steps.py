# SPDX-License-Identifier: Apache-2.0
"""Decode step time quantiles over a load, from two ``/metrics`` scrapes of a MosaicKV server.

``sglang:mosaic_decode_step_seconds`` (``mosaickv_sglang.step_timer``) counts the time between the starts of two
consecutive decode steps, prefill steps excluded. Scrape ``/metrics`` before and after a load
(``curl -s http://127.0.0.1:30000/metrics > before.txt``), then ``python -m bench.decode_steps before.txt
after.txt``: the load's decode step p50 / p90 / p99 (Prometheus's ``histogram_quantile``, linear within the 5%-wide
buckets), summed over the server's schedulers, the scheduler time sealing and the sidecar took meanwhile
(``sglang:mosaic_seal_seconds_total``, ``sglang:mosaic_sidecar_step_seconds_total``; prefill steps included, so they
are totals, not divided by the decode steps; with its parts ``..._submit/land/apply_seconds_total`` when the server
exports them, and the bridge's I/O thread's time beside them, ``sglang:mosaic_sidecar_io_thread_seconds_total``),
and the decode batches' plans (``sglang:mosaic_decode_plan_seconds_total`` over
``sglang:mosaic_decode_plans_total``: host work before each decode forward, sealing and the sidecar included; with
their sealing and sidecar parts, ``..._decode_plan_seal/sidecar_seconds_total``, when the server exports them: those
count decode steps only). It also counts the steps over the first bucket bound at or above 1.1x and 1.5x the p50
(issue #5's target and a long step), exactly: the histogram counts steps at its bounds. Under the overlap scheduler
the decode period after a prefill holds that prefill's GPU time; the server keeps those apart
(``sglang:mosaic_decode_step_behind_prefill_seconds``), and the line gives their count, p50 and p99 after the rest.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from prometheus_client.parser import text_string_to_metric_families

from bench.scrape_cli import run_two_scrapes
from mosaickv_sglang.step_timer import histogram_quantile

METRIC = "sglang:mosaic_decode_step_seconds"
BEHIND_PREFILL_METRIC = "sglang:mosaic_decode_step_behind_prefill_seconds"
QUANTILES = (0.5, 0.9, 0.99)
# steps over the first bucket bound at or above these multiples of the p50
OVER_P50 = (1.1, 1.5)
SIDECAR_METRIC = "sglang:mosaic_sidecar_step_seconds_total"
SEAL_SECONDS_METRIC = "sglang:mosaic_seal_seconds_total"
SEAL_CALLS_METRIC = "sglang:mosaic_seal_calls_total"
SEAL_PART_METRICS = {"seal_plan_s": "sglang:mosaic_seal_plan_seconds_total",
                     "seal_gpu_s": "sglang:mosaic_seal_gpu_seconds_total"}  # fmt: skip
PLAN_SECONDS_METRIC = "sglang:mosaic_decode_plan_seconds_total"
PLANS_METRIC = "sglang:mosaic_decode_plans_total"
PLAN_PART_METRICS = {"plan_seal_s": "sglang:mosaic_decode_plan_seal_seconds_total",
                     "plan_sidecar_s": "sglang:mosaic_decode_plan_sidecar_seconds_total"}  # fmt: skip
SIDECAR_PART_METRICS = {"submit_s": "sglang:mosaic_sidecar_submit_seconds_total",
                        "land_s": "sglang:mosaic_sidecar_land_seconds_total",
                        "apply_s": "sglang:mosaic_sidecar_apply_seconds_total"}  # fmt: skip
IO_THREAD_METRIC = "sglang:mosaic_sidecar_io_thread_seconds_total"


# load_quantiles' keys for the counters it reads, and their series
COUNTERS = {"sidecar_s": SIDECAR_METRIC, "seal_s": SEAL_SECONDS_METRIC, "seal_calls": SEAL_CALLS_METRIC,
            "plan_s": PLAN_SECONDS_METRIC, "plans": PLANS_METRIC, **SIDECAR_PART_METRICS, **PLAN_PART_METRICS,
            "io_s": IO_THREAD_METRIC, **SEAL_PART_METRICS}


def read_scrape(text: str) -> Tuple[Dict[float, float], Dict[str, float], Dict[float, float]]:
    """One pass over a ``/metrics`` text: ``{upper bound: cumulative count}`` of the decode step histogram, the
    values of the :data:`COUNTERS` series present (``name`` with its ``_total``), and the buckets of the periods
    behind a prefill (:data:`BEHIND_PREFILL_METRIC`), each summed over its label sets (one per exporting scheduler);
    a histogram is empty when the server has no such series."""
    buckets: Dict[float, float] = {}
    behind: Dict[float, float] = {}
    counters: Dict[str, float] = {}
    names = set(COUNTERS.values())
    by_name = {METRIC + "_bucket": buckets, BEHIND_PREFILL_METRIC + "_bucket": behind}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            into = by_name.get(sample.name)
            if into is not None:
                le = float(sample.labels["le"])
                into[le] = into.get(le, 0.0) + sample.value
            elif sample.name in names:
                counters[sample.name] = counters.get(sample.name, 0.0) + sample.value
    return buckets, counters, behind


def _load_counts(before: Dict[float, float], after: Dict[float, float]) -> Tuple[Tuple[float, ...], List[float]]:
    """The bounds and cumulative counts a histogram gained between two scrapes."""
    bounds = tuple(sorted(after))
    counts = [after[le] - before.get(le, 0.0) for le in bounds]
    if any(c < 0 for c in counts):
        raise ValueError("before: expected a scrape of the same server taken before 'after', got larger counts")
    return bounds, counts


def load_quantiles(before: str, after: str, quantiles: Sequence[float] = QUANTILES) -> Dict[str, Any]:
    """The quantiles (seconds) and the step count of the steps counted between two scrapes, and meanwhile the
    scheduler time the sidecar bridge took before forwards (``sidecar_s``; ``None`` with the sidecar off) and the
    sealing calls and their time (``seal_calls``, ``seal_s``; prefill steps included in all three); ``over``:
    :func:`steps_over` of the p50; ``behind_prefill``: the count, p50 and p99 of the periods behind a prefill
    (``None`` when the server does not export them)."""
    (b, b_counters, b_behind), (a, a_counters, a_behind) = read_scrape(before), read_scrape(after)
    if not a:
        raise ValueError(f"after: expected a {METRIC} histogram (a --kv-compressor mosaic server with "
                         f"--enable-metrics), got none")  # fmt: skip
    bounds, counts = _load_counts(b, a)
    out: Dict[str, Any] = {f"p{round(q * 100):d}": histogram_quantile(q, bounds, counts) for q in quantiles}
    out["steps"] = counts[-1] if counts else 0.0
    out["over"] = steps_over(bounds, counts, histogram_quantile(0.5, bounds, counts))
    for key, name in COUNTERS.items():
        out[key] = a_counters[name] - b_counters.get(name, 0.0) if name in a_counters else None
    out["behind_prefill"] = None
    if a_behind:
        bounds, counts = _load_counts(b_behind, a_behind)
        out["behind_prefill"] = {"steps": counts[-1] if counts else 0.0,
                                 "p50": histogram_quantile(0.5, bounds, counts),
                                 "p99": histogram_quantile(0.99, bounds, counts)}  # fmt: skip
    return out


def steps_over(bounds: Sequence[float], cumulative: Sequence[float], p50: Optional[float],
               factors: Sequence[float] = OVER_P50) -> List[Tuple[float, float, float]]:  # fmt: skip
    """``(factor, bound s, steps over it)`` for each factor: the first finite bucket bound at or above ``factor`` x
    ``p50`` and how many of the ``cumulative`` counts lie above it (none when there is no p50 or no such bound)."""
    if p50 is None or not cumulative:
        return []
    out = []
    for factor in factors:
        i = next((i for i, le in enumerate(bounds) if le >= factor * p50 and le != float("inf")), None)
        if i is not None:
            out.append((factor, bounds[i], cumulative[-1] - cumulative[i]))
    return out


def _line(got: Dict[str, Any]) -> str:
    """The one-line form of :func:`load_quantiles`' result."""
    quantile_keys = [f"p{round(q * 100):d}" for q in QUANTILES]
    ms = "  ".join(f"{k} {'-' if got[k] is None else f'{got[k] * 1e3:.2f} ms'}" for k in quantile_keys)
    over = ", ".join(f"over {le * 1e3:.1f} ms ({f}x p50) {int(n)}" for f, le, n in got.get("over") or [])
    if over:
        ms += f"  steps {over}"
    if got["seal_s"] is not None:
        ms += f"  sealing {got['seal_s'] * 1e3:.1f} ms in {int(got['seal_calls'] or 0)} calls"
        named = (("seal_plan_s", "planning"), ("seal_gpu_s", "GPU span"))
        parts = [f"{name} {got[k] * 1e3:.1f} ms" for k, name in named if got.get(k) is not None]
        if parts:
            ms += f" ({', '.join(parts)})"
    sidecar = got["sidecar_s"]
    if sidecar is not None:
        # not divided by the decode steps: the counter includes prefill steps (the tenth run's 2 s of a 33 s
        # bench were mostly prefill seals' submissions, and read as 7 ms a decode step)
        ms += f"  sidecar before forwards {sidecar * 1e3:.1f} ms (prefill steps included)"
        parts = [f"{k[:-2]} {got[k] * 1e3:.1f} ms" for k in SIDECAR_PART_METRICS if got.get(k) is not None]
        if parts:
            ms += f" ({', '.join(parts)})"
    if got.get("io_s") is not None:
        ms += f"  I/O thread beside the scheduler {got['io_s'] * 1e3:.1f} ms"
    if got["plan_s"] is not None and got["plans"]:
        each = 1e3 / got["plans"]
        ms += f"  decode plans {got['plan_s'] * each:.2f} ms each ({int(got['plans'])}"
        parts = [f"{k[5:-2]} {got[k] * each:.2f} ms" for k in PLAN_PART_METRICS if got.get(k) is not None]
        ms += f"; of which {', '.join(parts)})" if parts else ")"
    behind = got.get("behind_prefill")
    if behind is not None:
        ms += f"  behind a prefill (not counted above) {int(behind['steps'])}"
        if behind["p50"] is not None:
            ms += f", p50 {behind['p50'] * 1e3:.2f} ms, p99 {behind['p99'] * 1e3:.2f} ms"
    return f"decode steps {int(got['steps'])}  {ms}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_two_scrapes("python -m bench.decode_steps", __doc__.split("\n\n")[0], load_quantiles, _line, argv)


if __name__ == "__main__":
    sys.exit(main())
