# SPDX-License-Identifier: Apache-2.0
"""What the sidecar bridge costs the scheduler per seal and per tick, and where that time goes.

The ninth run's 8B server spent 7.4 ms a decode step in the bridge (submission 973 ms, landing 883 ms over the
bench); this names the functions behind it. A stand-in pool (page epochs and seal states only; re-packing is not
timed: applying plans took 132 ms of the 2.1 s) and random K/V of ``--layers`` x ``--kv-heads`` heads on
``--device``, a :class:`~mosaickv_sglang.sealer.QueryWindow` of random queries, and a real sidecar worker. Each of
``--seals`` seals submits ``--pages`` pages (:meth:`SidecarBridge.submit_sealed`, which gathers them on the device and
starts their copies to the host), then ``--ticks`` ticks run (:meth:`SidecarBridge.tick`: landed copies handed to the
worker's slots, finished plans read). Reported: scheduler time per seal and per tick, the bridge's own split
(submit, land, apply seconds), jobs submitted, and with ``--profile N`` the ``N`` functions of most cumulative time::

    python -m bench.sidecar_cost --layers 32 --kv-heads 8 --head-dim 128 --pages 128 --device cuda --profile 25
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from types import SimpleNamespace
from typing import Dict, List, Optional

import numpy as np
import torch

from mosaickv_sglang.sealer import QueryWindow
from mosaickv_sglang.sidecar.bridge import DEFAULT_STAGING_MB, SidecarBridge
from mosaickv_sglang.sidecar.client import SidecarConfig
from mosaickv_sglang.sidecar.pinned_staging import PinnedStaging

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.sidecar_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--group", type=int, default=4, help="query heads per KV head")
    p.add_argument("--window", type=int, default=32, help="queries kept per layer")
    p.add_argument("--pages", type=int, nargs="+", default=[128],
                   help="pages per seal; several values are taken in turn (served seals vary in size)")
    p.add_argument("--seals", type=int, default=20)
    p.add_argument("--ticks", type=int, default=5, help="ticks after each seal")
    p.add_argument("--tick-gap-ms", type=float, default=20.0, help="pause between ticks (a decode step's GPU time)")
    p.add_argument("--slots", type=int, default=8, help="sidecar slots")
    p.add_argument("--resegment", choices=("on", "off"), default="on", help="host copies kept for re-segmentation")
    p.add_argument("--staging", choices=("on", "off"), default="on",
                   help="the seals' copies land in slices of one host arena allocated at start (pinned on CUDA, as "
                        "served), or each in its own (torch's pinned allocator on CUDA)")
    p.add_argument("--staging-mb", type=int, default=DEFAULT_STAGING_MB,
                   help="the arena's MiB (a seal whose jobs it cannot hold keeps its fast plans)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (SGLang's scheduler sets 1 on a GPU; more threads turned host copies "
                        "of a page into 16 ms waits for a core while the sidecar worker ran)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="print the N functions of most time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _check(args: argparse.Namespace) -> None:
    for name in ("layers", "kv_heads", "head_dim", "page_size", "group", "window", "pages", "seals", "slots",
                 "threads", "staging_mb"):
        value = min(getattr(args, name)) if name == "pages" else getattr(args, name)
        if value < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: expected an integer >= 1, got {value}")
    if args.ticks < 0 or args.tick_gap_ms < 0:
        raise SystemExit(f"--ticks/--tick-gap-ms: expected values >= 0, got {args.ticks} and {args.tick_gap_ms}")


class StandInPool:
    """What the bridge reads of a pool: shapes, page epochs, seal states; re-packs are counted, not performed."""

    device = "cpu"  # the bridge runs as on a host-only pool: no I/O thread, no pinned plans

    def __init__(self, args: "argparse.Namespace | SimpleNamespace", num_pages: int) -> None:
        """``args``: ``kv_heads``, ``head_dim``, ``page_size`` and ``layers``."""
        self.head_num, self.head_dim, self.page_size = args.kv_heads, args.head_dim, args.page_size
        self.layer_num, self.num_logical_pages = args.layers, num_pages
        self.page_epoch = np.zeros(num_pages, dtype=np.int64)
        self.sealed = np.zeros((args.layers, num_pages), dtype=bool)
        self.free_listeners: list = []
        self.resealed = 0

    def seal(self, pages: np.ndarray) -> None:
        self.page_epoch[pages] += 1
        self.sealed[:, pages] = True

    def free(self, pages: np.ndarray) -> None:
        pages = np.asarray(pages, dtype=np.int64)
        self.page_epoch[pages] += 1
        self.sealed[:, pages] = False
        for listener in self.free_listeners:
            listener(pages)

    def sealed_in_layer(self, pages: np.ndarray, layer: int) -> np.ndarray:
        return self.sealed[layer, pages]

    def reseal_pages(self, pages, layer, keys, values, plan) -> object:
        self.resealed += 1
        return SimpleNamespace()

    def stage_reseal(self, pages, layer, keys, values, plan, stream=None) -> object:
        return (pages, layer, keys, values, plan)

    def reseal_staged(self, staged: tuple) -> object:
        return self.reseal_pages(*staged)

    def release_resealed(self, handle: object) -> None:
        pass


def run(args: argparse.Namespace) -> Dict[str, object]:
    _check(args)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> Dict[str, object]:
    dev, dtype = torch.device(args.device), DTYPES[args.dtype]
    h, s, d = args.kv_heads, args.page_size, args.head_dim
    most = max(args.pages)
    ring = 2 * most  # pages in use: one seal's worth sealed, the next being sealed
    gen = torch.Generator().manual_seed(args.seed)
    kv = torch.randn(args.layers, ring * h, s, d, generator=gen).to(dtype).to(dev)
    window = QueryWindow(args.layers, h, args.group, d, args.window, dev)
    for layer in range(args.layers):
        window.observe(layer, torch.randn(args.window, h * args.group, d, generator=gen).to(dev))
    pool = StandInPool(args, ring + 1)
    config = SidecarConfig(seg_size=s, head_dim=d, group_size=args.group, window=args.window, num_slots=args.slots,
                           max_segments=max(h, 32 // h * h), kv_dtype=dtype)  # fmt: skip
    staging = PinnedStaging(dev.type == "cuda", args.staging_mb << 20) if args.staging == "on" else None
    bridge = SidecarBridge(pool, window, config, resegment=args.resegment == "on", staging=staging).start()

    def gather(layer: int, pages: np.ndarray):
        rows = ((torch.from_numpy(pages) - 1)[:, None] * h + torch.arange(h)).reshape(-1).to(dev)
        return kv[layer, rows], kv[layer, rows]

    profiler = cProfile.Profile() if args.profile else None
    seal_s, tick_s, ticks = [], [], 0
    try:
        if not bridge.client.wait_ready(120.0):
            raise SystemExit("sidecar_cost: expected the sidecar worker ready within 120 s, got none")
        for i in range(args.seals):
            pages = 1 + (np.arange(args.pages[i % len(args.pages)], dtype=np.int64) + (i % 2) * most)
            pool.free(pages)  # the previous use of these pages ends: their plans and copies go stale
            t0 = time.perf_counter()
            if profiler:
                profiler.enable()
            bridge.submit_sealed(pages, np.zeros(pages.size, dtype=bool), 4.0, gather)
            if profiler:
                profiler.disable()
            seal_s.append(time.perf_counter() - t0)
            pool.seal(pages)
            for _ in range(args.ticks):
                time.sleep(args.tick_gap_ms / 1e3)
                t0 = time.perf_counter()
                if profiler:
                    profiler.enable()
                bridge.tick()
                if profiler:
                    profiler.disable()
                tick_s.append(time.perf_counter() - t0)
                ticks += 1
    finally:
        bridge.close()
    report: Dict[str, object] = {
        "config": vars(args),
        "seal_ms": _quantiles(seal_s), "tick_ms": _quantiles(tick_s),
        "bridge_ms": {"submit": 1e3 * bridge.submit_seconds, "land": 1e3 * bridge.land_seconds,
                      "apply": 1e3 * bridge.apply_seconds, "tick": 1e3 * bridge.tick_seconds},
        "segments_submitted": bridge.segments_submitted, "segments_skipped": bridge.segments_skipped,
        "plans_applied": bridge.plans_applied, "plans_discarded": bridge.plans_discarded,
        "staging_full_batches": bridge.staging_full_batches,
        "staging_peak_mb": None if staging is None else staging.peak_lent_bytes / (1 << 20),
    }  # fmt: skip
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(args.profile)
        report["profile"] = out.getvalue()
    return report


def _quantiles(values: List[float]) -> Dict[str, Optional[float]]:
    if not values:
        return {"count": 0, "mean": None, "p50": None, "max": None}
    a = 1e3 * np.asarray(values)
    return {"count": int(a.size), "mean": float(a.mean()), "p50": float(np.median(a)), "max": float(a.max())}


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    args = build_parser().parse_args(argv)
    report = run(args)
    if args.json:
        print(json.dumps(report))
        return report
    seal, tick, br = report["seal_ms"], report["tick_ms"], report["bridge_ms"]
    pages = "/".join(map(str, args.pages))
    print(f"sidecar bridge, {args.layers} layers x {args.kv_heads} KV heads, d={args.head_dim}, {pages} pages a "
          f"seal, {args.dtype} on {args.device}, {args.threads} torch thread(s)")  # fmt: skip
    print(f"  submit_sealed: mean {seal['mean']:.2f} ms, max {seal['max']:.2f} ms ({seal['count']} seals)")
    if tick["count"]:
        print(f"  tick: mean {tick['mean']:.2f} ms, max {tick['max']:.2f} ms ({tick['count']} ticks)")
    print(f"  bridge time: submit {br['submit']:.1f} ms, land {br['land']:.1f} ms, apply {br['apply']:.1f} ms; "
          f"{report['segments_submitted']} segments submitted, {report['segments_skipped']} skipped, "
          f"{report['plans_applied']} plans applied")  # fmt: skip
    if report["staging_peak_mb"] is not None:
        print(f"  host staging: {report['staging_peak_mb']:.1f} MiB of {args.staging_mb} lent at most, "
              f"{report['staging_full_batches']} seals found it full")  # fmt: skip
    if "profile" in report:
        print(report["profile"])
    return report


if __name__ == "__main__":
    main()
