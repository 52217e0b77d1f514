# SPDX-License-Identifier: Apache-2.0
"""The metrics' strategy histogram of a store (``mosaickv_sglang.metrics._strategy_counts``) against a plain count of
its descriptor rows, and, on CUDA, queued without a single host wait."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from mkv_pool_cases import make_scenario

from mosaickv_sglang.kernels.format import K_FORM, N_ROWS, V_FORM
from mosaickv_sglang.metrics import STRATEGY_NAMES, _strategy_counts, strategy_name
from mosaickv_sglang.pool import PAGE_SEALED


def _plain_histogram(store) -> dict:
    """Each sealed page's rows, every layer and head, named one by one on the host."""
    counts = Counter()
    for li in range(store.num_layers):
        desc = store.desc[li].cpu().numpy()
        for page in np.flatnonzero(store.page_state(li).numpy() == PAGE_SEALED):
            for head in range(store.num_kv_heads):
                row = desc[page * store.num_kv_heads + head]
                counts[strategy_name(bool(row[N_ROWS] < store.page_size), int(row[K_FORM]), int(row[V_FORM]))] += 1
    return {name: counts.get(name, 0) for name in STRATEGY_NAMES}


def _sealed_scenario(seed: int, h: int, d: int, device: torch.device):
    """Ragged requests' full pages sealed by the fast planner at ratios 2.5 and 4 (some pages as dense sinks), chan
    pages beside them, pages sealed in the last layer only, then a few pages freed: mixed strategies over pages not in
    arena order, read in one gather and layer by layer."""
    sc = make_scenario(seed, seq_lens=[75, 40, 130, 17, 64], num_layers=2, h_kv=h, head_dim=d, device=device)
    full = [rp[: n // sc.s] for rp, n in zip(sc.req_pages, sc.seq_lens)]
    first, second, chan, last_layer = full[0], torch.cat([full[1], full[3]]), full[2], full[4]
    sc.store.seal(last_layer, sc.k_bufs, sc.v_bufs, sc.slot_of_page[last_layer],
                  sc.plans(last_layer, "fast", ratio=3.0, layers=[1]), layer_ids=[1])  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    sinks = torch.rand(first.numel(), generator=gen) < 0.4
    sc.store.seal(first, sc.k_bufs, sc.v_bufs, sc.slot_of_page[first], sc.plans(first, "fast", sinks, ratio=2.5))
    sc.store.seal(second, sc.k_bufs, sc.v_bufs, sc.slot_of_page[second], sc.plans(second, "fast", ratio=4.0))
    sc.store.seal(chan, sc.k_bufs, sc.v_bufs, sc.slot_of_page[chan], sc.plans(chan, "chan"))
    sc.store.free(torch.cat([first[:1], chan[-2:]]))
    return sc.store


@pytest.mark.parametrize("seed,h,d", [(0, 1, 64), (1, 2, 128), (2, 4, 64)])
def test_counts_equal_a_plain_count_of_the_sealed_rows(device, h, d, seed):
    store = _sealed_scenario(seed, h, d, device)
    want = _plain_histogram(store)
    assert sum(v > 0 for v in want.values()) >= 2  # more than one strategy to tell apart
    assert set(store.layers_sealed().tolist()) == {0, 1, 2}  # pages sealed in some layers and in all
    got = _strategy_counts(store)
    assert got.device.type == device.type
    assert dict(zip(STRATEGY_NAMES, got.tolist())) == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_counts_are_queued_on_cuda_without_the_host_waiting():
    """Under ``torch.cuda.set_sync_debug_mode("error")`` any host wait raises (``torch.bincount`` did: it reads its
    input's min and max); the counts, read afterwards, are the plain ones."""
    store = _sealed_scenario(3, 2, 128, torch.device("cuda"))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = _strategy_counts(store)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert dict(zip(STRATEGY_NAMES, got.tolist())) == _plain_histogram(store)
