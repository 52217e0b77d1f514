# SPDX-License-Identifier: Apache-2.0
"""Target of the multi-process TP test (test_tp_processes.py): one tensor-parallel rank in its own process.

Each rank drives the same batches through its own pool and backend (its own K/V and queries, as its own KV heads
would be) and, after every step, all-gathers over gloo a digest of its page-level state. It lives in its own
module, importable by name through PYTHONPATH, because a spawned child imports its target by module name.
"""

from __future__ import annotations

import hashlib
from typing import Any, List

import numpy as np

PROMPTS = [1, 16, 37, 80]
STEPS = ["extend"] + ["extend16"] * 3 + ["decode"] * 3


def page_state_digest(sc: Any) -> str:
    """What every rank must agree on: logical -> physical pages, live and sealed pages, ledger and counters."""
    pool, sealer = sc.pool, sc.mosaic.sealer
    h = hashlib.sha256()
    for arr in (pool._l2p, pool._live, pool.store.page_state().numpy()):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update(f"{pool.arena_ledger.reserved}/{sealer.pages_sealed}/{sealer.pressure_pages_sealed}".encode())
    h.update(f"{sealer.cold_pages_sealed}/{sealer.async_seals}/{sealer.pending_voided}".encode())
    return h.hexdigest()


def run_rank(
    rank: int, world: int, init_file: str, arena_granules: int, hot_pages: int, queue: Any, beside_async: bool = False
) -> None:
    """One rank's run; ``beside_async``: sealing beside the step, in two halves packed 2 plans later, half the hot
    pool kept free (cold pages sealed)."""
    import torch.distributed as dist
    from mkv_backend_cases import S, Scenario, config

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        sc = Scenario(config(ratio=3.0, hot_window=32), group=2, seed=101 + rank, auto_seal=True, hot=hot_pages * S,
                      arena_granules_per_layer=arena_granules)  # fmt: skip
        if beside_async:
            sealer = sc.mosaic.sealer
            sealer.seal_beside_step, sealer.seal_async, sealer.seal_async_plans = True, True, 2
            sealer.low_water_pages = hot_pages // 2
        agreed: List[bool] = []
        for step in STEPS:
            batch = {"extend": lambda: sc.extend_batch(PROMPTS), "extend16": lambda: sc.extend_batch([16] * 4),
                     "decode": sc.decode_batch}[step]()  # fmt: skip
            sc.run_mosaic(batch)
            digests: List[Any] = [None] * world
            dist.all_gather_object(digests, page_state_digest(sc))
            agreed.append(len(set(digests)) == 1)
        sc.pool.check_invariants()
        arena_used = sum(a.used_granules for a in sc.pool.store.allocators)
        sealer = sc.mosaic.sealer
        stats = (sealer.pages_sealed, sealer.pressure_pages_sealed, sealer.pages_left_dense,
                 sc.pool.arena_ledger.reserved, arena_used, sealer.cold_pages_sealed, sealer.async_seals)  # fmt: skip
        queue.put((rank, agreed, stats, None))
    except Exception as err:  # noqa: BLE001 - reported to the parent test
        queue.put((rank, [], (), repr(err)))
    finally:
        dist.destroy_process_group()
