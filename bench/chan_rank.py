# SPDX-License-Identifier: Apache-2.0
"""Cost of the seal planner's chan drop masks: the int64-key ``torch.topk`` path against a full ``torch.sort`` of the
keys and the rank kernel variants.

On the same fp16-rounded vectors ``[N, S, d]`` and weights ``[N, d]``, times (``triton.testing.do_bench``, CUDA
events) ``planner._chan_drop_masks`` for ``--ks`` through each method, and ``chan_rank_fwd`` alone for each launch
variant (algorithm, rows per program, channels per count step, warps), after checking that every variant's masks
equal the topk path's. Prints one line per provider and, with ``--json``, one JSON object (device, versions,
config, times in ms). The 8B shape sealing 128 pages in one call::

    python -m bench.chan_rank --segments 32768 --seg-size 64 --head-dim 128
"""

from __future__ import annotations

import argparse
import json
from typing import Dict, List

import torch
import triton

import mosaickv_sglang.kernels  # noqa: F401  (the kernels package mapping, as bench.seal_cost does)
from mosaickv_sglang.kernels.chan_rank import ALGO_COUNT, ALGO_SORT, chan_rank_fwd, default_block_r
from mosaickv_sglang.planner import _chan_drop_masks
from mosaickv_sglang.strategies.base import chan_scores


def variants(d: int) -> List[Dict[str, object]]:
    """Launch variants timed: the defaults, then rows per program and warps around them, and the count kernel."""
    br = default_block_r(d)
    out: List[Dict[str, object]] = [dict(algo=ALGO_SORT)]
    out += [dict(algo=ALGO_SORT, block_r=r, num_warps=w) for r, w in ((max(1, br // 2), 4), (br * 2, 4), (br, 8),
                                                                      (br * 2, 8), (max(1, br // 2), 2))]
    out += [dict(algo=ALGO_COUNT, block_r=r, block_j=j, num_warps=w, unroll=u)
            for r, j, w, u in ((br, 1, 4, True), (br * 2, 1, 4, True), (br, 4, 4, True), (br, 1, 4, False),
                               (max(1, br // 2), 8, 4, True), (br * 2, 2, 8, True))]  # fmt: skip
    return out


def main(argv=None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--segments", type=int, default=32768, help="N: layers x KV heads x pages")
    p.add_argument("--seg-size", type=int, default=64, help="S: tokens per segment")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--ks", type=int, nargs="+", default=None, help="kept channels (default d/8 d/4 d/2)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench time per provider")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.chan_rank needs a CUDA GPU")
    n, s, d = args.segments, args.seg_size, args.head_dim
    ks = args.ks or [d // 8, d // 4, d // 2]
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    x = torch.randn(n, s, d, device="cuda", generator=gen).half().float()  # fp16 values: tied |x| in a vector
    w = torch.rand(n, d, device="cuda", generator=gen)
    want = _chan_drop_masks(x, w, ks, method="topk")
    score = chan_scores(x, w).contiguous()
    times: Dict[str, object] = {}

    def bench(name: str, fn) -> None:
        times[name] = triton.testing.do_bench(fn, warmup=5, rep=args.rep_ms)
        print(f"{name:60s} {times[name]:9.3f} ms", flush=True)

    bench("masks topk path", lambda: _chan_drop_masks(x, w, ks, method="topk"))
    for method in ("sort", "kernel"):
        got = _chan_drop_masks(x, w, ks, method=method)
        if not all(torch.equal(got[k], want[k]) for k in ks):
            raise SystemExit(f"{method} path masks differ from the topk path")
        del got
        bench(f"masks {method} path", lambda m=method: _chan_drop_masks(x, w, ks, method=m))
    out = torch.empty(score.shape, dtype=torch.uint8, device="cuda")
    for v in variants(d):
        name = "rank " + " ".join(f"{k}={val}" for k, val in v.items())
        try:
            chan_rank_fwd(score, out, **v)  # type: ignore[arg-type]
            if not all(torch.equal(out >= k, want[k]) for k in ks if k < d):
                raise SystemExit(f"{name}: masks differ from the topk path")
            bench(name, lambda: chan_rank_fwd(score, out, **v))  # type: ignore[arg-type]
        except Exception as e:  # a variant that does not compile is reported, not fatal
            times[name] = f"failed: {e!r}"[:300]
            print(f"{name:60s} {times[name]}", flush=True)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "config": dict(vars(args), ks=ks), "ms": times}  # fmt: skip
    if args.json:
        print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
