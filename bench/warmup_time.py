# SPDX-License-Identifier: Apache-2.0
"""Kernel warmup cost: how many Triton variants a server of one shape compiles before it is ready, and how long.

Run on the GPU machine with an empty Triton cache to see a first start (``TRITON_CACHE_DIR=$(mktemp -d) python -m
bench.warmup_time``); a second run shows a restart (everything cached). The shape defaults to Llama-3.1-8B's
(8 KV heads, GQA 4, d=128, 32 layers) on an H100 / H200 (132 SMs); it is warmed without and then with the sidecar's
low-rank ranks, as ``mosaickv_sglang.warmup`` does at server start.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import torch

from mosaickv_sglang.warmup import WarmupShape, enumerate_variants, run_warmup


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.warmup_time", description=__doc__.split("\n\n")[0])
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--group", type=int, default=4, help="query heads per KV head")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seg-size", type=int, default=64)
    ap.add_argument("--read-budget-segments", type=int, default=64)
    ap.add_argument("--sidecar-ranks", type=int, nargs="*", default=[8, 16, 32])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("warmup_time: expected a CUDA GPU, got none", file=sys.stderr)
        return 2
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    for ranks in ((), tuple(args.sidecar_ranks)):
        shape = WarmupShape(num_kv_heads=args.kv_heads, group=args.group, head_dim=args.head_dim,
                            seg_size=args.seg_size, dtype=torch.bfloat16, q_dtype=torch.bfloat16,
                            num_layers=args.layers, num_sms=num_sms, read_budget_segments=args.read_budget_segments,
                            sidecar_ranks=ranks)  # fmt: skip
        n, seconds = run_warmup(enumerate_variants(shape), shape, "cuda")
        print(f"sidecar ranks {ranks or 'none'}: {n} kernel variants compiled in {seconds:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
