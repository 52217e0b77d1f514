# SPDX-License-Identifier: Apache-2.0
"""``MOSAICKV_COMPILE_PLANNER=1``: the planner's device half through :func:`torch.compile` plans, for a seal of
several layers with GQA and sinks, exactly the segments the eager planner plans (random keys, values and queries)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench (repository root)

from bench import seal_cost  # noqa: E402
from mosaickv_sglang import plan_layers  # noqa: E402
from mosaickv_sglang.sealer import Sealer  # noqa: E402


@pytest.mark.parametrize("layers,kv_heads,group,pages,head_dim,seed", [(2, 2, 3, 3, 64, 5)])
def test_compiled_planner_plans_what_the_eager_planner_plans(monkeypatch, layers, kv_heads, group, pages, head_dim,
                                                             seed):  # fmt: skip
    args = seal_cost.build_parser().parse_args(
        ["--layers", str(layers), "--kv-heads", str(kv_heads), "--group", str(group), "--pages", str(pages),
         "--head-dim", str(head_dim), "--page-size", "64", "--dtype", "fp32", "--seed", str(seed), "--sinks", "1"])
    sealer = Sealer(seal_cost.stand_in_pool(args), kv_heads * group, query_window=args.window)
    seal_cost.fill_query_window(sealer, args)
    page_ids = np.arange(pages, dtype=np.int64)
    sinks = page_ids < args.sinks
    monkeypatch.delenv(plan_layers.COMPILE_PLANNER_ENV, raising=False)
    eager = sealer.plan_layers(page_ids, sinks, args.ratio)
    monkeypatch.setenv(plan_layers.COMPILE_PLANNER_ENV, "1")
    compiled_calls = []
    real = plan_layers._compiled_plan_on_device
    monkeypatch.setattr(plan_layers, "_compiled_plan_on_device", lambda: compiled_calls.append(1) or real())
    compiled = sealer.plan_layers(page_ids, sinks, args.ratio)
    assert compiled_calls
    assert seal_cost.differing_segments(eager, compiled) == 0
    monkeypatch.setenv(plan_layers.COMPILE_PLANNER_ENV, "on")
    with pytest.raises(ValueError, match="MOSAICKV_COMPILE_PLANNER: expected 0 or 1, got 'on'"):
        sealer.plan_layers(page_ids, sinks, args.ratio)
