# SPDX-License-Identifier: Apache-2.0
"""Cost of planning one seal: the per-layer reference (``plan_fast`` per layer) against the one-call planner.

Builds a stand-in pool (random K/V in fp32 or fp16, ``--layers`` x ``--pages`` pages of ``--page-size`` tokens and
``--kv-heads`` heads), fills the :class:`~mosaickv_sglang.sealer.QueryWindow` with random queries, and times, on the
same inputs and in the same run:

* ``per-layer``: ``[Sealer.plan_layer(l, ...) for l in layers]``, the planning loop of ``Sealer.seal`` before;
* ``one-call``: ``Sealer.plan_layers(...)``, the planning of ``Sealer.seal`` now (``plan_fast_layers``);

and counts, for each, the host synchronisations a GPU would make (:class:`bench.host_syncs.HostSyncCounter`), and
checks that both give the same plans (choices and estimated error per layer). Example::

    python -m bench.seal_cost --layers 32 --kv-heads 8 --pages 128 --page-size 64 --head-dim 128

It also takes an op census of each (:class:`bench.op_census.OpCensus`, one extra untimed run): the aten ops one call
dispatches (``ops``), split by kind (``ops_by_kind``: ``kernel`` ops launch at least one kernel on a GPU; ``view``,
``alloc`` and ``transfer`` ops do not), the 20 most frequent ops (``ops_by_name``, every kind; ``kernel_ops_by_name``)
and code sites of the planner dispatching kernel ops (``kernel_ops_by_site``), and the kernel ops' memory traffic
(``total_bytes``, ``bytes_by_name``, ``bytes_by_site``: what each reads and writes at least) and the matrix products'
``flops``. The census is the same on the CPU as on a GPU up to dtype casts (``.float()`` of an fp32 tensor dispatches
nothing, so a ``--dtype fp16`` census is the one to compare with a GPU run in fp16) and the methods chosen on CUDA only
(the Triton chan drop and estimate terms kernels, whose traffic the census does not see; ``--cuda-methods-on-cpu`` takes
them on the CPU too, under ``TRITON_INTERPRET=1``, so the census counts a served planner's ops and launches), so a
launch-bound or memory-bound GPU call can be studied on the CPU: how ``one_call.ops_by_kind.kernel`` grows with
``--pages`` and ``--layers`` says which loops dispatch per layer, per chunk or per menu entry, and ``bytes_by_site``
where fusing saves the most traffic. ``--no-count`` skips both counting runs.

``--also-lagrange-bracket kernel`` times the one call again with the planner's Lagrangian choice as Triton kernels
(``MOSAICKV_LAGRANGE_BRACKET``: the bracket search one launch a round), counts its ops and Triton launches, and compares
its plans with the first's; with ``--graph-pages`` the graphed call too (graphs captured afresh, their memory
measured from an emptied cache). On the CPU it needs ``TRITON_INTERPRET=1`` (the kernels then run in the
interpreter, so only the counts mean anything).

``--profile DIR`` runs each path once more under :mod:`torch.profiler` (CPU, plus CUDA on a GPU) and writes to
``DIR`` ``<path>_by_self_cpu.txt`` (top ops by self CPU time), on CUDA ``<path>_by_self_device.txt`` (top ops by
self device time), and ``<path>_trace.json.gz`` (a gzipped Chrome trace), for ``<path>`` ``per_layer`` and
``one_call``, and with ``--graph-pages`` ``graphed``: one replay of the one call's seal graphs, captured before the
profile (on CUDA its kernels are listed by name only; ``python -m bench.profile_summary`` on its trace gives their busy
time against their span, the share of the replay spent between kernels), and with ``--also-lagrange-bracket`` too
``graphed_bracket``, the same with that bracket search. For a GPU session::

    python -m bench.seal_cost --layers 32 --kv-heads 8 --pages 128 --page-size 64 --head-dim 128 --device cuda \\
        --dtype fp16 --repeats 3 --warmup 1 --json --profile $OUT/seal_profile
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from types import SimpleNamespace
from unittest import mock
from typing import Callable, Dict, Iterator, List

import numpy as np
import torch

import mosaickv_sglang
import mosaickv_sglang.kernels
from bench.host_syncs import HostSyncCounter
from bench.op_census import OpCensus
from mosaickv_sglang import lagrange, planner, seal_graphs
from mosaickv_sglang.plan_layers import DEFAULT_MAX_CHUNK_BYTES, DEFAULT_MAX_SEGMENTS
from mosaickv_sglang.sealer import Sealer

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def add_seal_shape_args(p: argparse.ArgumentParser) -> None:
    """The seal's shape, ratio and query window (``bench.seal_cost``, ``bench.pack_cost``)."""
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--group", type=int, default=4, help="query heads per KV head")
    p.add_argument("--pages", type=int, default=128, help="pages sealed at once")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--ratio", type=float, default=3.0)
    p.add_argument("--window", type=int, default=32, help="recent queries per layer")


def fill_query_window(sealer: Sealer, args: argparse.Namespace) -> None:
    """A full query window of random queries in every layer (seeded by ``args.seed + 1``)."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    for layer in range(args.layers):
        q = 1.5 * torch.randn(args.window, args.kv_heads * args.group, args.head_dim, generator=gen)
        sealer.window.observe(layer, q.to(args.device))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_seal_shape_args(p)
    p.add_argument("--sinks", type=int, default=1, help="pages of the seal that are always-dense sinks")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each before")
    p.add_argument("--no-count", action="store_true", help="skip the (extra) runs that count host syncs and ops")
    p.add_argument("--profile", metavar="DIR", help="write torch.profiler tables and traces of each path to DIR")
    p.add_argument("--chan-drop", choices=planner.CHAN_DROP_METHODS, default=planner.CHAN_DROP_METHOD_ON_CUDA,
                   help="how the planner finds each vector's top channels on CUDA (planner.CHAN_DROP_METHOD_ON_CUDA; "
                        f"default {planner.CHAN_DROP_METHOD_ON_CUDA})")
    p.add_argument("--estimate-terms", choices=planner.ESTIMATE_TERMS_METHODS, default=planner.ESTIMATE_TERMS_ON_CUDA,
                   help="how the fast estimator computes its per-k channel terms on CUDA "
                        f"(planner.ESTIMATE_TERMS_ON_CUDA; default {planner.ESTIMATE_TERMS_ON_CUDA})")
    p.add_argument("--cuda-methods-on-cpu", action="store_true",
                   help="on the CPU, take --chan-drop and --estimate-terms as on CUDA (their kernels run in Triton's "
                        "interpreter: needs TRITON_INTERPRET=1), so the census counts the ops a server's planner "
                        "dispatches")
    p.add_argument("--also-estimate-terms", choices=planner.ESTIMATE_TERMS_METHODS, default=None,
                   help="time the one-call planner again with this method, in the same run, and compare its plans")
    p.add_argument("--also-lagrange-bracket", choices=lagrange.BRACKET_METHODS, default=None,
                   help="also time the one call with this bracket search (MOSAICKV_LAGRANGE_BRACKET) and compare plans")
    p.add_argument("--max-segments", type=int, default=DEFAULT_MAX_SEGMENTS,
                   help=f"the one-call planner's segments per chunk (default {DEFAULT_MAX_SEGMENTS})")
    p.add_argument("--max-chunk-bytes", type=int, default=DEFAULT_MAX_CHUNK_BYTES,
                   help=f"the one-call planner's largest temporary per chunk (default {DEFAULT_MAX_CHUNK_BYTES})")
    p.add_argument("--graph-pages", default="",
                   help="also time the planner through CUDA graphs of these page buckets (comma-separated, as "
                        "MOSAICKV_SEAL_GRAPH_PAGES; off CUDA the padded planner runs eagerly), in the same run, and "
                        "compare its plans")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    return p


def differing_segments(plans_a: List[object], plans_b: List[object]) -> int:
    """Segments (rows of each layer's plan) whose kept tokens or K/V forms and parameters differ between two runs."""
    fields = ("token_keep", "k_form", "k_param", "v_form", "v_param")
    n = 0
    for a, b in zip(plans_a, plans_b, strict=True):
        diff = torch.zeros(a.k_form.shape[0], dtype=torch.bool, device=a.k_form.device)
        for f in fields:
            x, y = getattr(a, f), getattr(b, f)
            ne = x != y
            diff |= ne.reshape(ne.shape[0], -1).any(1)
        n += int(diff.sum())
    return n


def stand_in_pool(args: argparse.Namespace) -> SimpleNamespace:
    """What :class:`Sealer` reads of a pool: sizes, per-layer K/V buffers and an identity page table."""
    gen = torch.Generator().manual_seed(args.seed)
    slots = args.pages * args.page_size
    shape = (slots, args.kv_heads, args.head_dim)
    dt, dev = DTYPES[args.dtype], torch.device(args.device)
    k = [torch.randn(shape, generator=gen).to(dev, dt) for _ in range(args.layers)]
    v = [(torch.randn(shape, generator=gen) + 0.5).to(dev, dt) for _ in range(args.layers)]
    return SimpleNamespace(
        page_size=args.page_size, head_num=args.kv_heads, head_dim=args.head_dim, device=args.device,
        layer_num=args.layers, k_buffer=k, v_buffer=v, physical_pages=lambda pages: pages.clone(),
        mosaic_config=SimpleNamespace(compression_ratio=args.ratio, axes="both"),
        seal_pages=lambda pages, plans, sizes=None: None,
    )  # fmt: skip


def timed(fn: Callable[[], object], device: torch.device, args: argparse.Namespace) -> Dict[str, object]:
    for _ in range(args.warmup):  # caches, allocator
        fn()
    times, host = [], []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        host.append(time.perf_counter() - t0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    # host_seconds: until the call returns, its device work queued (what a scheduler thread spends on it)
    report: Dict[str, object] = {"seconds": min(times), "host_seconds": min(host), "result": out}
    if device.type == "cuda":  # transient device memory of one call, above what was allocated before it
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        report["peak_transient_bytes"] = torch.cuda.max_memory_allocated(device) - base
    if not args.no_count:
        with HostSyncCounter() as count:
            fn()
        report.update(syncs=count.syncs, copies=count.copies, by_name=dict(count.by_name))
        with OpCensus(SITE_ROOTS) as census:
            fn()
        report.update(census.report())
    return report


SITE_ROOTS = tuple(os.path.dirname(m.__file__) for m in (mosaickv_sglang, mosaickv_sglang.kernels))
"""Where the planner's code lives (``kernels`` is mapped from another folder): kernel ops are attributed to its
innermost frame."""


def profile(fn: Callable[[], object], device: torch.device, out_dir: str, name: str) -> List[str]:
    """One run of ``fn`` under :mod:`torch.profiler`; writes the tables and trace named in the module docstring and
    returns their paths."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    os.makedirs(out_dir, exist_ok=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with torch_profile(activities=activities, record_shapes=True) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    averages = prof.key_averages()
    sorts = [("self_cpu", "self_cpu_time_total")] + ([("self_device", "self_device_time_total")]
                                                      if device.type == "cuda" else [])  # fmt: skip
    paths = []
    for label, key in sorts:
        path = os.path.join(out_dir, f"{name}_by_{label}.txt")
        with open(path, "w") as f:
            f.write(averages.table(sort_by=key, row_limit=40, max_name_column_width=60) + "\n")
        paths.append(path)
    path = os.path.join(out_dir, f"{name}_trace.json.gz")
    prof.export_chrome_trace(path)
    return paths + [path]


@contextlib.contextmanager
def fresh_seal_graphs(sealer: Sealer, dev: torch.device, graph_pages: str) -> Iterator[None]:
    """Fresh seal graphs of the ``graph_pages`` buckets on ``sealer`` inside the block (captured at its first plan on
    CUDA, with the planner's settings then), given up after it."""
    with mock.patch.dict(os.environ, {seal_graphs.ENV_VAR: graph_pages}):
        sealer.use_seal_graphs(seal_graphs.seal_graph_buckets())
    try:
        yield
    finally:
        sealer.use_seal_graphs(())
        if dev.type == "cuda":  # the graphs' memory back to the device: the next capture's is measured from zero
            torch.cuda.empty_cache()


def timed_graphs(sealer: Sealer, one_call: Callable[[], object], dev: torch.device,
                 args: argparse.Namespace) -> Dict[str, object]:  # fmt: skip
    """:func:`timed` of ``one_call`` (``sealer``'s planner call) through fresh seal graphs of ``--graph-pages``."""
    with fresh_seal_graphs(sealer, dev, args.graph_pages):
        graphed = timed(one_call, dev, args)
        graphed.update(replays=sealer.seal_graphs.replays, captures=sealer.seal_graphs.captures,
                       graph_bytes=sealer.seal_graphs.graph_bytes, failed=sealer.seal_graphs.failed)
    return graphed


def profile_graphs(sealer: Sealer, one_call: Callable[[], object], dev: torch.device,
                   args: argparse.Namespace, name: str = "graphed") -> List[str]:  # fmt: skip
    """:func:`profile` of one replay of ``one_call``'s seal graphs (as ``name``), captured before the profile."""
    with fresh_seal_graphs(sealer, dev, args.graph_pages):
        one_call()
        return profile(one_call, dev, args.profile, name)


@contextlib.contextmanager
def cuda_methods_on_cpu() -> Iterator[None]:
    """The planner's CUDA-only choices (``CHAN_DROP_METHOD_ON_CUDA``, ``ESTIMATE_TERMS_ON_CUDA``) taken on CPU tensors
    too, for head dims their kernels support, as :mod:`mosaickv_sglang.planner` takes them on CUDA tensors."""
    with mock.patch.object(planner, "_channel_kernels_take", lambda x: x.shape[-1] in planner._CHAN_RANK_HEAD_DIMS):
        yield


def main(argv: List[str] = None) -> Dict[str, object]:
    args = build_parser().parse_args(argv)
    if args.cuda_methods_on_cpu:
        if args.device != "cpu":
            raise SystemExit(f"--cuda-methods-on-cpu: expected --device cpu, got {args.device!r}")
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--cuda-methods-on-cpu: expected TRITON_INTERPRET=1 (the kernels run in Triton's "
                             f"interpreter), got {os.environ.get('TRITON_INTERPRET')!r}")
        with cuda_methods_on_cpu():
            return _measure(args)
    return _measure(args)


def _measure(args: argparse.Namespace) -> Dict[str, object]:
    if args.threads:
        torch.set_num_threads(args.threads)
    planner.CHAN_DROP_METHOD_ON_CUDA = args.chan_drop
    planner.ESTIMATE_TERMS_ON_CUDA = args.estimate_terms
    pool = stand_in_pool(args)
    sealer = Sealer(pool, args.kv_heads * args.group, query_window=args.window)
    sealer.plan_max_segments, sealer.plan_max_chunk_bytes = args.max_segments, args.max_chunk_bytes
    fill_query_window(sealer, args)
    pages = np.arange(args.pages, dtype=np.int64)
    sinks = np.arange(args.pages) < args.sinks
    dev = torch.device(args.device)

    def per_layer() -> object:
        return [sealer.plan_layer(li, pages, sinks, args.ratio) for li in range(args.layers)]

    def one_call() -> object:
        return sealer.plan_layers(pages, sinks, args.ratio)

    before = timed(per_layer, dev, args)
    after = timed(one_call, dev, args)
    before_plans, after_plans = before.pop("result"), after.pop("result")
    same = differing_segments(before_plans, after_plans) == 0
    report = {"config": vars(args), "per_layer": before, "one_call": after, "identical_plans": same}
    if args.graph_pages:
        report["graphed"] = timed_graphs(sealer, one_call, dev, args)
        report["graphed_differing_segments"] = differing_segments(after_plans, report["graphed"].pop("result"))
        if args.also_lagrange_bracket:
            with mock.patch.dict(os.environ, {lagrange.BRACKET_ENV_VAR: args.also_lagrange_bracket}):
                report["graphed_bracket"] = timed_graphs(sealer, one_call, dev, args)
            report["graphed_bracket_differing_segments"] = differing_segments(
                after_plans, report["graphed_bracket"].pop("result"))
    if args.also_estimate_terms:
        planner.ESTIMATE_TERMS_ON_CUDA = args.also_estimate_terms
        try:
            also = timed(one_call, dev, args)
        finally:
            planner.ESTIMATE_TERMS_ON_CUDA = args.estimate_terms
        report["one_call_also"] = also
        report["also_differing_segments"] = differing_segments(after_plans, also.pop("result"))
    if args.also_lagrange_bracket:
        with mock.patch.dict(os.environ, {lagrange.BRACKET_ENV_VAR: args.also_lagrange_bracket}):
            bracket = timed(one_call, dev, args)
        report["one_call_bracket"] = bracket
        report["bracket_differing_segments"] = differing_segments(after_plans, bracket.pop("result"))
    if args.profile:
        report["profile"] = (
            profile(per_layer, dev, args.profile, "per_layer")
            + profile(one_call, dev, args.profile, "one_call")
            + (profile_graphs(sealer, one_call, dev, args) if args.graph_pages else [])
        )  # fmt: skip
        if args.graph_pages and args.also_lagrange_bracket:
            with mock.patch.dict(os.environ, {lagrange.BRACKET_ENV_VAR: args.also_lagrange_bracket}):
                report["profile"] += profile_graphs(sealer, one_call, dev, args, "graphed_bracket")
    if args.json:
        print(json.dumps(report))
    else:
        threads = torch.get_num_threads()
        print(f"seal of {args.layers} layers x {args.kv_heads} KV heads x {args.pages} pages of {args.page_size} "
              f"tokens, d={args.head_dim}, {args.dtype} on {args.device} ({threads} threads)")  # fmt: skip
        rows = [("per-layer plan_fast (before)", before), ("one-call plan_fast_layers (after)", after)]
        if args.graph_pages:
            rows.append((f"seal graphs {args.graph_pages}", report["graphed"]))
        for name, r in rows:
            counts = "" if args.no_count else (f"   host syncs {r['syncs']:5d}   device copies {r['copies']:4d}"
                                               f"   ops {r['ops']:6d} (kernel {r['ops_by_kind']['kernel']:6d}, "
                                               f"triton {r['ops_by_kind']['triton']:3d})")
            peak = f"   peak +{r['peak_transient_bytes'] / 2**20:.0f} MiB" if "peak_transient_bytes" in r else ""
            print(f"  {name:36s} {1e3 * r['seconds']:10.1f} ms (host {1e3 * r['host_seconds']:.1f} ms){counts}{peak}")
        print(f"  speed-up {before['seconds'] / after['seconds']:.2f}x; identical plans: {same}")
        if args.graph_pages:
            g = report["graphed"]
            print(f"  seal graphs: {g['replays']} replays, {g['captures']} captured, {g['graph_bytes'] / 2**20:.0f} "
                  f"MiB{'' if g['failed'] is None else ', failed: ' + g['failed']}; host time "
                  f"{after['host_seconds'] / g['host_seconds']:.1f}x lower than one call's; segments planned "
                  f"differently: {report['graphed_differing_segments']}")
        if args.also_estimate_terms:
            also = report["one_call_also"]
            print(f"  one call, estimate terms {args.estimate_terms}: {1e3 * after['seconds']:.1f} ms; "
                  f"{args.also_estimate_terms}: {1e3 * also['seconds']:.1f} ms "
                  f"({after['seconds'] / also['seconds']:.2f}x); segments planned differently: "
                  f"{report['also_differing_segments']}"
                  + ("" if dev.type == "cuda" else " (not on CUDA: both took the torch ops)"))
        if args.also_lagrange_bracket and args.graph_pages:
            g, gb = report["graphed"], report["graphed_bracket"]
            print(f"  seal graphs, bracket {lagrange.bracket_method()}: {1e3 * g['seconds']:.2f} ms, "
                  f"{g['graph_bytes'] / 2**20:.0f} MiB; {args.also_lagrange_bracket}: {1e3 * gb['seconds']:.2f} ms, "
                  f"{gb['graph_bytes'] / 2**20:.0f} MiB; segments planned differently: "
                  f"{report['graphed_bracket_differing_segments']}")
        if args.also_lagrange_bracket:
            br = report["one_call_bracket"]
            launches = "" if args.no_count else (f"; kernel ops {after['ops_by_kind']['kernel']} -> "
                                                 f"{br['ops_by_kind']['kernel']}, Triton launches "
                                                 f"{after['ops_by_kind']['triton']} -> {br['ops_by_kind']['triton']}")
            print(f"  one call, bracket {lagrange.bracket_method()}: {1e3 * after['seconds']:.1f} ms; "
                  f"{args.also_lagrange_bracket}: {1e3 * br['seconds']:.1f} ms{launches}; segments planned "
                  f"differently: {report['bracket_differing_segments']}")
        if not args.no_count:
            print("  one-call kernel ops by site: " + ", ".join(f"{k} {v}" for k, v in
                                                              list(after["kernel_ops_by_site"].items())[:8]))
        if args.profile:
            print(f"  profiles: {', '.join(report['profile'])}")
    return report


if __name__ == "__main__":
    main()
