# SPDX-License-Identifier: Apache-2.0
"""bench.decode_steps: the decode step histogram of two /metrics scrapes, summed over schedulers, and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest  # noqa: E402

from bench.decode_steps import (  # noqa: E402
    BEHIND_PREFILL_METRIC,
    COUNTERS,
    IO_THREAD_METRIC,
    METRIC,
    PLAN_PART_METRICS,
    PLAN_SECONDS_METRIC,
    PLANS_METRIC,
    SEAL_CALLS_METRIC,
    SEAL_PART_METRICS,
    SEAL_SECONDS_METRIC,
    SIDECAR_METRIC,
    SIDECAR_PART_METRICS,
    load_quantiles,
    main,
)
from mosaickv_sglang import metrics  # noqa: E402
from mosaickv_sglang.step_timer import DECODE_STEP_BUCKETS  # noqa: E402


def test_the_series_it_reads_are_those_the_plugin_exports():
    """A series renamed in ``mosaickv_sglang.metrics`` and not here would leave the report's column empty."""
    exported = {spec.name for spec in metrics.METRICS}
    assert set(COUNTERS.values()) <= exported, set(COUNTERS.values()) - exported
    assert (METRIC, BEHIND_PREFILL_METRIC) == (metrics.DECODE_STEP_METRIC, metrics.DECODE_STEP_BEHIND_PREFILL_METRIC)


def _scrape(registry) -> str:
    return generate_latest(registry).decode()


def test_quantiles_of_the_steps_between_two_scrapes_over_two_schedulers(tmp_path, capsys):
    """Steps before the first scrape do not count; two ranks' series add up; the CLI prints count and quantiles."""
    registry = CollectorRegistry()
    hist = Histogram(METRIC, "decode steps", labelnames=["tp_rank"], buckets=DECODE_STEP_BUCKETS, registry=registry)
    rng = np.random.default_rng(7)
    for v in rng.uniform(0.5, 1.0, size=50):  # an earlier, slower load
        hist.labels(tp_rank="0").observe(float(v))
    before = _scrape(registry)
    load = rng.uniform(0.020, 0.030, size=400)
    for i, v in enumerate(load):
        hist.labels(tp_rank=str(i % 2)).observe(float(v))
    after = _scrape(registry)
    got = load_quantiles(before, after)
    assert got["steps"] == 400
    assert got["p50"] == pytest.approx(float(np.median(load)), rel=0.05)
    assert got["p99"] == pytest.approx(float(np.quantile(load, 0.99)), rel=0.05)
    (tmp_path / "b.txt").write_text(before)
    (tmp_path / "a.txt").write_text(after)
    assert main([str(tmp_path / "b.txt"), str(tmp_path / "a.txt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 400
    assert main([str(tmp_path / "b.txt"), str(tmp_path / "a.txt")]) == 0
    assert capsys.readouterr().out.startswith("decode steps 400  p50 ")
    assert got["sidecar_s"] is None and got["seal_s"] is None  # no such counters in this scrape


def test_sidecar_time_between_the_scrapes_summed_over_schedulers(tmp_path, capsys):
    registry = CollectorRegistry()
    hist = Histogram(METRIC, "decode steps", buckets=DECODE_STEP_BUCKETS, registry=registry)
    side = Counter(SIDECAR_METRIC.removesuffix("_total"), "sidecar", labelnames=["tp_rank"], registry=registry)
    seal_s = Counter(SEAL_SECONDS_METRIC.removesuffix("_total"), "sealing", registry=registry)
    seal_n = Counter(SEAL_CALLS_METRIC.removesuffix("_total"), "sealing calls", registry=registry)
    plan_s = Counter(PLAN_SECONDS_METRIC.removesuffix("_total"), "decode plans", registry=registry)
    plans = Counter(PLANS_METRIC.removesuffix("_total"), "decode plans", registry=registry)
    side.labels(tp_rank="0").inc(5.0)  # before the load
    plan_s.inc(1.0)
    plans.inc(50)
    seal_s.inc(2.0)
    seal_n.inc(7)
    before = _scrape(registry)
    for _ in range(200):
        hist.observe(0.03)
    side.labels(tp_rank="0").inc(0.25)
    side.labels(tp_rank="1").inc(0.15)
    seal_s.inc(0.5)
    seal_n.inc(3)
    plan_s.inc(0.6)
    plans.inc(200)
    after = _scrape(registry)
    got = load_quantiles(before, after)
    assert got["steps"] == 200 and got["sidecar_s"] == pytest.approx(0.4)
    assert got["seal_s"] == pytest.approx(0.5) and got["seal_calls"] == 3
    assert got["plan_s"] == pytest.approx(0.6) and got["plans"] == 200
    (tmp_path / "b.txt").write_text(before)
    (tmp_path / "a.txt").write_text(after)
    assert main([str(tmp_path / "b.txt"), str(tmp_path / "a.txt")]) == 0
    out = capsys.readouterr().out.rstrip()
    assert "  sealing 500.0 ms in 3 calls  " in out
    assert "plan_s" not in out and "  plans " not in out  # counters are not printed as quantiles (the ninth run's line)
    assert out.endswith("sidecar before forwards 400.0 ms (prefill steps included)  decode plans 3.00 ms each (200)")


def test_decode_plan_parts_are_printed_per_plan_when_exported(tmp_path, capsys):
    """A server that exports the decode plans' sealing and sidecar parts gets them per plan, after the plans' time."""
    registry = CollectorRegistry()
    hist = Histogram(METRIC, "decode steps", buckets=DECODE_STEP_BUCKETS, registry=registry)
    plan_s = Counter(PLAN_SECONDS_METRIC.removesuffix("_total"), "decode plans", registry=registry)
    plans = Counter(PLANS_METRIC.removesuffix("_total"), "decode plans", registry=registry)
    parts = {k: Counter(name.removesuffix("_total"), k, registry=registry) for k, name in PLAN_PART_METRICS.items()}
    parts["plan_seal_s"].inc(9.0)  # before the load
    before = _scrape(registry)
    for _ in range(100):
        hist.observe(0.03)
    plan_s.inc(0.5)
    plans.inc(100)
    parts["plan_seal_s"].inc(0.25)
    parts["plan_sidecar_s"].inc(0.125)
    got = load_quantiles(before, _scrape(registry))
    assert (got["plan_seal_s"], got["plan_sidecar_s"]) == (0.25, 0.125)
    (tmp_path / "b.txt").write_text(before)
    (tmp_path / "a.txt").write_text(_scrape(registry))
    assert main([str(tmp_path / "b.txt"), str(tmp_path / "a.txt")]) == 0
    assert capsys.readouterr().out.rstrip().endswith(
        "decode plans 5.00 ms each (100; of which seal 2.50 ms, sidecar 1.25 ms)")


def test_sidecar_parts_are_printed_when_exported(tmp_path, capsys):
    """A server that exports the sidecar time's parts (submit, land, apply) gets them after the total, and its I/O
    thread's time beside them."""
    registry = CollectorRegistry()
    hist = Histogram(METRIC, "decode steps", buckets=DECODE_STEP_BUCKETS, registry=registry)
    side = Counter(SIDECAR_METRIC.removesuffix("_total"), "sidecar", registry=registry)
    parts = {k: Counter(name.removesuffix("_total"), k, registry=registry) for k, name in SIDECAR_PART_METRICS.items()}
    io = Counter(IO_THREAD_METRIC.removesuffix("_total"), "I/O thread", registry=registry)
    before = _scrape(registry)
    for _ in range(100):
        hist.observe(0.01)
    side.inc(0.5)
    parts["submit_s"].inc(0.25)
    parts["land_s"].inc(0.125)
    parts["apply_s"].inc(0.0625)
    io.inc(2.0)
    got = load_quantiles(before, _scrape(registry))
    assert (got["submit_s"], got["land_s"], got["apply_s"], got["io_s"]) == (0.25, 0.125, 0.0625, 2.0)
    (tmp_path / "b.txt").write_text(before)
    (tmp_path / "a.txt").write_text(_scrape(registry))
    assert main([str(tmp_path / "b.txt"), str(tmp_path / "a.txt")]) == 0
    assert ("sidecar before forwards 500.0 ms (prefill steps included) (submit 250.0 ms, land 125.0 ms, apply 62.5 ms)"
            "  I/O thread beside the scheduler 2000.0 ms" in capsys.readouterr().out)


def test_seal_parts_are_printed_when_exported(tmp_path, capsys):
    """A server that exports the sealing time's planner part and the seals' GPU span gets them after the sealing
    total; one that exports the planner part only (off CUDA) gets that alone."""
    registry = CollectorRegistry()
    hist = Histogram(METRIC, "decode steps", buckets=DECODE_STEP_BUCKETS, registry=registry)
    seal_s = Counter(SEAL_SECONDS_METRIC.removesuffix("_total"), "sealing", registry=registry)
    seal_n = Counter(SEAL_CALLS_METRIC.removesuffix("_total"), "sealing calls", registry=registry)
    plan = Counter(SEAL_PART_METRICS["seal_plan_s"].removesuffix("_total"), "planning", registry=registry)
    before = _scrape(registry)
    for _ in range(10):
        hist.observe(0.01)
    seal_s.inc(2.0)
    seal_n.inc(4)
    plan.inc(1.5)
    (tmp_path / "b.txt").write_text(before)
    (tmp_path / "a.txt").write_text(_scrape(registry))
    assert main([str(tmp_path / "b.txt"), str(tmp_path / "a.txt")]) == 0
    assert capsys.readouterr().out.rstrip().endswith("  sealing 2000.0 ms in 4 calls (planning 1500.0 ms)")
    gpu = Counter(SEAL_PART_METRICS["seal_gpu_s"].removesuffix("_total"), "GPU span", registry=registry)
    gpu.inc(0.25)
    (tmp_path / "a.txt").write_text(_scrape(registry))
    got = load_quantiles(before, _scrape(registry))
    assert (got["seal_plan_s"], got["seal_gpu_s"]) == (1.5, 0.25)
    assert main([str(tmp_path / "b.txt"), str(tmp_path / "a.txt")]) == 0
    assert "  sealing 2000.0 ms in 4 calls (planning 1500.0 ms, GPU span 250.0 ms)" in capsys.readouterr().out


def test_errors_name_the_scrape_at_fault(tmp_path, capsys):
    registry = CollectorRegistry()
    hist = Histogram(METRIC, "decode steps", buckets=DECODE_STEP_BUCKETS, registry=registry)
    hist.observe(0.02)
    one = _scrape(registry)
    hist.observe(0.02)
    two = _scrape(registry)
    with pytest.raises(ValueError, match="after: expected a sglang:mosaic_decode_step_seconds histogram"):
        load_quantiles(one, "# no such series\n")
    with pytest.raises(ValueError, match="before: expected a scrape of the same server taken before"):
        load_quantiles(two, one)
    (tmp_path / "a.txt").write_text("")
    assert main([str(tmp_path / "missing.txt"), str(tmp_path / "a.txt")]) == 2
    assert "decode_steps:" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_steps_over_multiples_of_the_p50_are_counted_exactly_at_bucket_bounds(tmp_path, capsys, seed):
    """A load of steps around a base time with a slower tail: the counts over the first bound at or above 1.1x and
    1.5x the p50 equal a count of the observed values; the CLI prints them."""
    registry = CollectorRegistry()
    hist = Histogram(METRIC, "decode steps", buckets=DECODE_STEP_BUCKETS, registry=registry)
    before = _scrape(registry)
    rng = np.random.default_rng(seed)
    base = rng.uniform(0.008, 0.016)
    load = np.concatenate([rng.uniform(0.97, 1.03, size=int(rng.integers(500, 1500))) * base,
                           rng.uniform(1.05, 3.0, size=int(rng.integers(5, 60))) * base])  # fmt: skip
    for v in rng.permutation(load):
        hist.observe(float(v))
    got = load_quantiles(before, _scrape(registry))
    assert [f for f, _, _ in got["over"]] == [1.1, 1.5]
    for factor, bound, n in got["over"]:
        assert bound == min(b for b in DECODE_STEP_BUCKETS if b >= factor * got["p50"])
        assert n == int((load > bound).sum())
    assert got["over"][0][2] >= got["over"][1][2] > 0
    (tmp_path / "b.txt").write_text(before)
    (tmp_path / "a.txt").write_text(_scrape(registry))
    assert main([str(tmp_path / "b.txt"), str(tmp_path / "a.txt")]) == 0
    f, le, n = got["over"][1]
    assert f"over {le * 1e3:.1f} ms (1.5x p50) {int(n)}" in capsys.readouterr().out


@pytest.mark.parametrize("seed", [0, 1])
def test_periods_behind_a_prefill_are_read_apart_from_the_steps(tmp_path, capsys, seed):
    """The periods behind a prefill (their own histogram) do not move the steps' quantiles; their count, p50 and p99
    over the load come after the rest; a scrape without that series leaves them out."""
    registry = CollectorRegistry()
    hist = Histogram(METRIC, "decode steps", buckets=DECODE_STEP_BUCKETS, registry=registry)
    behind = Histogram(BEHIND_PREFILL_METRIC, "behind", labelnames=["tp_rank"], buckets=DECODE_STEP_BUCKETS,
                       registry=registry)  # fmt: skip
    rng = np.random.default_rng(seed)
    behind.labels(tp_rank="0").observe(0.5)  # before the load
    before = _scrape(registry)
    steps = rng.uniform(0.011, 0.013, size=600)
    slow = rng.uniform(0.030, 0.060, size=40)
    for v in steps:
        hist.observe(float(v))
    for i, v in enumerate(slow):
        behind.labels(tp_rank=str(i % 2)).observe(float(v))
    after = _scrape(registry)
    got = load_quantiles(before, after)
    assert got["steps"] == 600 and got["p99"] == pytest.approx(float(np.quantile(steps, 0.99)), rel=0.05)
    assert got["behind_prefill"]["steps"] == 40
    assert got["behind_prefill"]["p50"] == pytest.approx(float(np.median(slow)), rel=0.05)
    assert got["behind_prefill"]["p99"] == pytest.approx(float(np.quantile(slow, 0.99)), rel=0.05)
    (tmp_path / "b.txt").write_text(before)
    (tmp_path / "a.txt").write_text(after)
    assert main([str(tmp_path / "b.txt"), str(tmp_path / "a.txt")]) == 0
    line, ms = capsys.readouterr().out, {k: got["behind_prefill"][k] * 1e3 for k in ("p50", "p99")}
    assert line.rstrip().endswith(f"behind a prefill (not counted above) 40, p50 {ms['p50']:.2f} ms, "
                                  f"p99 {ms['p99']:.2f} ms")
    plain_registry = CollectorRegistry()
    plain = Histogram(METRIC, "decode steps", buckets=DECODE_STEP_BUCKETS, registry=plain_registry)
    plain_before = _scrape(plain_registry)
    plain.observe(0.012)
    assert load_quantiles(plain_before, _scrape(plain_registry))["behind_prefill"] is None
