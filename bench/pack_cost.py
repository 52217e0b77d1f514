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
where each Triton launch is one ``triton`` op, and the copies Triton's interpreter makes of its tensor arguments on
the CPU are not counted), and
with ``--profile N`` prints the ``N`` functions of most cumulative host time (:mod:`cProfile`).

``--launches`` also times the pack kernel alone on one more seal's plans, side by side: one launch per layer
(``pack_segments_fwd``, as the store packed before) against one launch for every layer (``pack_layers_fwd``, as it
packs now), each into its own scratch tables, whose bytes must then be equal. Example::

    python -m bench.pack_cost --layers 32 --kv-heads 8 --pages 128 --page-size 64 --head-dim 128 --device cuda \\
        --dtype fp16 --repeats 3 --warmup 1 --profile 30 --launches
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
from mosaickv_sglang.kernels.format import GRANULE_ELEMS, concat_plans
from mosaickv_sglang.kernels.pack import pack_layers_fwd, pack_segments_fwd
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
    p.add_argument("--launches", action="store_true",
                   help="also time the pack kernel alone: one launch per layer against one for all (bytes compared)")
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


def compare_launches(pool: MosaicMHATokenToKVPool, pages: np.ndarray, plans: list, args: argparse.Namespace,
                     dev: torch.device) -> Dict[str, object]:
    """The pack kernel alone on ``plans`` (one per layer) for ``pages``: ``--repeats`` times one launch per layer and
    one launch for all layers, alternated, each into its own scratch arenas, descriptor and bounds tables (the
    bytes of both must be equal); host time (the scheduler's) and time until the device is done, per pack."""
    s, num_layers = pool.page_size, args.layers
    logical = torch.from_numpy(pages).to(dev)[:, None] * s + torch.arange(s, device=dev)[None, :]
    slots = pool.physical_slots(logical).to(torch.int64)
    _, tok, heads, _ = pool.store._segments(pages, slots)  # the segments' token slots and heads, as a seal packs them
    n = tok.shape[0]
    ids = torch.arange(n, dtype=torch.int32, device=dev)
    offs = [plan.bump_offsets(0) for plan in plans]

    def tables():
        arenas = [torch.zeros(max(end, 1) * GRANULE_ELEMS, dtype=pool.dtype, device=dev) for _, _, end in offs]
        descs = [torch.zeros(n, 8, dtype=torch.int32, device=dev) for _ in plans]
        bounds = [torch.zeros(n, 2, args.head_dim, dtype=pool.dtype, device=dev) for _ in plans]
        return arenas, descs, bounds

    per_layer, one = tables(), tables()
    k_offs = [k.to(dev) for k, _, _ in offs]
    v_offs = [v.to(dev) for _, v, _ in offs]
    offsets = torch.stack([torch.stack([k, v], -1) for k, v in zip(k_offs, v_offs)])
    layers = list(range(num_layers))

    def pack_per_layer():
        arenas, descs, bounds = per_layer
        for j in layers:
            pack_segments_fwd(pool.k_buffer[j], pool.v_buffer[j], tok, heads, plans[j], arenas[j], descs[j],
                              bounds[j], ids, k_offs[j], v_offs[j])  # fmt: skip

    def pack_at_once():
        arenas, descs, bounds = one
        pack_layers_fwd(list(pool.k_buffer), list(pool.v_buffer), tok, heads, concat_plans(plans), arenas, descs,
                        bounds, ids, offsets)  # fmt: skip

    timings: Dict[str, Dict[str, list]] = {"per_layer": {"host_ms": [], "time_ms": []},
                                           "one_launch": {"host_ms": [], "time_ms": []}}  # fmt: skip
    for i in range(args.warmup + args.repeats):
        for name, fn in (("per_layer", pack_per_layer), ("one_launch", pack_at_once)):
            sync(dev)
            t0 = time.perf_counter()
            fn()
            host = time.perf_counter() - t0
            sync(dev)
            if i >= args.warmup:
                timings[name]["host_ms"].append(1e3 * host)
                timings[name]["time_ms"].append(1e3 * (time.perf_counter() - t0))
    same = all(torch.equal(a.view(torch.int16) if a.is_floating_point() else a,
                           b.view(torch.int16) if b.is_floating_point() else b)
               for xs, ys in zip(per_layer, one) for a, b in zip(xs, ys))  # fmt: skip
    if not same:
        raise SystemExit("pack_cost --launches: one launch for all layers wrote other bytes than one per layer")
    return {"launches": timings, "launches_same_bytes": same}


def main(argv: List[str] = None) -> Dict[str, object]:
    args = build_parser().parse_args(argv)
    check_args(args)
    dev = torch.device(args.device)
    seals = args.warmup + args.repeats + (0 if args.no_count else 1) + (1 if args.profile else 0) + args.launches
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
    if args.launches:
        pages_t, plans, _ = planned()
        report.update(compare_launches(pool, pages_t.numpy(), plans, args, dev))
    pool.check_invariants()
    packed = seals - args.launches  # the launches' pages are packed into scratch tables, not sealed
    sealed = int(pool.store.is_sealed(torch.arange(1, 1 + seals * args.pages)).sum())
    report["pages_sealed"] = sealed
    if sealed != packed * args.pages:
        raise SystemExit(f"pack_cost: expected {packed * args.pages} pages sealed, got {sealed}")
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
        if args.launches:
            per, one = report["launches"]["per_layer"], report["launches"]["one_launch"]
            print(f"  pack kernel alone, {args.layers} layers (same bytes): one launch per layer host "
                  f"{np.median(per['host_ms']):.2f} ms, time {np.median(per['time_ms']):.2f} ms; one launch host "
                  f"{np.median(one['host_ms']):.2f} ms, time {np.median(one['time_ms']):.2f} ms (medians of "
                  f"{args.repeats}); host {np.median(per['host_ms']) / np.median(one['host_ms']):.1f}x less")
    return report


if __name__ == "__main__":
    main()
