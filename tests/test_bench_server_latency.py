# SPDX-License-Identifier: Apache-2.0
"""bench.server_latency: SGLang's request latency histograms of two /metrics scrapes, summed over label sets."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, Histogram, generate_latest  # noqa: E402

from bench.server_latency import METRICS, load_latencies, main  # noqa: E402

# SGLang's TTFT buckets (0.5.17's defaults)
TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 200.0, 400.0)


def _registry():
    reg = CollectorRegistry()
    ttft = Histogram(METRICS["ttft"], "ttft", labelnames=["is_streaming"], buckets=TTFT_BUCKETS, registry=reg)
    return reg, ttft


def test_the_load_between_two_scrapes_over_label_sets(tmp_path, capsys):
    """Requests before the first scrape do not count; streaming and non-streaming series add up; the mean is exact,
    the median within its bucket; the CLI prints a line or JSON; latencies the server has no series of are absent."""
    reg, ttft = _registry()
    rng = np.random.default_rng(3)
    for v in rng.uniform(50.0, 90.0, size=5):  # an earlier load
        ttft.labels(is_streaming="true").observe(float(v))
    before = generate_latest(reg).decode()
    load = rng.uniform(2.0, 30.0, size=40)
    for i, v in enumerate(load):
        ttft.labels(is_streaming=str(i % 2 == 0).lower()).observe(float(v))
    after = generate_latest(reg).decode()
    got = load_latencies(before, after)
    assert set(got) == {"ttft"}
    assert got["ttft"]["count"] == 40
    assert got["ttft"]["mean"] == pytest.approx(float(load.mean()), rel=1e-9)
    median = float(np.median(load))
    lo = max([b for b in TTFT_BUCKETS if b < median], default=0.0)
    hi = min(b for b in TTFT_BUCKETS if b >= median)
    assert lo <= got["ttft"]["p50"] <= hi
    (tmp_path / "b.txt").write_text(before)
    (tmp_path / "a.txt").write_text(after)
    assert main([str(tmp_path / "b.txt"), str(tmp_path / "a.txt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ttft"]["count"] == 40
    assert main([str(tmp_path / "b.txt"), str(tmp_path / "a.txt")]) == 0
    assert capsys.readouterr().out.startswith("ttft n 40 mean ")


def test_no_requests_in_between_and_bad_inputs(tmp_path, capsys):
    reg, ttft = _registry()
    ttft.labels(is_streaming="true").observe(1.5)
    text = generate_latest(reg).decode()
    got = load_latencies(text, text)
    assert got["ttft"]["count"] == 0 and got["ttft"]["mean"] is None and got["ttft"]["p50"] is None
    ttft.labels(is_streaming="true").observe(2.5)
    with pytest.raises(ValueError, match="before: expected a scrape of the same server taken before 'after'"):
        load_latencies(generate_latest(reg).decode(), text)
    with pytest.raises(ValueError, match="after: expected at least one of"):
        load_latencies("", "# nothing here\n")
    (tmp_path / "empty.txt").write_text("")
    assert main([str(tmp_path / "empty.txt"), str(tmp_path / "empty.txt")]) == 2
    assert "server_latency: after: expected" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.txt"), str(tmp_path / "empty.txt")]) == 2
