# SPDX-License-Identifier: Apache-2.0
"""Host (Python/CPU) time of one MosaicKV decode step, split by part, on the CPU.

The plan step of :class:`~mosaickv_sglang.attention_backend.MosaicAttnBackend` (``init_forward_metadata``) and the
host part of every layer's ``forward_decode`` (``set_kv_buffer``, ``QueryWindow.observe``, the layer checks and table
lookups) are the same code on the CPU as on the GPU, so their cost can be measured here. The attention kernels are not
run: nothing they write is read by the next step's plan.

State per configuration: ``B`` requests with contexts of about ``--contexts`` tokens (a random offset in ``[0, S)``
each, so that requests cross page boundaries on different steps), logical pages handed out in a shuffled order,
every page the policy would have sealed marked sealed in every layer (host mirrors only: the packed payloads are
not needed for host work), the hot windows dense on physical pages. Policy seals are held back during the measured
steps (``min_seal_pages`` raised) so that only the sealer's *decisions* are timed, not the planner or the pack kernel.

Usage::

    python -m bench.host_overhead --out host.json             # every shape, B = 1, 32, 128, contexts 2k and 8k
    python -m bench.host_overhead --compare before.json host.json   # a before/after table of two runs
    python -m bench.host_overhead --cuda-graph --shapes 8b --batches 32 --contexts 32768   # the served decode path
"""

from __future__ import annotations

import argparse
import atexit
import cProfile
import datetime
import gc
import json
import os
import platform
import pstats
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

SHAPES = {
    "smollm2": dict(layers=30, q_heads=9, kv_heads=3, head_dim=64),  # SmolLM2-135M
    "8b": dict(layers=32, q_heads=32, kv_heads=8, head_dim=128),  # Llama-3-8B
}
S = 64
HOT_WINDOW = 512
SINK_TOKENS = 64
STEP_PARTS = ["rows_and_prep", "before_forward", "ensure_physical_note_writes", "decode_metadata", "plan_decode_rest",
              "sidecar_tick"]  # fmt: skip
LAYER_PARTS = ["set_kv_buffer", "window_observe", "check_and_tables"]
# methods of the pool timed as "decode_metadata" (whichever the backend calls)
METADATA_METHODS = ("decode_metadata", "decode_metadata_rows")


class Timers:
    """Seconds spent per key, summed over calls since the last :meth:`reset`."""

    def __init__(self) -> None:
        self.acc: Dict[str, float] = {}

    def reset(self) -> None:
        self.acc = {}

    def add(self, key: str, dt: float) -> None:
        self.acc[key] = self.acc.get(key, 0.0) + dt

    def wrap(self, obj: Any, name: str, key: str) -> None:
        """Time every call of ``obj.name`` under ``key`` (an instance attribute shadowing the method)."""
        fn = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(key, time.perf_counter() - t0)

        setattr(obj, name, timed)


class DecodeState:
    """A backend over a pool in the state described in the module docstring, and a page allocator for new tokens."""

    def __init__(self, shape: str, batch: int, context: int, steps: int, sidecar: bool, seed: int,
                 cuda_graph: bool = False) -> None:  # fmt: skip
        from mosaickv_sglang.attention_backend import MosaicAttnBackend
        from mosaickv_sglang.config import MosaicKVConfig
        from mosaickv_sglang.kv_pool import MosaicMHATokenToKVPool
        from mosaickv_sglang.pool import PAGE_SEALED, sealable_pages

        sh = SHAPES[shape]
        self.shape, self.batch, self.context = shape, batch, context
        self.layers, self.q_heads, self.kv_heads, self.head_dim = (sh[k] for k in ("layers", "q_heads", "kv_heads",
                                                                                  "head_dim"))  # fmt: skip
        rng = np.random.default_rng(seed)
        self.lens = [context + int(x) for x in rng.integers(0, S, size=batch)]
        max_ctx = max(self.lens) + steps + 1
        pages_per_req = -(-max_ctx // S)
        num_pages = batch * pages_per_req + 8
        dense_pages = batch * (HOT_WINDOW // S + 3) + 8
        cfg = MosaicKVConfig("mosaic", segment_size=S, hot_window=HOT_WINDOW, sink_tokens=SINK_TOKENS, sidecar=sidecar)
        self.pool = pool = MosaicMHATokenToKVPool(
            num_pages * S, S, torch.float16, self.kv_heads, self.head_dim, self.layers, "cpu", False,
            mosaic_config=cfg, hot_tokens=dense_pages * S, arena_granules_per_layer=16,
        )  # fmt: skip
        self.req_to_token = torch.zeros(batch, max_ctx + S, dtype=torch.int32)
        runner = SimpleNamespace(device="cpu", req_to_token_pool=SimpleNamespace(req_to_token=self.req_to_token),
                                 token_to_kv_pool=pool)  # fmt: skip
        self.backend = MosaicAttnBackend(runner, num_q_heads=self.q_heads, auto_seal=True)
        self.backend.sealer.min_seal_pages = 1 << 30
        self.cuda_graph = cuda_graph
        if cuda_graph:  # decode batches planned into the static buffers, as under SGLang's CUDA-graph runner
            self.backend.init_cuda_graph_state(max_bs=batch, max_num_tokens=batch)
        self.free_pages = list(rng.permutation(np.arange(1, pool.num_logical_pages)).astype(np.int64))
        self.pages: List[List[int]] = []
        sealed, dense, dense_slots = [], [], []
        for n in self.lens:
            pages = [self.free_pages.pop() for _ in range(-(-n // S))]
            self.pages.append(pages)
            row = (np.repeat(np.array(pages, dtype=np.int64), S) * S + np.tile(np.arange(S), len(pages)))[:n]
            self.req_to_token[len(self.pages) - 1, :n] = torch.from_numpy(row.astype(np.int32))
            n_seal = sealable_pages(torch.tensor(pages), n, HOT_WINDOW, SINK_TOKENS, page_size=S).pages.numel()
            sealed.extend(pages[:n_seal])
            dense.extend(pages[n_seal:])
            dense_slots.append(row[n_seal * S :])
        sealed_a = np.array(sealed, dtype=np.int64)
        pool.store._force_state(slice(None), sealed_a, PAGE_SEALED)
        pool._live[sealed_a] = True
        pool._fill[sealed_a] = S
        pool.ensure_physical(torch.tensor(dense, dtype=torch.int64))
        pool.note_writes(torch.from_numpy(np.concatenate(dense_slots)))
        pool.check_invariants()
        self.num_sealed, self.num_dense = int(sealed_a.size), len(dense)
        gen = torch.Generator().manual_seed(seed)
        d = self.head_dim
        self.q = torch.randn(batch, self.q_heads * d, generator=gen).half()
        self.k = torch.randn(batch, self.kv_heads, d, generator=gen).half()
        self.v = torch.randn(batch, self.kv_heads, d, generator=gen).half()
        if self.backend.sealer.sidecar is not None:
            self.backend.sealer.sidecar.client.wait_ready(120.0)

    def next_batch(self) -> SimpleNamespace:
        """One new token per request (a new page when the request's last page is full)."""
        from sglang.srt.model_executor.forward_batch_info import ForwardMode

        out = []
        for b, n in enumerate(self.lens):
            if n % S == 0:
                self.pages[b].append(self.free_pages.pop())
            slot = self.pages[b][n // S] * S + n % S
            self.req_to_token[b, n] = slot
            out.append(slot)
            self.lens[b] = n + 1
        seq = torch.tensor(self.lens, dtype=torch.int64)
        return SimpleNamespace(forward_mode=ForwardMode.DECODE, out_cache_loc=torch.tensor(out, dtype=torch.int64),
                               req_pool_indices=torch.arange(self.batch), seq_lens=seq, seq_lens_cpu=seq,
                               encoder_lens=None, batch_size=self.batch, num_padding=0)  # fmt: skip

    def layer(self, layer_id: int) -> SimpleNamespace:
        d = self.head_dim
        return SimpleNamespace(layer_id=layer_id, tp_q_head_num=self.q_heads, tp_k_head_num=self.kv_heads,
                               qk_head_dim=d, v_head_dim=d, scaling=d**-0.5, is_cross_attention=False,
                               sliding_window_size=None)  # fmt: skip

    def close(self) -> None:
        bridge = self.backend.sealer.sidecar
        if bridge is not None:
            bridge.close()
            atexit.unregister(bridge.close)  # it holds the pool


def instrument(st: DecodeState, timers: Timers) -> None:
    be, pool = st.backend, st.pool
    timers.wrap(be, "init_forward_metadata", "total")
    for name in ("before_forward", "before_forward_rows"):
        if hasattr(be.sealer, name):
            timers.wrap(be.sealer, name, "before_forward")
    timers.wrap(pool, "ensure_physical", "ensure_physical_note_writes")
    timers.wrap(pool, "note_writes", "ensure_physical_note_writes")
    timers.wrap(be, "_plan_decode", "plan_decode")
    timers.wrap(be, "_plan_decode_graph", "plan_decode_graph")
    for name in METADATA_METHODS:
        if hasattr(pool, name):
            timers.wrap(pool, name, "decode_metadata")
    if be.sealer.sidecar is not None:
        timers.wrap(be.sealer.sidecar, "tick", "sidecar_tick")


def run_step(st: DecodeState, timers: Optional[Timers]) -> None:
    """One decode step: the plan, then the host part of every layer (kernels not launched; with ``cuda_graph`` the
    layers replay in the graph, so the plan is all the step's host work)."""
    be, pool = st.backend, st.pool
    batch = st.next_batch()
    be.init_forward_metadata(batch)
    if st.cuda_graph:
        return
    h_q, d = st.q_heads, st.head_dim
    q, k, v = st.q, st.k, st.v
    clock = time.perf_counter
    for li in range(st.layers):
        lay = st.layer(li)
        t0 = clock()
        md = be._check_layer(lay, q, want_decode=True)
        be._layer_tables(lay)
        t1 = clock()
        if hasattr(be, "_write_kv"):  # what forward_decode calls
            be._write_kv(md, lay, batch.out_cache_loc, k, v)
        else:
            pool.set_kv_buffer(lay, batch.out_cache_loc, k, v)
        t2 = clock()
        be.sealer.window.observe(li - pool.start_layer, q.reshape(-1, h_q, d))
        t3 = clock()
        if timers is not None:
            timers.add("check_and_tables", t1 - t0)
            timers.add("set_kv_buffer", t2 - t1)
            timers.add("window_observe", t3 - t2)


def split(acc: Dict[str, float]) -> Dict[str, float]:
    """Seconds of one step -> milliseconds per part (STEP_PARTS and LAYER_PARTS, totals)."""
    g = acc.get
    tick = g("sidecar_tick", 0.0)
    meta = g("decode_metadata", 0.0)
    prep = g("before_forward", 0.0) + g("ensure_physical_note_writes", 0.0)
    if "plan_decode_graph" in acc:  # the graph plan holds the writes' preparation and the metadata
        rest = g("plan_decode_graph") - prep - meta
        rows = g("total", 0.0) - g("plan_decode_graph")
    else:
        rest = g("plan_decode", 0.0) - meta
        rows = g("total", 0.0) - prep - g("plan_decode", 0.0)
    ms = {
        "rows_and_prep": rows,
        "before_forward": g("before_forward", 0.0) - tick,
        "ensure_physical_note_writes": g("ensure_physical_note_writes", 0.0),
        "decode_metadata": meta,
        "plan_decode_rest": rest,
        "sidecar_tick": tick,
        "plan_total": g("total", 0.0),
    }
    for k in LAYER_PARTS:
        ms[k] = g(k, 0.0)
    ms["layers_total"] = sum(g(k, 0.0) for k in LAYER_PARTS)
    ms["step_total"] = ms["plan_total"] + ms["layers_total"]
    return {k: v * 1e3 for k, v in ms.items()}


def profile_top(st: DecodeState, steps: int, top: int) -> List[Dict[str, Any]]:
    """cProfile of ``steps`` more steps: the ``top`` functions by own time, per step."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        run_step(st, None)
    prof.disable()
    stats = pstats.Stats(prof)
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(dict(function=fn, where=f"{os.path.relpath(file) if file.startswith('/') else file}:{line}",
                         calls_per_step=nc / steps, tottime_ms=1e3 * tt / steps, cumtime_ms=1e3 * ct / steps))
    rows.sort(key=lambda r: -r["tottime_ms"])
    return rows[:top]


def run_config(shape: str, batch: int, context: int, args: argparse.Namespace) -> Dict[str, Any]:
    t0 = time.perf_counter()
    st = DecodeState(shape, batch, context, args.warmup + args.steps + args.profile_steps, args.sidecar == "on",
                     args.seed, args.cuda_graph)  # fmt: skip
    setup_s = time.perf_counter() - t0
    try:
        timers = Timers()
        instrument(st, timers)
        per_step = []
        for i in range(args.warmup + args.steps):
            timers.reset()
            run_step(st, timers)
            if i >= args.warmup:
                per_step.append(split(timers.acc))
        st.pool.check_invariants()
        med = {k: float(np.median([p[k] for p in per_step])) for k in per_step[0]}
        for k in LAYER_PARTS:
            med[k + "_per_layer"] = med[k] / st.layers
        top = profile_top(st, args.profile_steps, args.profile_top) if args.profile_steps else []
    finally:
        st.close()
    out = dict(shape=shape, batch=batch, context=context, layers=st.layers, sealed_pages=st.num_sealed,
               dense_pages=st.num_dense, setup_s=setup_s, median_ms=med, profile_top=top)  # fmt: skip
    del st, timers
    gc.collect()  # the timing wrappers make cycles; free this configuration's buffers before the next one
    return out


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


COLUMNS = [("rows_and_prep", "rows+prep"), ("before_forward", "before_fwd"),
           ("ensure_physical_note_writes", "ensure+note"), ("decode_metadata", "decode_meta"),
           ("plan_decode_rest", "plan_rest"), ("sidecar_tick", "tick"), ("plan_total", "plan"),
           ("set_kv_buffer_per_layer", "set_kv/layer"), ("window_observe_per_layer", "observe/layer"),
           ("layers_total", "layers"), ("step_total", "step")]  # fmt: skip


def table(results: Sequence[Dict[str, Any]]) -> str:
    head = "| shape | B | ctx | " + " | ".join(c for _, c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (3 + len(COLUMNS))]
    for r in results:
        m = r["median_ms"]
        lines.append(f"| {r['shape']} | {r['batch']} | {r['context']} | "
                     + " | ".join(f"{m[k]:.3f}" for k, _ in COLUMNS) + " |")  # fmt: skip
    return "\n".join(lines)


def compare_table(before: Dict[str, Any], after: Dict[str, Any]) -> str:
    """Before/after of the plan, the per-layer parts and the step, per configuration present in both runs."""
    idx = {(r["shape"], r["batch"], r["context"]): r["median_ms"] for r in before["results"]}
    keys = [("plan_total", "plan"), ("before_forward", "before_fwd"), ("decode_metadata", "decode_meta"),
            ("rows_and_prep", "rows+prep"), ("layers_total", "layers (all)"), ("step_total", "step")]  # fmt: skip
    lines = ["| shape | B | ctx | " + " | ".join(f"{c} before → after" for _, c in keys) + " | step speed-up |",
             "|" + "---|" * (4 + len(keys))]  # fmt: skip
    for r in after["results"]:
        b = idx.get((r["shape"], r["batch"], r["context"]))
        if b is None:
            continue
        a = r["median_ms"]
        cells = [f"{b[k]:.2f} → {a[k]:.2f}" for k, _ in keys]
        lines.append(f"| {r['shape']} | {r['batch']} | {r['context']} | " + " | ".join(cells)
                     + f" | {b['step_total'] / max(a['step_total'], 1e-9):.1f}x |")  # fmt: skip
    return "\n".join(lines)


def _int_list(text: str) -> List[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.host_overhead", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--shapes", default="smollm2,8b", help=f"comma-separated, of {sorted(SHAPES)}")
    ap.add_argument("--batches", type=_int_list, default=[1, 32, 128], help="decode batch sizes (default 1,32,128)")
    ap.add_argument("--contexts", type=_int_list, default=[2048, 8192], help="context tokens (default 2048,8192)")
    ap.add_argument("--steps", type=int, default=12, help="measured decode steps per configuration (median)")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured decode steps first")
    ap.add_argument("--profile-steps", type=int, default=3, help="steps under cProfile after the measured ones")
    ap.add_argument("--profile-top", type=int, default=15, help="functions kept from the profile (by own time)")
    ap.add_argument("--sidecar", choices=("on", "off"), default="on", help="start the CPU sidecar (server default)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="plan each step as a CUDA-graph decode step (static buffers; the layers' host work is then in "
                         "the graph, so only the plan is timed)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a scheduler process uses 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="print a before/after table of two runs")
    args = ap.parse_args(argv)
    if args.compare:
        runs = []
        for path in args.compare:
            with open(path) as f:
                runs.append(json.load(f))
        print(compare_table(*runs))
        return 0
    shapes = [s for s in args.shapes.split(",") if s]
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"--shapes: expected names of {sorted(SHAPES)}, got {s!r}")
    if args.steps < 1 or args.warmup < 0 or args.profile_steps < 0:
        ap.error(f"--steps/--warmup/--profile-steps: expected >= 1 / >= 0 / >= 0, got {args.steps} / {args.warmup} / "
                 f"{args.profile_steps}")  # fmt: skip
    torch.set_num_threads(args.threads)
    results = []
    for shape in shapes:
        for ctx in args.contexts:
            for b in args.batches:
                r = run_config(shape, b, ctx, args)
                results.append(r)
                m = r["median_ms"]
                print(f"{shape} B={b} ctx={ctx}: plan {m['plan_total']:.2f} ms, layers {m['layers_total']:.2f} ms, "
                      f"step {m['step_total']:.2f} ms (setup {r['setup_s']:.1f} s)", file=sys.stderr, flush=True)
    out = dict(
        date=datetime.date.today().isoformat(), commit=_git_commit(), command=" ".join(["python -m bench.host_overhead"]
                                                                                       + list(argv or sys.argv[1:])),
        machine=dict(cpus=os.cpu_count(), processor=platform.processor() or platform.machine(),
                     python=platform.python_version(), torch=torch.__version__, threads=args.threads),
        steps=args.steps, warmup=args.warmup, sidecar=args.sidecar, cuda_graph=args.cuda_graph, results=results,
    )  # fmt: skip
    print(table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
