# SPDX-License-Identifier: Apache-2.0
"""bench.step_timeline on generated GPU traces: steps cut at the once-a-step kernel, slow steps and what filled them."""

from __future__ import annotations

import gzip
import json
import random

import pytest

from bench.step_timeline import default_step_kernel, forward_stream, kernel_events, main, split_steps, summarize


def _trace(rng: random.Random, steps: int, slow: dict, layers: int = 24, side_stream: int = 45) -> dict:
    """``steps`` decode steps on stream 13: per layer a GEMM and an attention kernel, then an LM head (the once-a-step
    kernel), a host gap after it; ``slow[i] = us`` stretches step i's attention by ``us`` in all and runs a pack
    kernel on ``side_stream`` beside it."""
    events, t = [], 1000.0 + rng.random() * 100
    for i in range(steps):
        events.append({"ph": "X", "cat": "kernel", "name": "lm_head_gemm", "ts": t, "dur": 300.0,
                       "args": {"stream": 13}})  # fmt: skip
        t += 300.0
        if i in slow:
            events.append({"ph": "X", "cat": "kernel", "name": "_pack_segments_main_kernel", "ts": t, "dur": 900.0,
                           "args": {"stream": side_stream}})  # fmt: skip
        for _ in range(layers):
            g = 40.0 + rng.random() * 5
            a = 60.0 + rng.random() * 5 + slow.get(i, 0.0) / layers
            events.append({"ph": "X", "cat": "kernel", "name": "gemm", "ts": t, "dur": g, "args": {"stream": 13}})
            events.append({"ph": "X", "cat": "kernel", "name": "attn", "ts": t + g, "dur": a, "args": {"stream": 13}})
            t += g + a
        t += 200.0 + rng.random() * 20  # the host's gap before the next step
    events.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 5.0, "tid": 1})
    rng.shuffle(events)
    return {"traceEvents": events}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_steps_are_cut_at_the_once_a_step_kernel_and_slow_ones_named(seed):
    rng = random.Random(seed)
    steps = rng.randint(30, 60)
    slow_steps = {rng.randrange(1, steps - 2): 3000.0, rng.randrange(1, steps - 2): 5000.0}
    kernels = kernel_events(_trace(rng, steps, slow_steps))
    assert all(k.name != "aten::mm" for k in kernels)
    assert forward_stream(kernels) == 13
    assert default_step_kernel(kernels, 13) == "lm_head_gemm"
    got = split_steps(kernels, "lm_head_gemm")
    assert len(got) == steps - 1
    s = summarize(got, slow=1.2)
    assert sorted(step["index"] for step in s["slow"]) == sorted(i for i in slow_steps)
    for step in s["slow"]:
        extra = slow_steps[step["index"]] / 1e3
        assert step["span_ms"] == pytest.approx(s["span_ms"]["p50"] + extra, abs=0.5)
        assert step["other_busy_ms"] == pytest.approx(0.9)
        assert step["kernels"][0][0] == "attn" and any("[stream 45]" in n for n, _ in step["kernels"])
        assert step["forward_busy_ms"] < step["span_ms"]
    fast = [st for i, st in enumerate(got) if i not in slow_steps]
    assert all(st["other_busy_ms"] == 0 for st in fast)
    assert all(0.2 < st["span_ms"] - st["forward_busy_ms"] < 0.23 for st in fast)  # the host gap


def test_cli_reports_each_trace_and_refuses_bad_input(tmp_path, capsys):
    path = tmp_path / "t.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(_trace(random.Random(3), 40, {7: 4000.0}), f)
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "39 steps on stream 13, cut at 'lm_head_gemm'" in out and "1 steps over 1.2x the median" in out
    assert "step 7: span" in out and "[stream 45] _pack_segments_main_kernel 0.90" in out

    assert main([str(path), "--step-kernel", "no_such_kernel"]) == 2
    assert "expected at least 2 launches of 'no_such_kernel' on stream 13, got 0" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"traceEvents": []}))
    assert main([str(empty)]) == 2
    assert "expected GPU kernel events, got none" in capsys.readouterr().err
    flat = tmp_path / "flat.json"  # every kernel equally frequent: no once-a-step kernel to choose
    flat.write_text(json.dumps({"traceEvents": [{"ph": "X", "cat": "kernel", "name": f"k{i % 2}", "ts": float(i),
                                                 "dur": 1.0, "args": {"stream": 7}} for i in range(40)]}))  # fmt: skip
    assert main([str(flat)]) == 2
    assert "expected a kernel launched once a step on stream 7, got none; pass --step-kernel" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(path), "--slow", "0"])
    assert "--slow: expected a positive number, got 0" in capsys.readouterr().err


def test_a_side_kernel_running_across_steps_counts_in_each_step_clipped_to_it():
    """Steps of 1,000 us (marker, then 800 us of forward work); a side kernel started before the first marker runs
    to the middle of step 1, another spans steps 2-4: each step counts only its own part of them."""
    from bench.step_timeline import Kernel

    kernels = [Kernel("early_side", -300.0, 1800.0, 9)]  # ends at 1,500: 1,000 in step 0, 500 in step 1
    for i in range(6):
        kernels += [Kernel("head", i * 1000.0, 100.0, 13), Kernel("body", i * 1000.0 + 100, 700.0, 13)]
    kernels.append(Kernel("long_side", 2600.0, 1900.0, 9))  # 400 in step 2, 1,000 in step 3, 500 in step 4
    kernels.sort(key=lambda k: k.start_us)
    steps = split_steps(kernels, "^head$")
    assert [round(s["other_busy_ms"] * 1e3) for s in steps] == [1000, 500, 400, 1000, 500]
    assert all(round(s["forward_busy_ms"] * 1e3) == 800 and s["span_ms"] == 1.0 for s in steps)
    assert dict(steps[3]["kernels"])["[stream 9] long_side"] == 1.0
