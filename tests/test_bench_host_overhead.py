# SPDX-License-Identifier: Apache-2.0
"""bench.host_overhead on a tiny configuration: eager steps time the plan and every layer's host work; CUDA-graph
steps (static buffers, as SGLang's graph runner plans them) time the plan only, split into the same parts."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sglang")

from bench import host_overhead  # noqa: E402

TINY = "--shapes smollm2 --batches 3 --contexts 700 --steps 2 --warmup 1 --profile-steps 0 --sidecar off"


@pytest.mark.parametrize("graph", [False, True])
def test_host_overhead_times_the_plan_and_its_parts(graph, tmp_path, capsys):
    out = tmp_path / "host.json"
    argv = TINY.split() + ["--out", str(out)] + (["--cuda-graph"] if graph else [])
    assert host_overhead.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["cuda_graph"] is graph
    (row,) = data["results"]
    ms = row["median_ms"]
    assert (row["batch"], row["context"], row["layers"]) == (3, 700, 30) and row["sealed_pages"] > 0
    assert ms["plan_total"] > 0 and ms["decode_metadata"] > 0
    for part in ("rows_and_prep", "before_forward", "decode_metadata", "plan_decode_rest"):
        assert 0 <= ms[part] <= ms["plan_total"], part
    if graph:
        assert ms["layers_total"] == 0 and ms["step_total"] == ms["plan_total"]
    else:
        assert ms["layers_total"] > 0 and ms["set_kv_buffer_per_layer"] > 0
    assert "| smollm2 | 3 | 700 |" in capsys.readouterr().out
