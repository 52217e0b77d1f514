# SPDX-License-Identifier: Apache-2.0
"""The scheduler stack sampler (``MOSAICKV_STACK_SAMPLES``) and its summary (``bench.stack_summary``)."""

from __future__ import annotations

import inspect
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from bench import stack_summary
from mosaickv_sglang import stack_sampler
from mosaickv_sglang.stack_sampler import StackSampler, collapse


def _inner_frame():
    return sys._getframe()


def _outer_frame():
    return _inner_frame()


def test_collapse_lists_the_stack_root_first():
    frame = _outer_frame()
    stack = collapse(frame)
    frames = stack.split(";")
    first = _inner_frame.__code__.co_firstlineno
    # the leaf with the line it was on, the others with their function's first line only
    assert frames[-1] == f"_inner_frame (tests/test_stack_sampler.py:{first}) @{frame.f_lineno}"
    assert frames[-2].startswith("_outer_frame (tests/test_stack_sampler.py:") and " @" not in frames[-2]
    assert frames[-3].startswith("test_collapse_lists_the_stack_root_first (")
    assert len(collapse(_outer_frame(), max_depth=2).split(";")) == 2


def _spin_in_marker(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(200))


def _spin_elsewhere(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(200))


def _worker(stop: threading.Event, started: threading.Event) -> None:
    started.set()
    _spin_elsewhere(0.1)
    _spin_in_marker(stop)


def test_sampler_counts_where_the_thread_spends_its_time(tmp_path):
    stop, started = threading.Event(), threading.Event()
    t = threading.Thread(target=_worker, args=(stop, started))
    t.start()
    started.wait(5)
    path = tmp_path / "stacks"
    sampler = StackSampler(str(path), t.ident, interval_s=0.001, write_every_s=0.05).start()
    deadline = time.monotonic() + 10
    while not path.exists() and time.monotonic() < deadline:  # written while sampling, not only at the end
        time.sleep(0.01)
    assert path.exists()
    time.sleep(0.4)
    stop.set()
    t.join()
    sampler.stop()
    counts = stack_summary.read_collapsed(path.read_text())
    assert sum(counts.values()) == sampler.samples > 20
    got = stack_summary.summarize(counts, top=50)
    inclusive = {label.split(" (")[0]: share for label, _, share in got["inclusive"]}
    assert inclusive["_worker"] == pytest.approx(1.0)
    # about 0.1 s of the first function, then 0.4 s or more of the second
    assert inclusive["_spin_in_marker"] > 0.5 and inclusive.get("_spin_elsewhere", 0.0) < 0.4
    under = stack_summary.summarize(counts, top=50, under="_spin_elsewhere")
    assert under["kept"] == round(inclusive.get("_spin_elsewhere", 0.0) * under["samples"])
    assert not sampler._thread.is_alive()


def test_sampler_ends_with_the_thread_it_samples(tmp_path):
    t = threading.Thread(target=time.sleep, args=(0.05,))
    t.start()
    sampler = StackSampler(str(tmp_path / "s"), t.ident, interval_s=0.001, write_every_s=60).start()
    t.join()
    sampler._thread.join(5)
    assert not sampler._thread.is_alive() and (tmp_path / "s").exists()  # the counts so far are written at the end


def test_sampler_rejects_bad_intervals(tmp_path):
    with pytest.raises(ValueError, match="interval_s: expected a number of seconds > 0, got 0"):
        StackSampler(str(tmp_path / "s"), threading.get_ident(), interval_s=0)
    with pytest.raises(ValueError, match="write_every_s: expected a number of seconds > 0, got -1"):
        StackSampler(str(tmp_path / "s"), threading.get_ident(), write_every_s=-1)


def test_a_write_error_is_logged_not_raised(tmp_path, caplog):
    sampler = StackSampler(str(tmp_path / "missing-dir" / "s"), threading.get_ident())
    sampler.sample_once()
    sampler.write()
    assert "could not write the stack samples" in caplog.text


@pytest.fixture
def fresh_sampler(monkeypatch):
    monkeypatch.setattr(stack_sampler, "_started", None)
    yield
    if stack_sampler._started is not None:
        stack_sampler._started.stop()


def test_maybe_start_reads_the_environment(tmp_path, fresh_sampler):
    assert stack_sampler.maybe_start(env={}) is None
    with pytest.raises(ValueError, match="MOSAICKV_STACK_SAMPLE_MS: expected a number of milliseconds > 0, got 'x'"):
        stack_sampler.maybe_start(env={"MOSAICKV_STACK_SAMPLES": str(tmp_path / "s"), "MOSAICKV_STACK_SAMPLE_MS": "x"})
    env = {"MOSAICKV_STACK_SAMPLES": str(tmp_path / "s"), "MOSAICKV_STACK_SAMPLE_MS": "5"}
    sampler = stack_sampler.maybe_start(tp_rank=1, tp_size=2, env=env)
    assert sampler is not None and sampler.path == str(tmp_path / "s.tp1") and sampler.interval_s == 0.005
    assert sampler.thread_id == threading.get_ident()
    assert stack_sampler.maybe_start(env=env) is sampler  # once per process


def test_run_batch_hook_starts_the_sampler_with_the_scheduler_rank(tmp_path, monkeypatch, fresh_sampler):
    from mosaickv_sglang.patches.scheduler import sample_stacks

    monkeypatch.delenv("MOSAICKV_STACK_SAMPLES", raising=False)
    scheduler = SimpleNamespace(ps=SimpleNamespace(tp_rank=3, tp_size=4))
    sample_stacks(scheduler, object())
    assert stack_sampler._started is None
    monkeypatch.setenv("MOSAICKV_STACK_SAMPLES", str(tmp_path / "stacks"))
    sample_stacks(scheduler, object())
    assert stack_sampler._started is not None and stack_sampler._started.path == str(tmp_path / "stacks.tp3")


def test_the_scheduler_keeps_its_ranks_where_the_hook_reads_them():
    from sglang.srt.managers.scheduler import Scheduler

    from mosaickv_sglang.patches import seam

    src = inspect.getsource(Scheduler.__init__)
    assert f"self.{seam.SCHEDULER_PARALLEL_STATE_ATTR} = ParallelState(" in src
    assert "tp_rank=tp_rank" in src and "tp_size=server_args.tp_size" in src


def test_summary_counts_a_leaf_line_with_its_function():
    counts = stack_summary.read_collapsed("main (m.py:1);f (m.py:5) @7 2\nmain (m.py:1);f (m.py:5) @9 1\n"
                                          "main (m.py:1);f (m.py:5);g (m.py:20) @21 1\n")  # fmt: skip
    got = stack_summary.summarize(counts)
    assert ("f (m.py:5)", 4, 1.0) in got["inclusive"]
    assert got["leaves"][:2] == [("f (m.py:5) @7", 2, 0.5), ("f (m.py:5) @9", 1, 0.25)]


def test_summary_reads_and_ranks(tmp_path, capsys):
    path = tmp_path / "stacks"
    path.write_text("main;run_batch;forward 6\nmain;process_result 3\n\nmain;run_batch;plan 1\n")
    counts = stack_summary.read_collapsed(path.read_text())
    got = stack_summary.summarize(counts, top=3)
    assert got["samples"] == 10
    assert got["inclusive"][0] == ("main", 10, 1.0) and ("run_batch", 7, 0.7) in got["inclusive"]
    assert got["leaves"][0] == ("forward", 6, 0.6)
    assert stack_summary.main([str(path), "--under", "run_batch"]) == 0
    out = capsys.readouterr().out
    assert "10 samples, 7 (70.0%) under 'run_batch'" in out and "process_result" not in out
    assert stack_summary.main([str(path), "--json"]) == 0
    assert '"samples": 10' in capsys.readouterr().out
    earlier = tmp_path / "earlier"
    earlier.write_text("main;run_batch;forward 4\n")
    load = tmp_path / "load"
    assert stack_summary.main([str(path), "--minus", str(earlier), "--json", "--write", str(load)]) == 0
    assert '"samples": 6' in capsys.readouterr().out
    assert load.read_text() == "main;process_result 3\nmain;run_batch;forward 2\nmain;run_batch;plan 1\n"
    assert stack_summary.main([str(path), "--write", str(tmp_path / "no-dir" / "x")]) == 2
    assert "no-dir" in capsys.readouterr().err
    assert stack_summary.main([str(earlier), "--minus", str(path)]) == 2
    assert "--minus: expected an earlier copy of the same file" in capsys.readouterr().err


def test_summary_errors(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.write_text("main;run_batch six\n")
    assert stack_summary.main([str(bad)]) == 2
    assert "line 1: expected 'frame;...;frame count'" in capsys.readouterr().err
    assert stack_summary.main([str(tmp_path / "none")]) == 2
    with pytest.raises(SystemExit):
        stack_summary.main([str(bad), "--top", "0"])
    assert "--top: expected an integer >= 1, got 0" in capsys.readouterr().err
