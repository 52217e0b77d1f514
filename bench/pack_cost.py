# SPDX-License-Identifier: Apache-2.0
"""Cost of packing one seal: ``MosaicMHATokenToKVPool.seal_pages`` on a real pool, the second half of a seal.

With the planner in CUDA graphs, the twenty-seventh run's sidecar load still spent 11-16 ms of the scheduler's time a
seal in its slowest decode plans, about a seal's time less its planning (``bench/RESULTS.md``). That is the pack:
the store's launches for every layer, the arena's bookkeeping and the release of the pages. This times it alone.

Builds a real pool (random K/V in fp16 or bf16, ``--layers`` x ``--kv-heads`` heads, pages of ``--page-size`` tokens),
fills the sealer's query window with random queries, plans ``--pages`` pages (``Sealer.plan_layers``), reads their
payload sizes first (as a pending seal has by its pack, :mod:`mosaickv_sglang.pending_seal`), then times
``pool.seal_pages`` on fresh pages each run: ``host`` is the scheduler's time in the call (what a decode plan waits
for), ``time`` the call until its device work is done. It counts the call's host synchronisations and aten ops
(:class:`bench.host_syncs.HostSyncCounter`, where reads of host tensors count too; :class:`bench.op_census.OpCensus`,
where Triton launches do not count: they are not aten ops; on the CPU, Triton's interpreter copies each kernel's
tensor arguments, so those copies count there at the launch, not on a GPU), and
with ``--profile N`` prints the ``N`` functions of most cumulative host time (:mod:`cProfile`). Example::

    python -m bench.pack_cost --layers 32 --kv-heads 8 --pages 128 --page-size 64 --head-dim 128 --device cuda \\
        --dtype fp16 --repeats 3 --warmup 1 --profile 30
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from typing import Dict, List

import numpy as np
import torch

from bench.host_syncs import HostSyncCounter
from bench.op_census import OpCensus
from bench.seal_cost import add_seal_shape_args, fill_query_window
from mosaickv_sglang.config import MosaicKVConfig
from mosaickv_sglang.kv_pool import MosaicMHATokenToKVPool
from mosaickv_sglang.pending_seal import sizes_to_host
from mosaickv_sglang.sealer import Sealer

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # the pool's dtypes
SITE_ROOTS = ("mosaickv_sglang",)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_seal_shape_args(p)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed packs")
    p.add_argument("--warmup", type=int, default=1, help="untimed packs before")
    p.add_argument("--no-count", action="store_true", help="skip the (extra) pack that counts host syncs and ops")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="one more pack under cProfile: print its N functions of most cumulative time")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    return p


def check_args(args: argparse.Namespace) -> None:
    for name in ("layers", "kv_heads", "group", "pages", "page_size", "head_dim", "window", "repeats"):
        value = getattr(args, name)
        if value < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: expected an integer >= 1, got {value}")
    for name in ("warmup", "profile"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name}: expected an integer >= 0, got {getattr(args, name)}")
    if args.ratio <= 1.0:
        raise SystemExit(f"--ratio: expected a compression ratio > 1, got {args.ratio}")


def build_pool(args: argparse.Namespace, seals: int) -> MosaicMHATokenToKVPool:
    """A pool with room for ``seals`` seals of ``--pages`` pages (and the padding page), its K/V random."""
    s = args.page_size
    tokens = seals * args.pages * s
    cfg = MosaicKVConfig("mosaic", compression_ratio=args.ratio, segment_size=s, hot_window=s, sink_tokens=0,
                         sidecar=False, decode_read_budget=0)  # fmt: skip
    pool = MosaicMHATokenToKVPool(tokens, s, DTYPES[args.dtype], args.kv_heads, args.head_dim, args.layers,
                                  args.device, False, mosaic_config=cfg, hot_tokens=tokens)  # fmt: skip
    gen = torch.Generator(device=pool.k_buffer[0].device).manual_seed(args.seed)
    for buf in list(pool.k_buffer) + list(pool.v_buffer):  # made on the device: gigabytes on the 8B shape
        torch.randn(buf.shape, generator=gen, out=buf)
    return pool


def pages_of(pool: MosaicMHATokenToKVPool, index: int, count: int) -> np.ndarray:
    """The ``index``-th batch of ``count`` logical pages, made physical and fully written."""
    s = pool.page_size
    pages = np.arange(1 + index * count, 1 + (index + 1) * count, dtype=np.int64)
    pages_t = torch.from_numpy(pages)
    pool.ensure_physical(pages_t)
    pool.note_writes((pages_t[:, None] * s + torch.arange(s)[None, :]).reshape(-1))
    return pages


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: List[str] = None) -> Dict[str, object]:
    args = build_parser().parse_args(argv)
    check_args(args)
    dev = torch.device(args.device)
    seals = args.warmup + args.repeats + (0 if args.no_count else 1) + (1 if args.profile else 0)
    pool = build_pool(args, seals)
    sealer = Sealer(pool, args.kv_heads * args.group, query_window=args.window)
    fill_query_window(sealer, args)
    sinks = np.zeros(args.pages, dtype=bool)
    batches = iter(range(seals))

    def planned() -> tuple:
        pages = pages_of(pool, next(batches), args.pages)
        plans = sealer.plan_layers(pages, sinks, args.ratio)
        sizes, _ = sizes_to_host(plans)
        sync(dev)  # the sizes' copy included
        return torch.from_numpy(pages), plans, sizes.numpy()

    hosts, times = [], []
    for i in range(args.warmup + args.repeats):
        pages_t, plans, sizes = planned()
        t0 = time.perf_counter()
        pool.seal_pages(pages_t, plans, sizes=sizes)
        host = time.perf_counter() - t0
        sync(dev)
        if i >= args.warmup:
            hosts.append(host)
            times.append(time.perf_counter() - t0)
    report: Dict[str, object] = {
        "config": vars(args),
        "host_ms": [1e3 * h for h in hosts],
        "time_ms": [1e3 * t for t in times],
    }
    if not args.no_count:
        pages_t, plans, sizes = planned()
        with HostSyncCounter() as count, OpCensus(SITE_ROOTS) as census:
            pool.seal_pages(pages_t, plans, sizes=sizes)
        sync(dev)
        counted = census.report()
        report.update(syncs=count.syncs, sync_sites=dict(count.by_site), copies=count.copies,
                      ops_by_kind=counted["ops_by_kind"],
                      kernel_ops_by_site=counted["kernel_ops_by_site"])  # fmt: skip
    if args.profile:
        pages_t, plans, sizes = planned()
        prof = cProfile.Profile()
        prof.enable()
        pool.seal_pages(pages_t, plans, sizes=sizes)
        prof.disable()
        sync(dev)
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(args.profile)
        report["profile"] = out.getvalue()
    pool.check_invariants()
    sealed = int(pool.store.is_sealed(torch.arange(1, 1 + seals * args.pages)).sum())
    report["pages_sealed"] = sealed
    if sealed != seals * args.pages:
        raise SystemExit(f"pack_cost: expected {seals * args.pages} pages sealed, got {sealed}")
    if args.json:
        print(json.dumps(report))
    else:
        print(f"pack of {args.layers} layers x {args.kv_heads} KV heads x {args.pages} pages of {args.page_size} "
              f"tokens, d={args.head_dim}, {args.dtype} on {args.device}, ratio {args.ratio}")  # fmt: skip
        print(f"  host {min(report['host_ms']):.1f} ms (mean {np.mean(report['host_ms']):.1f}), time "
              f"{min(report['time_ms']):.1f} ms (mean {np.mean(report['time_ms']):.1f}) over {args.repeats} packs")
        if not args.no_count:
            print(f"  host syncs {report['syncs']}, device copies {report['copies']}, aten ops {report['ops_by_kind']}")
            for site, n in report["sync_sites"].items():
                print(f"    {n:6d} host syncs  {site}")
            top = sorted(report["kernel_ops_by_site"].items(), key=lambda kv: -kv[1])[:10]
            for site, n in top:
                print(f"    {n:6d} kernel ops  {site}")
        if args.profile:
            print(report["profile"])
    return report


if __name__ == "__main__":
    main()
