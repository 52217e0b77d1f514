# SPDX-License-Identifier: Apache-2.0
"""HostStalls: the slowest decode plans and the garbage-collection pauses between two status lines."""

from __future__ import annotations

import gc
import random
from types import SimpleNamespace

import pytest

from mosaickv_sglang.host_stalls import HostStalls


def test_keeps_the_slowest_plans_in_order_then_starts_over():
    stalls = HostStalls(keep=3)
    times = [0.001 * i for i in range(1, 41)]
    random.Random(5).shuffle(times)
    for t in times:
        stalls.note_plan(t, t / 2, t / 4, t / 8, t / 10, t / 20)
    assert stalls.summary() == (
        "; slowest decode plans 40.0 ms (seal 20.0, sidecar 10.0, rows 5.0, gc 4.0, copies 2.0), 39.0 ms (seal 19.5, "
        "sidecar 9.8, rows 4.9, gc 3.9, copies 1.9), 38.0 ms (seal 19.0, sidecar 9.5, rows 4.8, gc 3.8, copies 1.9)"
    )
    assert stalls.summary() == ""  # nothing since


def test_times_garbage_collections_while_installed():
    stalls = HostStalls()
    stalls.install()
    stalls.install()  # once
    try:
        assert gc.callbacks.count(stalls.on_gc) == 1
        gc.collect()
        gc.collect(0)
    finally:
        stalls.uninstall()
    assert stalls.on_gc not in gc.callbacks
    line = stalls.summary()
    assert line.startswith("; gc 2 collections, ") and "longest" in line
    gc.collect()
    assert stalls.summary() == ""


def test_pauses_are_measured_from_start_to_stop(monkeypatch):
    import mosaickv_sglang.host_stalls as mod

    stalls = HostStalls()
    clock = iter([10.0, 10.004, 20.0, 20.030])
    monkeypatch.setattr(mod.time, "perf_counter", lambda: next(clock))
    stalls.on_gc("start", {"generation": 0})
    stalls.on_gc("stop", {"generation": 0})
    stalls.on_gc("stop", {"generation": 1})  # a stop without its start (installed mid-collection): ignored
    stalls.on_gc("start", {"generation": 2})
    stalls.on_gc("stop", {"generation": 2})
    monkeypatch.undo()
    assert stalls.summary() == "; gc 2 collections, 34.0 ms, longest 30.0 ms (generation 2)"
    assert stalls.gc_seconds_total == pytest.approx(0.034)  # not reset by the summary: plans take differences
    assert stalls.summary() == ""


def test_bad_keep_is_refused():
    with pytest.raises(ValueError, match="keep: expected an integer >= 1, got 0"):
        HostStalls(keep=0)


def test_the_registered_sealer_times_collections():
    """runtime.register_sealer installs the sealer's HostStalls and uninstalls the previous one's."""
    from mosaickv_sglang.runtime import register_sealer

    a, b = SimpleNamespace(stalls=HostStalls()), SimpleNamespace(stalls=HostStalls())
    try:
        register_sealer(a)
        assert a.stalls.on_gc in gc.callbacks
        register_sealer(b)
        assert a.stalls.on_gc not in gc.callbacks and b.stalls.on_gc in gc.callbacks
        register_sealer(SimpleNamespace())  # a sealer without stalls (a test double)
        assert b.stalls.on_gc not in gc.callbacks
    finally:
        register_sealer(None)


def test_status_interval_from_the_environment(monkeypatch):
    from mosaickv_sglang.sealer import STATUS_LOG_INTERVAL, status_interval

    monkeypatch.delenv("MOSAICKV_STATUS_INTERVAL", raising=False)
    assert status_interval() == STATUS_LOG_INTERVAL
    monkeypatch.setenv("MOSAICKV_STATUS_INTERVAL", " 5 ")
    assert status_interval() == 5.0
    for bad in ("-1", "soon", "nan"):
        monkeypatch.setenv("MOSAICKV_STATUS_INTERVAL", bad)
        with pytest.raises(ValueError, match=f"MOSAICKV_STATUS_INTERVAL: expected seconds >= 0, got '{bad}'"):
            status_interval()
