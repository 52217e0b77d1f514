# SPDX-License-Identifier: Apache-2.0
"""Request latencies over a load, from SGLang's own histograms in two ``/metrics`` scrapes of any server.

Scrape ``/metrics`` of a server started with ``--enable-metrics`` before and after a load (``curl -s
http://127.0.0.1:30000/metrics > before.txt``), then ``python -m bench.server_latency before.txt after.txt``: for the
requests that finished in between, the time to first token (``sglang:time_to_first_token_seconds``), the end-to-end
latency (``sglang:e2e_request_latency_seconds``) and the inter-token latency (``sglang:inter_token_latency_seconds``),
each summed over its label sets (streaming or not, one per scheduler): the count, the mean (exact: sum over count)
and p50 / p90 (Prometheus's ``histogram_quantile``, linear within SGLang's buckets, which are coarse: 20 s wide
between 20 and 100 s for the first two). A load generator's warmup request counts too (``sglang.bench_serving`` sends
one before its run). It works for stock servers as for MosaicKV's, where ``sglang.bench_serving`` reports no TTFT
(with ``--tokenize-prompt`` it printed 0 in the twenty-first run).
"""

from __future__ import annotations

import sys
from typing import Dict, Optional, Sequence, Tuple

from prometheus_client.parser import text_string_to_metric_families

from bench.scrape_cli import run_two_scrapes
from mosaickv_sglang.step_timer import histogram_quantile

METRICS = {"ttft": "sglang:time_to_first_token_seconds", "e2e": "sglang:e2e_request_latency_seconds",
           "itl": "sglang:inter_token_latency_seconds"}  # fmt: skip
QUANTILES = (0.5, 0.9)


def read_histograms(text: str) -> Dict[str, Tuple[Dict[float, float], float, float]]:
    """Of each of :data:`METRICS` present in a ``/metrics`` text: ``({upper bound: cumulative count}, sum, count)``,
    each summed over the series' label sets."""
    names = {name: key for key, name in METRICS.items()}
    out: Dict[str, Tuple[Dict[float, float], float, float]] = {}
    for family in text_string_to_metric_families(text):
        key = names.get(family.name)
        if key is None:
            continue
        buckets: Dict[float, float] = {}
        total = count = 0.0
        for sample in family.samples:
            if sample.name == family.name + "_bucket":
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
            elif sample.name == family.name + "_sum":
                total += sample.value
            elif sample.name == family.name + "_count":
                count += sample.value
        out[key] = (buckets, total, count)
    return out


def load_latencies(before: str, after: str) -> Dict[str, Dict[str, Optional[float]]]:
    """Per latency of :data:`METRICS` found after the load: ``{"count", "mean", "p50", "p90"}`` (seconds) of the
    observations between the two scrapes (``mean`` and the quantiles ``None`` without any)."""
    b, a = read_histograms(before), read_histograms(after)
    if not a:
        raise ValueError(f"after: expected at least one of {sorted(METRICS.values())} (a server with "
                         "--enable-metrics that has served requests), got none")  # fmt: skip
    out: Dict[str, Dict[str, Optional[float]]] = {}
    for key, (buckets, total, count) in a.items():
        b_buckets, b_total, b_count = b.get(key, ({}, 0.0, 0.0))
        bounds = sorted(buckets)
        counts = [buckets[le] - b_buckets.get(le, 0.0) for le in bounds]
        n = count - b_count
        if n < 0 or any(c < 0 for c in counts):
            raise ValueError(f"before: expected a scrape of the same server taken before 'after', got larger "
                             f"{METRICS[key]} counts")  # fmt: skip
        got: Dict[str, Optional[float]] = {"count": n, "mean": (total - b_total) / n if n else None}
        for q in QUANTILES:
            got[f"p{round(q * 100):d}"] = histogram_quantile(q, tuple(bounds), counts)
        out[key] = got
    return out


def _line(got: Dict[str, Dict[str, Optional[float]]]) -> str:
    """The one-line form of :func:`load_latencies`' result."""

    def ms(x: Optional[float]) -> str:
        return "-" if x is None else f"{x * 1e3:.1f} ms"

    return "  ".join(f"{key} n {int(v['count'] or 0)} mean {ms(v['mean'])} p50 {ms(v['p50'])} p90 {ms(v['p90'])}"
                     for key, v in got.items())  # fmt: skip


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_two_scrapes("python -m bench.server_latency", __doc__.split("\n\n")[0], load_latencies, _line, argv)


if __name__ == "__main__":
    sys.exit(main())
