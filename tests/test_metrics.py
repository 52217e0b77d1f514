# SPDX-License-Identifier: Apache-2.0
"""MosaicKV metrics (``mosaickv_sglang/metrics.py``, ``patches/metrics.py``) on a real CPU pool and sealer.

The snapshot's strategy histogram and ratios against the plans and the store, the Prometheus series in a fresh
registry and across processes through SGLang's multiprocess directory (written by a scheduler-like child, read as the
HTTP server's ``/metrics`` reads it), the hook's no-op cases, the status log line, and the README's metric list.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch

pytest.importorskip("sglang")
sys.path.insert(0, str(Path(__file__).resolve().parent / "integration_cpu"))  # helper modules (importlib mode)

from mkv_metrics_cases import LABELS, sealed_pool, write_pages  # noqa: E402
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from test_kv_pool import D, DT, GROUP, H_KV, LAYERS, S, _config, build_pool  # noqa: E402

from mosaickv_sglang import runtime  # noqa: E402
from mosaickv_sglang.kernels.format import FORM_CHAN, FORM_DENSE, FORM_LOWRANK, SegmentPlan  # noqa: E402
from mosaickv_sglang.metrics import (  # noqa: E402
    DECODE_STEP_BEHIND_PREFILL_METRIC,
    DECODE_STEP_METRIC,
    METRICS,
    STRATEGY_METRIC,
    STRATEGY_NAMES,
    MosaicMetricsExporter,
    StrategyCounter,
    collect_stats,
    strategy_name,
)
from mosaickv_sglang.patches import metrics as metrics_hooks  # noqa: E402
from mosaickv_sglang.patches import seam  # noqa: E402
from mosaickv_sglang.pool import PAGE_SEALED, dense_bytes_per_token  # noqa: E402
from mosaickv_sglang.sealer import Sealer  # noqa: E402
from mosaickv_sglang.sidecar.client import SidecarCounters  # noqa: E402
from mosaickv_sglang.strategies import STRATEGIES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class StandInSidecarBridge:
    """Test stand-in for the sidecar bridge (``Sealer.sidecar``): its counters, applied/discarded totals and
    re-segmentation switch only."""

    def __init__(self, counters: SidecarCounters, plans_applied: int, plans_discarded: int, segments_applied: int,
                 resegment: bool = True, seconds: tuple = (0.0, 0.0, 0.0), parts: tuple = (0.0, 0.0),
                 io_seconds: float = 0.0, staging_full_batches: int = 0):  # fmt: skip
        self._counters = counters
        self.plans_applied, self.plans_discarded = plans_applied, plans_discarded
        self.segments_applied = segments_applied
        self.resegment = resegment
        self.resegment_pooled = 0
        self.tick_seconds, self.submit_seconds, self.idle_seconds = seconds
        self.land_seconds, self.apply_seconds = parts
        self.io_seconds = io_seconds
        self.staging_full_batches = staging_full_batches
        self.slowest: Dict[str, float] = {}

    def take_slowest(self) -> Dict[str, float]:
        out, self.slowest = self.slowest, {}
        return out

    @property
    def step_seconds(self) -> float:
        return self.tick_seconds + self.submit_seconds

    def counters(self) -> SidecarCounters:
        return self._counters


def _histogram_of_plans(plans) -> Dict[str, int]:
    """Reference: the strategy of every segment of every plan, counted on the host one row at a time."""
    out = Counter()
    for plan in plans:
        for n in range(plan.num_segments):
            kept = int(plan.token_keep[n].sum())
            out[strategy_name(kept < plan.seg_size, int(plan.k_form[n]), int(plan.v_form[n]))] += 1
    return {name: out.get(name, 0) for name in STRATEGY_NAMES}


def _samples(registry) -> Dict[tuple, float]:
    """``{(sample name, sorted labels): value}`` of the registry's /metrics text."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def _key(name: str, labels: dict, **extra: str) -> tuple:
    return name, tuple(sorted({**{k: str(v) for k, v in labels.items()}, **extra}.items()))


def test_strategy_names_are_distinct_and_extend_the_strategy_registry():
    """One name per (tokens dropped, K form, V form); the homogeneous ones are the STRATEGIES names."""
    assert len(set(STRATEGY_NAMES)) == len(STRATEGY_NAMES) == 18
    assert {"dense", "chan-k", "lowrank-r", "tok-m", "tok-m/chan-k"} <= set(STRATEGY_NAMES) & set(STRATEGIES)
    assert strategy_name(True, FORM_CHAN, FORM_LOWRANK) == "tok-m/K:chan-k|V:lowrank-r"
    assert strategy_name(False, FORM_DENSE, FORM_CHAN) == "K:dense|V:chan-k"


def _plan(forms, rank: int = 4) -> SegmentPlan:
    """A plan of ``len(forms)`` segments; ``forms[i] = (kept tokens, K form, V form)``."""
    n = len(forms)
    i32 = dict(dtype=torch.int32)
    keep = torch.zeros(n, S, dtype=torch.bool)
    for i, (m, _, _) in enumerate(forms):
        keep[i, :m] = True

    def param(form: int) -> int:
        return {FORM_DENSE: 0, FORM_CHAN: 16, FORM_LOWRANK: rank}[form]

    gen = torch.Generator().manual_seed(n)
    factors = (torch.randn(n, S, rank, generator=gen), torch.randn(n, rank, D, generator=gen))
    return SegmentPlan(
        token_keep=keep,
        k_form=torch.tensor([f[1] for f in forms], **i32), k_param=torch.tensor([param(f[1]) for f in forms], **i32),
        v_form=torch.tensor([f[2] for f in forms], **i32), v_param=torch.tensor([param(f[2]) for f in forms], **i32),
        k_chan_weight=torch.ones(n, D), v_chan_weight=torch.ones(n, D), k_factors=factors, v_factors=factors,
    )  # fmt: skip


def test_histogram_counts_each_sealed_segment_of_each_layer_and_ignores_freed_pages():
    """Two pages (6 segments per layer) sealed with hand-made plans that differ per layer: the histogram is exactly
    the per-layer counts summed; after one page is freed its (stale) descriptor rows no longer count."""
    d, c, lr = FORM_DENSE, FORM_CHAN, FORM_LOWRANK
    layer0 = [(S, d, d), (S // 2, d, d), (S, c, c), (S // 2, c, c), (S, c, d), (S // 4, c, lr)]
    layer1 = [(S, lr, lr), (S, lr, lr), (S, c, c), (S, d, d), (S // 2, d, d), (S // 2, d, d)]
    pool = build_pool(64 * S, 32 * S, _config(ratio=3.0))
    pages = np.array([3, 7], dtype=np.int64)
    write_pages(pool, pages)
    pool.seal_pages(torch.from_numpy(pages), [_plan(layer0), _plan(layer1)])
    sealer = Sealer(pool, num_q_heads=H_KV * GROUP)
    expected = {name: 0 for name in STRATEGY_NAMES}
    expected.update({"dense": 2, "tok-m": 3, "chan-k": 2, "tok-m/chan-k": 1, "K:chan-k|V:dense": 1,
                     "tok-m/K:chan-k|V:lowrank-r": 1, "lowrank-r": 2})  # fmt: skip
    assert collect_stats(sealer).strategy_segments == expected
    pool.free_pages(torch.tensor([7]))
    # page 3 holds segments 0..2 of each layer
    expected = {name: 0 for name in STRATEGY_NAMES}
    expected.update({"dense": 1, "tok-m": 1, "chan-k": 2, "lowrank-r": 2})
    assert collect_stats(sealer).strategy_segments == expected


class _LandsWhenTold:
    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done


def test_the_late_strategy_counter_returns_the_last_count_that_landed_without_waiting(monkeypatch):
    """As on CUDA (a fake copy event): a read queues a count and returns the last one landed (zeros at first); while
    a count is on its way no other is queued; once it lands the next read returns it. Off CUDA: read at once."""
    pool, sealer, plans = sealed_pool(ratio=3.0, written=6, sealed=4)
    want = _histogram_of_plans(plans)
    events = []

    def start_copy(counts):
        events.append(_LandsWhenTold())
        return counts.clone(), events[-1]

    counter = StrategyCounter(late=True)
    monkeypatch.setattr(counter, "_start_copy", start_copy)
    assert collect_stats(sealer, counter).strategy_segments == dict.fromkeys(STRATEGY_NAMES, 0)
    assert counter.read(pool.store) == dict.fromkeys(STRATEGY_NAMES, 0) and len(events) == 1  # still on its way
    events[0].done = True
    assert counter.read(pool.store) == want and len(events) == 2
    pool.free_pages(torch.tensor([int(np.flatnonzero(pool.store.page_state().numpy() == PAGE_SEALED)[0])]))
    events[1].done = True
    fewer = counter.read(pool.store)  # the count queued before the free
    assert fewer == want and len(events) == 3
    events[2].done = True
    assert sum(counter.read(pool.store).values()) == sum(want.values()) - H_KV * LAYERS
    assert StrategyCounter().read(pool.store) == collect_stats(sealer).strategy_segments  # a CPU store: at once


def test_collect_stats_after_real_sealing_matches_the_plans_and_the_store():
    """Four pages sealed by the sealer's fast planner at ratio 3 (one dense sink), two more written and hot: the
    histogram is the plans' strategies, the ratio the store's, and bytes per token follows its definition."""
    pool, sealer, plans = sealed_pool(ratio=3.0, written=6, sealed=4)
    stats = collect_stats(sealer)
    assert stats.strategy_segments == _histogram_of_plans(plans)
    assert sum(stats.strategy_segments.values()) == pool.store.sealed_segments() == 4 * H_KV * LAYERS
    assert stats.strategy_segments["dense"] < 4 * H_KV * LAYERS  # the planner compressed something
    assert stats.compression_ratio == pool.store.compression_ratio() > 1.5
    dense = dense_bytes_per_token(LAYERS, H_KV, D, DT)
    assert stats.dense_bytes_per_token == dense and stats.tokens_held == 6 * S
    assert stats.bytes_per_token == pytest.approx((pool.store.bytes_used() + 2 * S * dense) / (6 * S))
    assert stats.bytes_per_token < dense
    assert (stats.pages_sealed, stats.pressure_pages_sealed, stats.pages_left_dense) == (4, 0, 0)
    assert stats.seal_calls == 1 and stats.seal_seconds > 0  # one call for the four pages
    assert (stats.decode_plans, stats.decode_plan_seconds) == (sealer.decode_plans, sealer.decode_plan_seconds)
    ledger = pool.arena_ledger
    assert stats.arena_reserved_fraction == ledger.reserved / ledger.capacity > 0
    assert stats.free_hot_pages == pool.num_free_physical_pages
    assert stats.admissible_tokens == pool.admissible_tokens()
    assert stats.sidecar is None


@pytest.fixture(scope="module")
def sealed():
    return sealed_pool(ratio=3.0, written=6, sealed=4)


def test_exporter_writes_every_series_with_sglang_labels(sealed):
    """Into a fresh registry: each gauge and counter with its value and SGLang's labels, one strategy series per
    name; with the sidecar off no sidecar series; counters advance by their totals' growth."""
    pool, sealer, _ = sealed
    registry = CollectorRegistry()
    exporter = MosaicMetricsExporter(LABELS, registry=registry)
    stats = collect_stats(sealer)
    exporter.export(stats)
    got = _samples(registry)
    assert got[_key("sglang:mosaic_compression_ratio", LABELS)] == pytest.approx(stats.compression_ratio)
    assert got[_key("sglang:mosaic_bytes_per_token", LABELS)] == pytest.approx(stats.bytes_per_token)
    assert got[_key("sglang:mosaic_arena_reserved_ratio", LABELS)] == pytest.approx(stats.arena_reserved_fraction)
    assert got[_key("sglang:mosaic_pages_sealed_total", LABELS)] == 4
    assert got[_key("sglang:mosaic_admissible_tokens", LABELS)] == pool.admissible_tokens()
    for name, count in stats.strategy_segments.items():
        assert got[_key(STRATEGY_METRIC, LABELS, strategy=name)] == count
    assert not [k for k in got if "sidecar" in k[0] or k[0].startswith("sglang:mosaic_plans_")]

    sealer.decode_plans, sealer.decode_plan_seconds = 40, 0.125
    sealer.decode_plan_seal_seconds, sealer.decode_plan_sidecar_seconds = 0.0625, 0.03125
    sealer.sidecar = StandInSidecarBridge(SidecarCounters(submitted=9, completed=6, queue_depth=2, resegmentations=1),
                                          plans_applied=3, plans_discarded=1, segments_applied=36,
                                          seconds=(0.125, 0.25, 0.5))  # fmt: skip
    try:
        exporter.export(collect_stats(sealer))
        sealer.sidecar = StandInSidecarBridge(SidecarCounters(submitted=12, completed=10, queue_depth=1,
                                                              resegmentations=2), 5, 1, 60,
                                              seconds=(0.25, 0.5, 1.0), parts=(0.0625, 0.125),
                                              io_seconds=2.5, staging_full_batches=3)  # fmt: skip
        exporter.export(collect_stats(sealer))
    finally:
        sealer.sidecar = None
    got = _samples(registry)
    expected = {"sidecar_queue_depth": 1, "sidecar_submitted_total": 12, "sidecar_completed_total": 10,
                "sidecar_failed_total": 0, "resegmentations_total": 2, "plans_applied_total": 5,
                "plans_discarded_total": 1, "segments_applied_total": 60, "pages_sealed_total": 4,
                "sidecar_step_seconds_total": 0.75, "sidecar_idle_seconds_total": 1.0,
                "sidecar_submit_seconds_total": 0.5, "sidecar_land_seconds_total": 0.0625,
                "sidecar_apply_seconds_total": 0.125, "sidecar_io_thread_seconds_total": 2.5,
                "sidecar_staging_full_total": 3,
                "seal_calls_total": 1, "decode_plans_total": 40, "decode_plan_seconds_total": 0.125,
                "decode_plan_seal_seconds_total": 0.0625, "decode_plan_sidecar_seconds_total": 0.03125}  # fmt: skip
    assert {k: got[_key(f"sglang:mosaic_{k}", LABELS)] for k in expected} == expected


def test_series_cross_processes_through_the_multiprocess_dir(tmp_path, llama_shape):
    """A scheduler-like child (SGLang's own collector and labels, its reporter, the real hook) writes into
    PROMETHEUS_MULTIPROC_DIR; SGLang's /metrics aggregation (MultiProcessCollector on a fresh registry) shows the
    MosaicKV series with the child's values, exported once although the hook ran twice."""
    from prometheus_client import multiprocess

    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    out = tmp_path / "child.json"
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(prom_dir),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))  # fmt: skip
    child = REPO / "tests" / "integration_cpu" / "mkv_metrics_cases.py"
    proc = subprocess.run([sys.executable, str(child), str(out), str(llama_shape)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["refreshed_once"]
    stats, labels = result["stats"], result["labels"]
    assert labels == {"model_name": str(llama_shape), "engine_type": "unified", "tp_rank": "0", "pp_rank": "0",
                      "moe_ep_rank": "0"}  # fmt: skip
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(prom_dir))
    got = _samples(registry)
    assert got[_key("sglang:mosaic_compression_ratio", labels)] == pytest.approx(stats["compression_ratio"])
    assert got[_key("sglang:mosaic_bytes_per_token", labels)] == pytest.approx(stats["bytes_per_token"])
    assert got[_key("sglang:mosaic_pages_sealed_total", labels)] == stats["pages_sealed"] == 4
    for name, count in stats["strategy_segments"].items():
        assert got[_key(STRATEGY_METRIC, labels, strategy=name)] == count
    assert sum(stats["strategy_segments"].values()) == 4 * H_KV * LAYERS


@pytest.fixture()
def registered(sealed):
    """The sealed pool's sealer registered as this process's (as the mosaic backend does), the previous one after."""
    before = runtime.current_sealer()
    runtime.register_sealer(sealed[1])
    yield sealed[1]
    runtime.register_sealer(before)


def _reporter(enabled: bool):
    from sglang.srt.managers.scheduler_components.metrics_reporter import SchedulerMetricsReporter

    reporter = object.__new__(SchedulerMetricsReporter)
    setattr(reporter, seam.REPORTER_METRICS_ENABLED_ATTR, enabled)
    setattr(reporter, seam.REPORTER_COLLECTOR_ATTR, None)  # SGLang's value without --enable-metrics
    return reporter


def test_hook_is_a_no_op_without_metrics_through_sglangs_hooked_method(sglang_with_plugin, registered):
    """Without --enable-metrics, SGLang's hooked report_prefill_stats returns early and our AFTER hook exports
    nothing (it would fail on the missing collector otherwise)."""
    from sglang.srt.managers.scheduler_components.metrics_reporter import SchedulerMetricsReporter

    reporter = _reporter(enabled=False)
    reporter.is_stats_logging_rank = False
    assert hasattr(SchedulerMetricsReporter.report_prefill_stats, "__wrapped__")
    SchedulerMetricsReporter.report_prefill_stats(reporter, None, None, False)
    assert getattr(reporter, seam.METRICS_EXPORTER_ATTR, None) is None


def test_hook_is_a_no_op_without_mosaic():
    """Metrics on but no mosaic backend in this process (--kv-compressor none): nothing is created."""
    before = runtime.current_sealer()  # other tests' backends may have registered one
    runtime.register_sealer(None)
    try:
        reporter = _reporter(enabled=True)
        metrics_hooks.refresh_mosaic_metrics(None, reporter)
        assert getattr(reporter, seam.METRICS_EXPORTER_ATTR, None) is None
    finally:
        runtime.register_sealer(before)


def test_hook_failure_turns_mosaic_metrics_off_without_raising(registered, caplog):
    """A failing export (here: no collector to take labels from) logs one warning and never reaches the scheduler."""
    reporter = _reporter(enabled=True)
    with caplog.at_level(logging.WARNING, logger=metrics_hooks.__name__):
        metrics_hooks.refresh_mosaic_metrics(None, reporter)
        metrics_hooks.refresh_mosaic_metrics(None, reporter)
    assert getattr(reporter, seam.METRICS_EXPORTER_ATTR) is False
    assert len([r for r in caplog.records if "metrics export failed" in r.getMessage()]) == 1


def test_refresh_is_rate_limited(sealed):
    """maybe_refresh exports at most once per interval."""
    exporter = MosaicMetricsExporter(LABELS, registry=CollectorRegistry(), interval=5.0)
    assert exporter.maybe_refresh(sealed[1], now=100.0)
    assert not exporter.maybe_refresh(sealed[1], now=104.9)
    assert exporter.maybe_refresh(sealed[1], now=105.0)
    with pytest.raises(ValueError, match="interval: expected seconds >= 0, got -1"):
        MosaicMetricsExporter(LABELS, registry=CollectorRegistry(), interval=-1)


def test_status_line_has_compression_ratio_and_sidecar_fields(caplog):
    """The sealer's periodic line keeps its fields and adds the compression ratio and, with the sidecar, its queue
    depth, plans applied/discarded, re-segmentations (``resegment off`` when it is off) and the slowest unit of each
    kind of tick work since the last line."""
    from mosaickv_sglang import sealer as sealer_mod

    pool, sealer, _ = sealed_pool(ratio=3.0, written=4, sealed=4)
    t0 = sealer._logged_at
    with caplog.at_level(logging.INFO, logger=sealer_mod.__name__):
        sealer.maybe_log_status(t0 + sealer_mod.STATUS_LOG_INTERVAL + 1)
        sealer.sidecar = StandInSidecarBridge(SidecarCounters(queue_depth=3, resegmentations=2), 7, 4, 84)
        sealer.pages_sealed += 1  # something new to report
        sealer.maybe_log_status(t0 + 2 * sealer_mod.STATUS_LOG_INTERVAL + 2)
        sealer.sidecar = StandInSidecarBridge(SidecarCounters(queue_depth=1), 8, 4, 96, resegment=False)
        sealer.pages_sealed += 1
        sealer.maybe_log_status(t0 + 3 * sealer_mod.STATUS_LOG_INTERVAL + 3)
        sealer.sidecar.slowest = {"apply": 0.0021, "job": 0.0172}
        sealer.pages_sealed += 1
        sealer.maybe_log_status(t0 + 4 * sealer_mod.STATUS_LOG_INTERVAL + 4)
        sealer.pages_sealed += 1
        sealer.maybe_log_status(t0 + 5 * sealer_mod.STATUS_LOG_INTERVAL + 5)  # taken: not shown again
    sealer.sidecar = None
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("MosaicKV: ")]
    assert len(lines) == 5
    ratio = f"compression ratio {pool.store.compression_ratio():.2f}"
    assert lines[3].endswith("resegment off, slowest units job 17.2 ms, apply 2.1 ms")
    assert lines[4].endswith("resegment off")
    assert lines[0].startswith("MosaicKV: 4 pages sealed (0 under hot-pool pressure") and lines[0].endswith(ratio)
    assert f"arena room) in 1 calls ({sealer.seal_seconds:.1f} s, planning {sealer.seal_plan_seconds:.1f} s), " \
        "arena " in lines[0]
    assert 0 < sealer.seal_plan_seconds <= sealer.seal_seconds
    assert lines[1].endswith(f"{ratio}; sidecar: 3 jobs queued, 7 plans applied, 4 discarded, 2 re-segmentations")
    assert lines[2].endswith(f"{ratio}; sidecar: 1 jobs queued, 8 plans applied, 4 discarded, resegment off")


def test_readme_documents_every_metric():
    """Each exported series is named in the README."""
    readme = (REPO / "README.md").read_text()
    names = [m.name for m in METRICS] + [STRATEGY_METRIC, DECODE_STEP_METRIC, DECODE_STEP_BEHIND_PREFILL_METRIC]
    missing = [n for n in names if f"`{n}`" not in readme and f"`{n}{{" not in readme]
    assert missing == []


def test_stats_are_a_frozen_snapshot(sealed):
    """MosaicStats cannot be changed after collection."""
    stats = collect_stats(sealed[1])
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.pages_sealed = 0  # type: ignore[misc]


def test_reporter_attributes_the_hook_reads_exist_in_sglang():
    """SchedulerMetricsReporter has the collector field and sets the per-scheduler metrics switch the hook reads;
    the collector keeps its label dict under the name the seam gives."""
    import inspect

    from sglang.srt.managers.scheduler_components.metrics_reporter import SchedulerMetricsReporter
    from sglang.srt.observability.metrics_collector import SchedulerMetricsCollector

    assert seam.REPORTER_COLLECTOR_ATTR in {f.name for f in dataclasses.fields(SchedulerMetricsReporter)}
    assert f"self.{seam.REPORTER_METRICS_ENABLED_ATTR} = " in inspect.getsource(SchedulerMetricsReporter.__post_init__)
    assert f"self.{seam.COLLECTOR_LABELS_ATTR} = labels" in inspect.getsource(SchedulerMetricsCollector.__init__)


class StandInScheduler:
    """Test stand-in for SGLang's Scheduler: only the metrics reporter and the overlap flag the step hook reads."""

    def __init__(self, reporter, enable_overlap=False):
        setattr(self, seam.SCHEDULER_REPORTER_ATTR, reporter)
        setattr(self, seam.SCHEDULER_OVERLAP_ATTR, enable_overlap)


def _batch(mode):
    from sglang.srt.managers.schedule_batch import ScheduleBatch

    batch = object.__new__(ScheduleBatch)
    batch.forward_mode = mode
    return batch


def test_decode_step_periods_reach_the_histogram_and_its_quantiles(registered):
    """The BEFORE run_batch hook times decode-after-decode steps only; the next refresh drains them into
    sglang:mosaic_decode_step_seconds, and bench.decode_steps reads the load's count and quantiles from the scrape."""
    import time

    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from bench.decode_steps import load_quantiles

    reporter = _reporter(enabled=True)
    registry = CollectorRegistry()
    setattr(reporter, seam.METRICS_EXPORTER_ATTR, MosaicMetricsExporter(LABELS, registry=registry))
    scheduler = StandInScheduler(reporter)
    before = generate_latest(registry).decode()
    for mode in (ForwardMode.DECODE, ForwardMode.DECODE, ForwardMode.EXTEND, ForwardMode.DECODE, ForwardMode.DECODE,
                 ForwardMode.DECODE):  # fmt: skip
        metrics_hooks.time_decode_steps(scheduler, _batch(mode))
        time.sleep(0.004)
    timer = getattr(reporter, seam.STEP_TIMER_ATTR)
    assert len(timer._pending) == 3
    metrics_hooks.refresh_mosaic_metrics(None, reporter)
    after = generate_latest(registry).decode()
    got = _samples(registry)
    assert got[_key(DECODE_STEP_METRIC + "_count", LABELS)] == 3
    assert 3 * 0.004 <= got[_key(DECODE_STEP_METRIC + "_sum", LABELS)] < 3 * 0.2
    q = load_quantiles(before, after)
    assert q["steps"] == 3 and 0.004 <= q["p50"] <= q["p99"] < 0.2
    assert timer.drain() == []


def test_under_the_overlap_scheduler_the_period_after_a_prefill_reaches_its_own_histogram(registered):
    """With the scheduler's overlap loop on, the decode period that waited for a prefill's result goes to
    sglang:mosaic_decode_step_behind_prefill_seconds, not the decode step histogram; bench.decode_steps reads both."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from bench.decode_steps import load_quantiles

    reporter = _reporter(enabled=True)
    registry = CollectorRegistry()
    setattr(reporter, seam.METRICS_EXPORTER_ATTR, MosaicMetricsExporter(LABELS, registry=registry))
    before = generate_latest(registry).decode()
    modes = [ForwardMode.EXTEND] + [ForwardMode.DECODE] * 4 + [ForwardMode.EXTEND] + [ForwardMode.DECODE] * 3
    for overlap in (True, False):
        scheduler = StandInScheduler(reporter, enable_overlap=overlap)
        for mode in modes:
            metrics_hooks.time_decode_steps(scheduler, _batch(mode))
    metrics_hooks.refresh_mosaic_metrics(None, reporter)
    got = _samples(registry)
    # overlapped: 3 + 2 decode periods, of which the first after each prefill (2) waited for it; then 3 + 2 plain
    assert got[_key(DECODE_STEP_METRIC + "_count", LABELS)] == 3 + 5
    assert got[_key(DECODE_STEP_BEHIND_PREFILL_METRIC + "_count", LABELS)] == 2
    q = load_quantiles(before, generate_latest(registry).decode())
    assert q["steps"] == 8 and q["behind_prefill"]["steps"] == 2


def test_step_hook_reads_the_schedulers_overlap_flag():
    """SGLang 0.5.17 still picks its overlap loop by the flag the step hook reads, and that loop still launches a
    batch before it processes the result of the one before (what makes the period after a prefill hold it)."""
    import inspect
    import re

    from sglang.srt.managers import scheduler as scheduler_module

    assert f"self.{seam.SCHEDULER_OVERLAP_ATTR} = " in inspect.getsource(scheduler_module.Scheduler.__init__)
    dispatch = inspect.getsource(scheduler_module.dispatch_event_loop)
    assert re.search(rf"elif scheduler\.{seam.SCHEDULER_OVERLAP_ATTR}:\s+scheduler\.event_loop_overlap\(\)", dispatch)
    loop = inspect.getsource(scheduler_module.Scheduler.event_loop_overlap)
    launch = loop.index("self.run_batch(batch)")
    assert loop.index("if not disable_overlap_for_batch:\n                    pop_and_process()") > launch


def test_step_trace_reads_the_schedulers_forward_stream():
    """SGLang 0.5.17's Scheduler keeps the stream its forwards run on under the name the step trace records its GPU
    events on (from its worker's info, entered around each forward); anything but a CUDA stream gives no events."""
    import inspect
    import re
    import types

    from sglang.srt.managers import scheduler as scheduler_module

    src = inspect.getsource(scheduler_module.Scheduler)
    attr = seam.SCHEDULER_FORWARD_STREAM_ATTR
    assert re.search(rf"self\.{attr},\s+_,\s+_,\s+_,\s+\) = self\.tp_worker\.get_worker_info\(\)", src)
    assert re.search(rf"with self\.forward_stream_ctx:\s+self\.{attr}\.wait_stream\(self\.schedule_stream\)", src)
    assert metrics_hooks._forward_stream(types.SimpleNamespace(**{attr: object()})) is None
    assert metrics_hooks._forward_stream(object()) is None


def test_step_hook_is_a_no_op_without_metrics_or_mosaic(registered):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    off = _reporter(enabled=False)
    metrics_hooks.time_decode_steps(StandInScheduler(off), _batch(ForwardMode.DECODE))
    assert getattr(off, seam.STEP_TIMER_ATTR, None) is None
    metrics_hooks.time_decode_steps(StandInScheduler(None), _batch(ForwardMode.DECODE))
    runtime.register_sealer(None)
    on = _reporter(enabled=True)
    metrics_hooks.time_decode_steps(StandInScheduler(on), _batch(ForwardMode.DECODE))
    assert getattr(on, seam.STEP_TIMER_ATTR, None) is None


def test_step_trace_hook_writes_a_row_a_step_with_the_sealers_counts(registered, monkeypatch, tmp_path):
    """With MOSAICKV_STEP_TRACE set, apply() registers the trace's hooks; BEFORE run_batch each step is a row with the
    real Sealer's counts, flushed when the scheduler goes idle; a stock server's rows leave them empty."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from bench.step_trace import read_trace
    from mosaickv_sglang.step_trace import SEALER_COUNTS, STEP_TRACE_ENV

    monkeypatch.setattr(metrics_hooks, "_trace", None)
    monkeypatch.setenv(STEP_TRACE_ENV, str(tmp_path / "trace"))
    hooked = []
    monkeypatch.setattr(seam, "register_hook", lambda target, fn, kind: hooked.append((target, fn, kind)))
    metrics_hooks.apply()
    assert (seam.SCHEDULER_RUN_BATCH, metrics_hooks.trace_steps, "BEFORE") in hooked
    assert (seam.SCHEDULER_ON_IDLE, metrics_hooks.flush_step_trace, "AFTER") in hooked
    for name in SEALER_COUNTS:
        assert isinstance(getattr(registered, name), int)
    scheduler = StandInScheduler(None, enable_overlap=True)
    for mode, size in ((ForwardMode.EXTEND, 2), (ForwardMode.DECODE, 3), (ForwardMode.DECODE, 3)):
        batch = _batch(mode)
        batch.reqs, batch.seq_lens_sum = [object()] * size, 1000 * size
        metrics_hooks.trace_steps(scheduler, batch)
    registered.seal_calls += 1  # as a seal would
    batch.seq_lens_sum, batch.seq_lens_cpu = None, torch.tensor([1001, 1002, 1003])  # as SGLang's decode batches
    metrics_hooks.trace_steps(scheduler, batch)
    metrics_hooks.flush_step_trace(scheduler)
    cols = read_trace(str(tmp_path / f"trace.{os.getpid()}.csv"))
    assert cols["decode"].tolist() == [0, 1, 1, 1] and cols["overlapped"].tolist() == [1, 1, 1, 1]
    assert cols["batch_size"].tolist() == [2, 3, 3, 3] and cols["context_tokens"].tolist() == [2000, 3000, 3000, 3006]
    assert cols["seal_calls"][3] == cols["seal_calls"][2] + 1
    runtime.register_sealer(None)
    metrics_hooks.trace_steps(scheduler, batch)
    metrics_hooks.flush_step_trace(scheduler)
    last = (tmp_path / f"trace.{os.getpid()}.csv").read_text().splitlines()[-1].split(",")
    assert last[5:5 + len(SEALER_COUNTS)] == [""] * len(SEALER_COUNTS)
    monkeypatch.delenv(STEP_TRACE_ENV)
    hooked.clear()
    metrics_hooks.apply()
    assert all(fn is not metrics_hooks.trace_steps for _, fn, _ in hooked)


def test_schedule_batch_keeps_the_fields_the_step_trace_reads():
    """SGLang 0.5.17's ScheduleBatch: the extend batches' seq_lens_sum, and decode batches' host seq_lens_cpu, which
    prepare_for_decode keeps current while it sets the sum to None."""
    import dataclasses as dc
    import inspect

    from sglang.srt.managers.schedule_batch import ScheduleBatch

    fields = {f.name for f in dc.fields(ScheduleBatch)}
    assert {seam.BATCH_SEQ_LENS_SUM_ATTR, seam.BATCH_SEQ_LENS_CPU_ATTR} <= fields
    decode = inspect.getsource(ScheduleBatch.prepare_for_decode)
    assert f"self.{seam.BATCH_SEQ_LENS_CPU_ATTR} = self.{seam.BATCH_SEQ_LENS_CPU_ATTR} + 1" in decode
    assert f"self.{seam.BATCH_SEQ_LENS_SUM_ATTR} = None" in decode


def test_run_batch_takes_the_batch_first_and_the_scheduler_keeps_its_reporter():
    """The step hook's reading of SGLang 0.5.17: run_batch(self, batch, ...) and self.metrics_reporter."""
    import inspect

    from sglang.srt.managers.scheduler import Scheduler

    assert list(inspect.signature(Scheduler.run_batch).parameters)[:2] == ["self", "batch"]
    assert f"self.{seam.SCHEDULER_REPORTER_ATTR} = SchedulerMetricsReporter(" in inspect.getsource(Scheduler)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_strategy_counts_copy_lands_in_pinned_memory_on_cuda():
    counts = torch.arange(len(STRATEGY_NAMES), dtype=torch.int64, device="cuda") * 7
    host, event = StrategyCounter._start_copy(counts)
    event.synchronize()
    assert event.query() and host.is_pinned() and host.tolist() == counts.tolist()
