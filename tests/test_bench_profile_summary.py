# SPDX-License-Identifier: Apache-2.0
"""bench.profile_summary on a real torch profiler trace (CPU ops), and its interval arithmetic."""

from __future__ import annotations

import gzip
import json
import shutil

import pytest
import torch

from bench.profile_summary import busy_time, complete_events, main, read_trace, summarize


def test_busy_time_is_the_union_of_intervals():
    assert busy_time([]) == 0.0
    assert busy_time([(0, 10), (5, 10), (20, 5), (21, 1)]) == pytest.approx(15 + 5)
    assert busy_time([(3, 1), (0, 10)]) == pytest.approx(10)


def test_summary_of_a_real_trace(tmp_path, capsys):
    """torch.profiler on the CPU: 7 matmuls and 3 sorts; the summary counts them, groups the sorts, and the CLI reads
    the gzipped trace SGLang would write."""
    a = torch.randn(256, 256)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(7):
            a = torch.mm(a, a).tanh_()
        for _ in range(3):
            torch.sort(a.flatten())
    raw = tmp_path / "t.json"
    prof.export_chrome_trace(str(raw))
    gz = tmp_path / "t.trace.json.gz"
    with open(raw, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    events = complete_events(read_trace(gz), "cpu_op")
    s = summarize(events, groups=[("sort", r"^aten::sort$")], top=50)
    counts = {row["name"]: row["count"] for row in s["top"]}
    assert counts["aten::mm"] == 7 and counts["aten::sort"] % 3 == 0  # torch.sort nests an aten::sort overload
    assert 0 < s["busy_ms"] <= s["span_ms"] and s["groups"]["sort"] > 0
    assert main([str(gz), "--category", "cpu_op", "--group", "mm=^aten::mm$", "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "cpu_op events" in out and "mm " in out
    assert json.loads((tmp_path / "s.json").read_text())[str(gz)]["groups"]["mm"] > 0


def test_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x.json"), "--group", "nolabel"])
    assert "--group: expected LABEL=REGEX" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.json")]) == 2
    assert "profile_summary:" in capsys.readouterr().err
    assert summarize([]) == {"events": 0, "busy_ms": 0.0, "span_ms": 0.0, "groups": {}, "top": []}
