# SPDX-License-Identifier: Apache-2.0
"""Scheduler time of applying one sidecar plan, with the GPU idle and with a step's work still queued.

The seventeenth run's slowest unit of sidecar work on the scheduler thread was applying a plan (6.0 ms on SmolLM2):
:meth:`CompressedKVStore.reseal_segments`, which the bridge's apply calls, uploads the job's K/V and plan, launches
the pack kernel and swaps the descriptors. This times that call on a real store on ``--device``: ``--layers`` layers
of ``--kv-heads`` heads, pages sealed with the fast planner, then ``--jobs`` jobs of ``--pages`` pages of one layer
each re-sealed from host K/V and a host plan (:func:`~mosaickv_sglang.planner.plan_exact` with the sidecar's menu),
both pinned as the bridge's I/O thread pins them. Each job is applied three times per round, the order rotating:

* ``idle``: the whole apply (:meth:`CompressedKVStore.reseal_segments`) with the device idle when it starts;
* ``busy``: the same with ``--busy-ms`` of device work queued just before (a spin kernel, like a decode step in
  flight);
* ``commit``: what the scheduler thread does when the bridge's I/O thread staged the job first
  (:meth:`CompressedKVStore.stage_reseal` on a side stream on CUDA, not timed), i.e.
  :meth:`CompressedKVStore.reseal_staged`, the device busy as in ``busy``.

Host time of each apply (no synchronisation inside the timed span) is reported per mode (median, max), with, on
CUDA, the part spent in each function (``--profile N``: the ``N`` functions of most cumulative time over the busy
applies). An apply that waits for the device shows up as ``busy`` minus ``idle`` near ``--busy-ms``::

    python -m bench.apply_cost --kv-heads 3 --head-dim 64 --pages 10 --device cuda --dtype fp16 --profile 25
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from mosaickv_sglang.kernels.format import K_FORM, K_PARAM, V_FORM, V_PARAM
from mosaickv_sglang.planner import plan_exact, plan_fast
from mosaickv_sglang.pool.store import CompressedKVStore, pin_plan
from mosaickv_sglang.strategies.menu import default_menu

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("idle", "busy", "commit")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.apply_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, choices=(64, 128), default=64)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--pages", type=int, default=10, help="pages per job (the bridge's max_segments / kv heads)")
    p.add_argument("--jobs", type=int, default=16, help="jobs applied per round (each on its own pages)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every job in every mode (the first is warm-up)")
    p.add_argument("--ratio", type=float, default=3.0)
    p.add_argument("--busy-ms", type=float, default=5.0, help="device work queued before a busy apply")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="the N functions of most time (busy applies)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _check(args: argparse.Namespace) -> None:
    for name in ("layers", "kv_heads", "pages", "jobs", "rounds"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if args.ratio < 1:
        raise SystemExit(f"--ratio: expected >= 1, got {args.ratio}")
    if args.busy_ms < 0:
        raise SystemExit(f"--busy-ms: expected >= 0, got {args.busy_ms}")


def _spin(device: torch.device) -> Callable[[float], None]:
    """A function queueing about ``ms`` of device work (CUDA: ``torch.cuda._sleep``, calibrated once); a no-op on the
    CPU, where nothing is queued."""
    if device.type != "cuda":
        return lambda ms: None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 1_000_000
    torch.cuda._sleep(cycles)  # first launch
    torch.cuda.synchronize(device)
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    per_ms = cycles / max(start.elapsed_time(end), 1e-3)
    return lambda ms: torch.cuda._sleep(int(per_ms * ms)) if ms > 0 else None


def _sealed_store(args: argparse.Namespace, gen: torch.Generator) -> CompressedKVStore:
    """A store whose ``jobs * pages`` pages are sealed dense in every layer (so that each re-seal changes their
    descriptors), with room for the re-seals' payloads next to them."""
    s, h, d, dev = args.page_size, args.kv_heads, args.head_dim, torch.device(args.device)
    dt = DTYPES[args.dtype]
    pages = args.jobs * args.pages
    seg_granules = 2 * s * d // 64 + 8
    store = CompressedKVStore(args.layers, pages + 1, s, h, d, dt, dev, 3 * pages * h * seg_granules)
    slots = pages * s
    k_bufs = [torch.randn(slots, h, d, generator=gen).to(dev, dt) for _ in range(args.layers)]
    v_bufs = [(torch.randn(slots, h, d, generator=gen) + 0.5).to(dev, dt) for _ in range(args.layers)]
    seg = lambda x: x.view(pages, s, h, d).permute(0, 2, 1, 3).reshape(pages * h, s, d)  # noqa: E731
    q = 1.5 * torch.randn(pages * h, 8, 1, d, generator=gen).to(dev)
    plans = [plan_fast(seg(k_bufs[li]), seg(v_bufs[li]), ratio=1.0, queries=q).plan for li in range(args.layers)]
    slot_of_page = torch.arange(slots, dtype=torch.int64).view(pages, s)
    store.mark_dense(torch.arange(1, pages + 1))
    store.seal(torch.arange(1, pages + 1), k_bufs, v_bufs, slot_of_page, plans)
    return store


def _host_jobs(args: argparse.Namespace, gen: torch.Generator) -> List[Dict[str, object]]:
    """The sidecar's replies: per job, pinned host K/V ``[P * H_kv, S, d]`` and a pinned host plan from
    :func:`plan_exact` with the sidecar's menu (low-rank forms included)."""
    s, d, n = args.page_size, args.head_dim, args.pages * args.kv_heads
    menu = default_menu(s, d, lowrank=True)
    pin = torch.device(args.device).type == "cuda"
    jobs = []
    for j in range(args.jobs):
        k = torch.randn(n, s, d, generator=gen).to(DTYPES[args.dtype])
        v = (torch.randn(n, s, d, generator=gen) + 0.5).to(DTYPES[args.dtype])
        q = 1.5 * torch.randn(n, 8, 1, d, generator=gen)
        plan = plan_exact(k, v, q, ratio=args.ratio, menu=menu).plan
        jobs.append({"pages": torch.arange(1 + j * args.pages, 1 + (j + 1) * args.pages), "layer": j % args.layers,
                     "keys": k.pin_memory() if pin else k, "values": v.pin_memory() if pin else v,
                     "plan": pin_plan(plan) if pin else plan})  # fmt: skip
    return jobs


def _landed(store: CompressedKVStore, jobs: List[Dict[str, object]]) -> bool:
    """Whether every job's descriptor rows hold its plan's forms and params (the last apply of each job)."""
    h = store.num_kv_heads
    for job in jobs:
        rows = (job["pages"][:, None] * h + torch.arange(h)[None, :]).reshape(-1)
        desc = store.desc[job["layer"]].cpu()[rows]
        plan = job["plan"]
        got = [desc[:, c] for c in (K_FORM, K_PARAM, V_FORM, V_PARAM)]
        want = [plan.k_form, plan.k_param, plan.v_form, plan.v_param]
        if not all(torch.equal(g.to(torch.int32), w.cpu().to(torch.int32)) for g, w in zip(got, want)):
            return False
    return True


def run(args: argparse.Namespace) -> Dict[str, object]:
    _check(args)
    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    store = _sealed_store(args, gen)
    jobs = _host_jobs(args, gen)
    spin = _spin(dev)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    times: Dict[str, List[float]] = {m: [] for m in MODES}
    prof: Optional[cProfile.Profile] = cProfile.Profile() if args.profile else None
    side = torch.cuda.Stream(dev) if dev.type == "cuda" else None
    for r in range(args.rounds):
        for j, job in enumerate(jobs):
            k = (r + j) % len(MODES)
            for mode in MODES[k:] + MODES[:k]:
                sync()
                inputs = (job["pages"], job["layer"], job["keys"], job["values"], job["plan"])
                staged = store.stage_reseal(*inputs, stream=side) if mode == "commit" else None
                spin(args.busy_ms if mode != "idle" else 0.0)
                profiled = prof is not None and mode == "busy" and r > 0
                if profiled:
                    prof.enable()
                t0 = time.perf_counter()
                handle = store.reseal_segments(*inputs) if staged is None else store.reseal_staged(staged)
                store.release(handle)
                took = time.perf_counter() - t0
                if profiled:
                    prof.disable()
                if r > 0:
                    times[mode].append(took)
    sync()
    report: Dict[str, object] = {"config": vars(args), "applies": len(times["idle"]),
                                 "plans_landed": _landed(store, jobs)}  # fmt: skip
    for mode in MODES:
        ms = [1e3 * t for t in times[mode]]
        report[mode] = {"median_ms": statistics.median(ms), "max_ms": max(ms), "mean_ms": statistics.fmean(ms)}
    if prof is not None:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(args.profile)
        report["profile"] = out.getvalue()
    return report


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    args = build_parser().parse_args(argv)
    report = run(args)
    if args.json:
        print(json.dumps(report))
        return report
    print(f"apply of one job: {args.pages} pages x {args.kv_heads} heads, S={args.page_size}, d={args.head_dim}, "
          f"{args.dtype} on {args.device}, {report['applies']} applies per mode; plans landed: "
          f"{report['plans_landed']}")  # fmt: skip
    for mode in MODES:
        r = report[mode]
        extra = {"busy": f" ({args.busy_ms:g} ms of device work queued)",
                 "commit": " (staged beforehand, as by the I/O thread; device busy)"}.get(mode, "")  # fmt: skip
        print(f"  {mode:6s} median {r['median_ms']:7.3f} ms  max {r['max_ms']:7.3f} ms  mean {r['mean_ms']:7.3f} ms"
              + extra)
    if "profile" in report:
        print(report["profile"])
    return report


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
