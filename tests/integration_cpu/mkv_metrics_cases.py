# SPDX-License-Identifier: Apache-2.0
"""A real CPU pool and sealer with sealed pages, for ``tests/test_metrics.py``; run as a script, a scheduler-like
process that exports MosaicKV's metrics into ``PROMETHEUS_MULTIPROC_DIR`` through the real hook.

As a script (``python mkv_metrics_cases.py OUT.json MODEL_DIR``, with ``PROMETHEUS_MULTIPROC_DIR`` set by the caller,
as SGLang's launcher sets it before starting the schedulers): builds SGLang's own ``SchedulerMetricsCollector`` as a
scheduler does (``init_new`` on ``ServerArgs(..., enable_metrics=True)`` of a CPU model shape, rank 0), a
``SchedulerMetricsReporter`` holding it (fields set as its ``__post_init__`` would), registers the sealer as the
``mosaic`` backend does, calls the metrics hook twice, and writes SGLang's labels, the stats and what the hook did to
``OUT.json``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import List, Tuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helper modules (importlib import mode)

from test_kv_pool import DT, GROUP, H_KV, LAYERS, S, _config, build_pool  # noqa: E402

from mosaickv_sglang.kernels.format import SegmentPlan  # noqa: E402
from mosaickv_sglang.kv_pool import MosaicMHATokenToKVPool  # noqa: E402
from mosaickv_sglang.sealer import Sealer  # noqa: E402

# labels as SGLang's SchedulerMetricsCollector.init_new builds them for rank 0 (no DP, no priority scheduling)
LABELS = {"model_name": "probe-model", "engine_type": "unified", "tp_rank": 0, "pp_rank": 0, "moe_ep_rank": 0}


def write_pages(pool: MosaicMHATokenToKVPool, pages: np.ndarray, seed: int = 0) -> None:
    """Give ``pages`` hot pages and random K/V in every layer, as complete pages (every token written)."""
    gen = torch.Generator().manual_seed(seed)
    pool.ensure_physical(torch.from_numpy(pages))
    slots = (pool.physical_pages(torch.from_numpy(pages)).long()[:, None] * S + torch.arange(S)).reshape(-1)
    for li in range(LAYERS):
        for buf in (pool.k_buffer[li], pool.v_buffer[li]):
            buf[slots] = torch.randn((slots.numel(),) + tuple(buf.shape[1:]), generator=gen).to(DT)
    pool.note_writes((torch.from_numpy(pages)[:, None] * S + torch.arange(S)).reshape(-1))


def sealed_pool(
    ratio: float = 3.0, written: int = 6, sealed: int = 4
) -> Tuple[MosaicMHATokenToKVPool, Sealer, List[SegmentPlan]]:
    """Pages ``1..written`` written, ``1..sealed`` sealed by the sealer at ``ratio`` (page 1 as a dense sink).

    Returns the pool, the sealer and the fast plans of the sealed pages, one per layer (the planner is
    deterministic: the sealer's own call plans the same pages alike).
    """
    pool = build_pool(64 * S, 32 * S, _config(ratio=ratio))
    sealer = Sealer(pool, num_q_heads=H_KV * GROUP)
    write_pages(pool, np.arange(1, 1 + written, dtype=np.int64))
    pages = np.arange(1, 1 + sealed, dtype=np.int64)
    sinks = np.zeros(pages.size, dtype=bool)
    sinks[0] = True
    plans = sealer.plan_layers(pages, sinks, ratio)
    if not sealer.seal(pages, sinks):
        raise RuntimeError("sealed_pool: the sealer left the pages dense")
    return pool, sealer, plans


def main(out: Path, model: str) -> None:
    from types import SimpleNamespace

    from sglang.srt.managers.scheduler_components.metrics_reporter import SchedulerMetricsReporter
    from sglang.srt.observability.metrics_collector import SchedulerMetricsCollector
    from sglang.srt.server_args import ServerArgs

    from mosaickv_sglang import runtime
    from mosaickv_sglang.metrics import collect_stats
    from mosaickv_sglang.patches import metrics as metrics_hooks
    from mosaickv_sglang.patches import seam

    server_args = ServerArgs(model_path=model, load_format="dummy", device="cpu", enable_metrics=True)
    ps = SimpleNamespace(attn_tp_rank=0, pp_rank=0, attn_cp_rank=0, moe_ep_rank=0)
    context = SchedulerMetricsCollector.init_new(
        server_args=server_args, ps=ps, tp_rank=0, pp_rank=0, dp_rank=None, enable_priority_scheduling=False,
        enable_lora=False, enable_hierarchical_cache=False,
    )  # fmt: skip
    _, sealer, _ = sealed_pool()
    reporter = object.__new__(SchedulerMetricsReporter)
    setattr(reporter, seam.REPORTER_COLLECTOR_ATTR, context.collector)
    setattr(reporter, seam.REPORTER_METRICS_ENABLED_ATTR, context.current_scheduler_metrics_enabled)
    runtime.register_sealer(sealer)
    metrics_hooks.refresh_mosaic_metrics(None, reporter)
    exporter = getattr(reporter, seam.METRICS_EXPORTER_ATTR)
    first = exporter.last_refresh
    sealer.pages_sealed += 100  # not exported: the second call comes within the refresh interval
    metrics_hooks.refresh_mosaic_metrics(None, reporter)
    sealer.pages_sealed -= 100
    result = {
        "labels": {k: str(v) for k, v in context.collector.labels.items()},
        "stats": dataclasses.asdict(collect_stats(sealer)),
        "refreshed_once": exporter.last_refresh == first,
    }
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
