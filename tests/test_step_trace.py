# SPDX-License-Identifier: Apache-2.0
"""The step trace (MOSAICKV_STEP_TRACE) and bench.step_trace's reading of it."""

from __future__ import annotations

import gzip
import types

import numpy as np
import pytest

from bench import step_trace as reader
from mosaickv_sglang import step_trace
from mosaickv_sglang.step_trace import FIELDS, SEALER_COUNTS, StepTrace


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _sealer(sidecar_applied=None):
    sealer = types.SimpleNamespace(**{name: 0 for name in SEALER_COUNTS})
    sealer.sidecar = None if sidecar_applied is None else types.SimpleNamespace(plans_applied=sidecar_applied)
    return sealer


def test_prefix_is_read_from_the_environment_and_its_folder_must_exist(monkeypatch, tmp_path):
    monkeypatch.delenv(step_trace.STEP_TRACE_ENV, raising=False)
    assert step_trace.step_trace_prefix() is None
    monkeypatch.setenv(step_trace.STEP_TRACE_ENV, str(tmp_path / "trace"))
    assert step_trace.step_trace_prefix() == str(tmp_path / "trace")
    monkeypatch.setenv(step_trace.STEP_TRACE_ENV, str(tmp_path / "missing" / "trace"))
    with pytest.raises(ValueError, match="MOSAICKV_STEP_TRACE: expected a path prefix in an existing folder"):
        step_trace.step_trace_prefix()


def test_rows_reach_the_file_in_blocks_with_the_sealers_counts(tmp_path):
    clock = Clock()
    path = tmp_path / "t.csv"
    trace = StepTrace(str(path), clock=clock)
    sealer = _sealer(sidecar_applied=4)
    sealer.seal_calls, sealer.pages_sealed = 2, 64
    trace.record(True, True, 16, 70000, sealer)
    clock.now += 0.5
    trace.record(False, True, 3, 12288, None)  # a stock server's row: MosaicKV's counts empty
    assert path.read_text().splitlines() == [",".join(FIELDS)]  # not yet a second since the last block
    clock.now += step_trace.FLUSH_SECONDS
    trace.record(True, False, 15, 69000, sealer)
    cols = reader.read_trace(str(path))
    assert cols["decode"].tolist() == [1, 0, 1] and cols["overlapped"].tolist() == [1, 1, 0]
    assert cols["batch_size"].tolist() == [16, 3, 15] and cols["context_tokens"].tolist() == [70000, 12288, 69000]
    assert cols["seal_calls"].tolist() == [2, 0, 2] and cols["pages_sealed"].tolist() == [64, 0, 64]
    assert cols["plans_applied"].tolist() == [4, 0, 4]
    assert np.allclose(cols["t"], [100.0, 100.5, 101.5])
    assert np.all(np.diff(cols["gc_collections"]) >= 0)
    trace.record(True, False, 15, 69001, sealer)
    trace.flush()
    assert len(reader.read_trace(str(path))["t"]) == 4
    StepTrace(str(path), clock=clock).flush()  # a second trace on the same file appends, no second header
    assert path.read_text().count("seal_calls") == 1


def _load(rng, path, overlapped, quiet_s=0.010, seal_s=0.016):
    """A trace of prefills and decode runs whose periods last quiet_s, except the ones whose window (3 iterations)
    holds a seal call: those last seal_s. Returns the rows (0-based) whose period holds a seal."""
    clock = Clock()
    sealer = _sealer()
    trace = StepTrace(str(path), clock=clock)
    sealed_at, slow_rows = [], []
    modes = []
    for _ in range(12):
        modes += [False] + [True] * int(rng.integers(5, 40))
    for k, is_decode in enumerate(modes):
        trace.record(is_decode, overlapped, 16, 4096 * 16 + k, sealer)
        if rng.random() < 0.08:
            sealer.seal_calls += 1
            sealed_at.append(k)
        near = any(k + 1 - 3 <= j <= k for j in sealed_at)  # grown between row k+1-3 and row k+1
        if near:
            slow_rows.append(k + 1)
        clock.now += (seal_s if near else quiet_s) * (1 + 0.01 * rng.random())
    trace.flush()
    return modes, set(slow_rows)


@pytest.mark.parametrize("seed, overlapped", [(0, True), (1, False), (2, True)])
def test_the_periods_beside_mosaic_gpu_work_are_told_from_the_quiet_ones(tmp_path, seed, overlapped):
    rng = np.random.default_rng(seed)
    modes, slow_rows = _load(rng, tmp_path / "t.csv", overlapped)
    periods = reader.decode_periods(reader.read_trace(str(tmp_path / "t.csv")), window=3)
    # the step timer's rule: decode after decode, and under the overlap loop not the first one after a prefill
    expected = [k for k in range(1, len(modes)) if modes[k] and modes[k - 1] and not (overlapped and not modes[k - 2])]
    assert [p.row for p in periods] == expected
    for p in periods:
        assert ("seal_calls" in p.grew) == (p.row in slow_rows)
        assert p.seconds >= (0.016 if p.row in slow_rows else 0.010) - 1e-9
        assert p.batch_size == 16 and p.context_tokens == 4096 * 16 + p.row - 1 and not p.batch_changed
    text = reader.report(periods, top=5)
    lines = {line.split(" |")[0]: line for line in text.splitlines() if line.startswith("| ")}
    gpu = lines["| MosaicKV GPU work launched"].split("|")
    quiet = lines["| none of these (quiet)"].split("|")
    assert int(gpu[2]) == sum(p.row in slow_rows for p in periods) and float(gpu[3]) >= 16.0
    assert int(quiet[2]) == len(periods) - int(gpu[2]) and 10.0 <= float(quiet[4]) < 10.2 and int(quiet[5]) == 0
    slowest = text.split("slowest periods")[1]
    assert slowest.count("seal_calls +") == 5


def test_batch_changes_and_stock_rows(tmp_path):
    clock = Clock()
    trace = StepTrace(str(tmp_path / "t.csv"), clock=clock)
    for k, size in enumerate([8, 8, 8, 8, 9, 9, 9, 9, 9, 9]):
        trace.record(True, False, size, 1000 * size, None)
        clock.now += 0.02 if k == 4 else 0.01
    trace.flush()
    periods = reader.decode_periods(reader.read_trace(str(tmp_path / "t.csv")), window=2)
    assert [p.batch_changed for p in periods] == [False, False, False, True, True, False, False, False, False]
    assert all(p.grew == {} for p in periods)  # stock: no MosaicKV counts, and no collection in the window here
    assert periods[4].seconds == pytest.approx(0.02) and periods[4].batch_size == 9
    text = reader.report(periods)
    assert "| batch size changed | 2 |" in text and "| none of these (quiet) | 7 |" in text


def test_since_and_bad_input(tmp_path, capsys):
    clock = Clock()
    trace = StepTrace(str(tmp_path / "t.csv"), clock=clock)
    for _ in range(6):
        trace.record(True, False, 4, 400, None)
        clock.now += 1.0
    trace.flush()
    cols = reader.read_trace(str(tmp_path / "t.csv"))
    assert len(reader.decode_periods(cols, since=103.0)) == 3
    with pytest.raises(ValueError, match="window: expected >= 1"):
        reader.decode_periods(cols, window=0)
    (tmp_path / "empty.csv").write_text(",".join(FIELDS) + "\n")
    assert reader.main([str(tmp_path / "empty.csv")]) == 1
    assert "expected a step trace with rows" in capsys.readouterr().err
    assert reader.main([str(tmp_path / "t.csv"), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "decode step periods 5" in out and "the 2 slowest periods" in out


def test_a_gzipped_trace_reads_as_the_plain_one(tmp_path, capsys):
    _load(np.random.default_rng(3), tmp_path / "t.csv", overlapped=True)
    data = (tmp_path / "t.csv").read_bytes()
    (tmp_path / "t.csv.gz").write_bytes(gzip.compress(data))
    plain, packed = reader.read_trace(str(tmp_path / "t.csv")), reader.read_trace(str(tmp_path / "t.csv.gz"))
    assert plain.keys() == packed.keys() and len(plain["t"]) > 100
    for name in plain:
        np.testing.assert_array_equal(plain[name], packed[name])
    assert reader.main([str(tmp_path / "t.csv")]) == 0
    out_plain = capsys.readouterr().out
    assert reader.main([str(tmp_path / "t.csv.gz")]) == 0
    out_packed = capsys.readouterr().out
    assert out_packed.replace("t.csv.gz", "t.csv") == out_plain
    (tmp_path / "bad.csv.gz").write_bytes(data)  # not gzipped
    assert reader.main([str(tmp_path / "bad.csv.gz")]) == 1
    assert "bad.csv.gz" in capsys.readouterr().err


class FakeEvent:
    """A timing event: done when the test says so (or when waited for), at a device time in ms."""

    def __init__(self, device_ms):
        self.device_ms, self.done, self.stream, self.waited = device_ms, False, None, False

    def record(self, stream):
        self.stream = stream

    def query(self):
        return self.done

    def synchronize(self):
        self.done = self.waited = True

    def elapsed_time(self, end):
        assert self.done and end.done, "elapsed_time between events the device has not reached"
        return end.device_ms - self.device_ms


def test_gpu_periods_are_written_once_the_device_reaches_each_rows_event(tmp_path):
    """With the forward stream given, each row's gpu_ms is the device time since the last row's event; a row waits
    (and every row after it) until its event is done, or until an idle flush waits for it."""
    clock = Clock()
    path = tmp_path / "t.csv"
    events = [FakeEvent(ms) for ms in (1000.0, 1013.5, 1030.0, 1043.25)]
    made = iter(events)
    trace = StepTrace(str(path), clock=clock, new_event=lambda: next(made))
    stream = object()
    for e in events[:2]:
        e.done = True
    trace.record(True, True, 16, 1000, None, stream)
    trace.record(True, True, 16, 1016, None, stream)
    clock.now += step_trace.FLUSH_SECONDS
    trace.record(True, True, 16, 1032, None, stream)  # its event not reached: kept, the first two written
    assert all(e.stream is stream for e in events[:3])
    cols = reader.read_trace(str(path))
    assert np.isnan(cols["gpu_ms"][0]) and cols["gpu_ms"][1:].tolist() == [13.5]
    trace.record(True, True, 16, 1048, None, stream)
    events[3].done = True  # the later event is done, the earlier not yet: nothing may pass it
    trace.flush()
    assert len(reader.read_trace(str(path))["t"]) == 2
    trace.flush(wait=True)
    assert events[2].waited and not events[3].waited
    assert reader.read_trace(str(path))["gpu_ms"][1:].tolist() == [13.5, 16.5, 13.25]
    trace.record(False, True, 2, 10, None)  # no stream (off a GPU): no event, gpu_ms empty
    trace.flush()
    assert np.isnan(reader.read_trace(str(path))["gpu_ms"][-1])


def test_the_report_sets_the_gpu_periods_beside_the_host_periods(tmp_path):
    """A host period far above its GPU period is a host delay; the report gives the GPU periods' quantiles and each
    slow period's own."""
    path = tmp_path / "t.csv"
    clock = Clock()
    host = [0.010] * 40 + [0.025, 0.001] + [0.010] * 40  # one host delay, given back by the next period
    gpu = [10.0] * 82
    gpu[60] = 30.0  # and a slow step on the device, whose host period (row 61) is slow too
    host[60] = 0.030
    device_ms = np.concatenate([[0.0], np.cumsum(gpu)])
    made = iter([FakeEvent(ms) for ms in device_ms])

    def new_event():
        e = next(made)
        e.done = True
        return e

    trace = StepTrace(str(path), clock=clock, new_event=new_event)
    stream = object()
    for dt in [0.0] + host:
        clock.now += dt
        trace.record(True, True, 16, 4096, _sealer(), stream)
    trace.flush(wait=True)
    periods = reader.decode_periods(reader.read_trace(str(path)), window=3)
    by_row = {p.row: p for p in periods}
    assert by_row[41].seconds == pytest.approx(0.025) and by_row[41].gpu_seconds == pytest.approx(0.010)
    assert by_row[61].gpu_seconds == pytest.approx(0.030)
    text = reader.report(periods, top=2)
    assert "the same periods on the GPU (forward stream, 81 timed)  p50 10.00 ms" in text
    assert "over 1.1x their p50 1" in text
    assert "| 61 | 30.00 | 3.00 | 30.00 |" in text and "| 41 | 25.00 | 2.50 | 10.00 |" in text


def _period(row, gpu_ms, batch=16, changed=False, **grew):
    return reader.Period(row, gpu_ms / 1e3, batch, 4096, dict(grew), changed, gpu_ms / 1e3)


def test_the_seal_work_table_gives_each_kinds_excess_over_quiet_periods_of_its_batch_size():
    periods = [_period(k, 10.0) for k in range(40)]
    periods += [_period(100 + k, 12.0, starts_after_launch=1, side_seals=1) for k in range(5)]
    periods += [_period(200 + k, ms, slices_after_launch=1) for k, ms in enumerate([11.5] * 4 + [10.5])]
    periods += [_period(300 + k, 11.2, packs_after_launch=1, pages_sealed=8) for k in range(4)]
    periods += [_period(400 + k, 14.0, async_seals=1, pages_sealed=40, slices_after_launch=1) for k in range(2)]
    periods += [_period(500, 19.0, packs_after_launch=1, pages_sealed=16, packs_waited=1)]
    periods += [_period(550, 10.6, packs_after_launch=1), _period(551, 10.6, pack_slices_after_launch=1),
                _period(552, 10.6, pack_slices_after_launch=1, async_seals=1, pages_sealed=24)]  # one pack in slices
    periods += [_period(560, 16.0, packs_after_launch=1, slices_caught_up=3, pages_sealed=20),
                _period(561, 25.0, packs_after_launch=1, slices_caught_up=2, packs_waited=1)]  # waited counts first
    periods += [_period(600 + k, 4.0, batch=3) for k in range(5)]  # too few quiet periods of batch 3: left out
    periods += [_period(700, 9.0, batch=3, slices_after_launch=1)]
    periods += [_period(800, 30.0, changed=True, slices_after_launch=1)]  # a batch change: left out
    periods += [_period(900, float("nan"), starts_after_launch=1)]  # no GPU period: left out
    assert reader.launched(periods[-1]) == "a planner's first layer slice"
    text = reader.seal_work_report(periods)
    assert "| no MosaicKV GPU work | 40 | 0.00 | 0.00 | 0 (0%) |" in text
    assert "| a planner's first layer slice | 5 | 2.00 | 2.00 | 5 (100%) |" in text
    assert "| a later layer slice | 5 | 1.50 | 1.50 | 4 (80%) |" in text
    assert "| a pack of 16 pages or fewer | 4 | 1.20 | 1.20 | 4 (100%) |" in text
    assert "| a pack of more than 32 pages | 2 | 4.00 | 4.00 | 2 (100%) |" in text
    assert "| a pack that waited for its planner | 2 | 12.00 | 14.40 | 2 (100%) |" in text
    assert "| a pack that planned layer slices itself | 1 | 6.00 | 6.00 | 1 (100%) |" in text
    assert "| a pack's layer slice (MOSAICKV_PACK_LAYER_SLICES) | 3 | 0.60 | 0.60 | 0 (0%) |" in text
    assert "17-32" not in text and "other seal work" not in text


def test_main_adds_the_seal_work_table_for_a_trace_with_gpu_periods(tmp_path, capsys):
    path = tmp_path / "t.csv"
    rows, counts = [], dict.fromkeys(SEALER_COUNTS, 0)
    for k in range(60):
        gpu = 10.0
        if k % 20 == 10:
            counts["slices_after_launch"] += 1
            gpu = 12.5
        rows.append([f"{100 + 0.01 * k:.6f}", "1", "0", "16", "4096"] + [str(counts[n]) for n in SEALER_COUNTS]
                    + ["", "0", f"{gpu:.3f}" if k else ""])  # fmt: skip
    path.write_text("\n".join([",".join(FIELDS)] + [",".join(r) for r in rows]) + "\n")
    assert reader.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "| a later layer slice | 3 | 2.50 | 2.50 | 3 (100%) |" in out
    path.write_text("\n".join([",".join(FIELDS)] + [",".join(r[:-1] + [""]) for r in rows]) + "\n")
    assert reader.main([str(path)]) == 0
    assert "seal work's cost" not in capsys.readouterr().out  # no GPU periods, no table


def test_each_layer_slice_is_counted_with_the_seal_whose_pack_next_seals_pages():
    periods = [_period(k, 10.0) for k in range(30)]
    pages_sealed = np.zeros(60, dtype=np.int64)
    periods += [_period(30, 11.0, starts_after_launch=1), _period(31, 11.2, slices_after_launch=1),
                _period(32, 10.4, packs_after_launch=1), _period(33, 10.4, pack_slices_after_launch=1, pages_sealed=12)]
    pages_sealed[33:] = 12  # a 12-page seal, planned in two slices and packed in two
    periods += [_period(40, 13.0, starts_after_launch=1), _period(41, 13.0, slices_after_launch=1),
                _period(43, 14.0, slices_after_launch=1), _period(44, 11.0, packs_after_launch=1, pages_sealed=40)]
    pages_sealed[44:] = 52  # a 40-page seal, its pack sealing at once
    periods += [_period(50, 30.0, batch=3, slices_after_launch=1)]  # no baseline for batch 3: left out
    periods += [_period(55, 12.0, starts_after_launch=1)]  # its seal not sealed before the trace ends: left out
    assert reader.seal_pages_of(31, pages_sealed) == 12 and reader.seal_pages_of(33, pages_sealed) == 12
    assert reader.seal_pages_of(40, pages_sealed) == 40 and reader.seal_pages_of(55, pages_sealed) is None
    text = reader.slices_by_seal_report(periods, pages_sealed)
    assert "| 16 or fewer | planner slice | 2 | 1.10 | 1.18 | 1 (50%) |" in text
    assert "| 16 or fewer | pack slice | 2 | 0.40 | 0.40 | 0 (0%) |" in text
    assert "| 33-64 | planner slice | 3 | 3.00 | 3.80 | 3 (100%) |" in text
    assert "17-32" not in text and "more than 64" not in text and "| 33-64 | pack slice" not in text
    assert reader.slices_by_seal_report(periods[:30], pages_sealed) == ""  # no slices, no table
