# SPDX-License-Identifier: Apache-2.0
"""--mosaic-axes token|channel: the served single-axis baselines. The sealer's fast plans (and the sidecar's menu)
use one axis only, at the same byte budget as the 2-D plans; a ratio the restricted menu cannot reach is refused
when the pool is built, and arena retries stay below it."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sglang")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helper modules (importlib import mode)

from mkv_metrics_cases import write_pages  # noqa: E402
from test_kv_pool import GROUP, H_KV, LAYERS, D, S, _config, build_pool  # noqa: E402

from mosaickv_sglang.config import MosaicConfigError  # noqa: E402
from mosaickv_sglang.kernels import format as fmt  # noqa: E402
from mosaickv_sglang.sealer import Sealer  # noqa: E402
from mosaickv_sglang.sidecar.bridge import SidecarBridge  # noqa: E402
from mosaickv_sglang.strategies import default_menu, menu_max_ratio, restrict_menu  # noqa: E402

PAGES = np.arange(1, 9, dtype=np.int64)


def _sealed(axes: str, ratio: float = 3.0):
    pool = build_pool(64 * S, 32 * S, dataclasses.replace(_config(ratio=ratio), axes=axes))
    sealer = Sealer(pool, num_q_heads=H_KV * GROUP)
    gen = torch.Generator().manual_seed(7)
    for li in range(LAYERS):
        sealer.window.observe(li, torch.randn(8, H_KV * GROUP * D, generator=gen).half())
    write_pages(pool, PAGES, seed=3)
    assert sealer.seal(PAGES, np.zeros(PAGES.size, dtype=bool))
    rows = (PAGES[:, None] * H_KV + np.arange(H_KV)[None, :]).reshape(-1)
    desc = torch.stack([pool.store.desc[li][torch.from_numpy(rows)] for li in range(LAYERS)]).reshape(-1, 8)
    return pool, sealer, desc


@pytest.mark.parametrize("axes", ["token", "channel", "both"])
def test_the_fast_plans_use_the_axes_asked_for_at_the_same_bytes(axes):
    pool, sealer, desc = _sealed(axes)
    rows, k_form, v_form = desc[:, fmt.N_ROWS], desc[:, fmt.K_FORM], desc[:, fmt.V_FORM]
    dropped, chan = bool((rows < S).any()), bool(((k_form == fmt.FORM_CHAN) | (v_form == fmt.FORM_CHAN)).any())
    if axes == "token":
        assert dropped and not chan and bool((k_form == fmt.FORM_DENSE).all() and (v_form == fmt.FORM_DENSE).all())
    elif axes == "channel":
        assert chan and not dropped
    else:  # which axes the 2-D planner uses depends on the data (random K/V here: channels only, at ratio 3)
        assert sealer.menu == default_menu(S, D, lowrank=False)
    assert sealer.max_ratio < 16
    # the same byte budget as the 2-D plans: stored bytes (descriptors and bounds included) at about ratio 3 for all
    # three settings (2.80 to 2.84 here)
    assert 2.7 <= pool.store.compression_ratio() <= 3.0
    pool.check_invariants()


@pytest.mark.parametrize("axes", ["token", "channel"])
def test_a_ratio_the_axes_cannot_reach_is_refused_when_the_pool_is_built(axes):
    reach = menu_max_ratio(restrict_menu(default_menu(S, D, lowrank=False), axes, S), S, D)
    with pytest.raises(MosaicConfigError, match=rf"--mosaic-compression-ratio: expected at most {reach * 0.999:.2f} "
                                                rf"with --mosaic-axes {axes} \(segments of {S} tokens, head_dim {D}\), "
                                                rf"got {round(reach + 0.5)}; lower the ratio or use --mosaic-axes both"):
        build_pool(64 * S, 32 * S, dataclasses.replace(_config(ratio=float(round(reach + 0.5))), axes=axes))
    build_pool(64 * S, 32 * S, dataclasses.replace(_config(ratio=float(int(reach))), axes=axes))  # reachable: fine


def test_arena_retries_stay_below_the_menus_reach():
    """A seal that does not fit retries at higher ratios; with a single-axis menu those above its reach are skipped
    (planning them would raise), so the pages stay dense instead of failing the step. The arena here has room for
    the batch at 1.5x the ratio (the first retry, beyond the channel menu's reach) but not at the ratio itself."""
    cfg = dataclasses.replace(_config(ratio=4.0), axes="channel")
    sizing = build_pool(64 * S, 32 * S, cfg).arena_ledger
    none = np.zeros(PAGES.size, dtype=bool)
    at_ratio, at_retry = (int(sizing.reservation(none, r).sum()) for r in (4.0, 6.0))
    assert at_retry < at_ratio
    pool = build_pool(64 * S, 32 * S, cfg, arena_granules_per_layer=(at_ratio + at_retry) // 2)
    sealer = Sealer(pool, num_q_heads=H_KV * GROUP)
    write_pages(pool, PAGES, seed=4)
    assert pool.arena_ledger.room >= at_retry and sealer.max_ratio < 6.0
    assert not sealer.seal(PAGES, none)
    assert sealer.pages_left_dense == PAGES.size


def test_the_sidecar_plans_with_the_same_axes():
    for axes in ("token", "channel"):
        pool = build_pool(64 * S, 32 * S, dataclasses.replace(_config(ratio=3.0), axes=axes))
        bridge = SidecarBridge.create(pool, Sealer(pool, num_q_heads=H_KV * GROUP).window)
        menu = bridge.client.config.menu
        if axes == "token":
            assert all(c.k_form == c.v_form == fmt.FORM_DENSE for c in menu) and min(c.m for c in menu) < S
        else:
            assert all(c.m == S and fmt.FORM_LOWRANK not in (c.k_form, c.v_form) for c in menu)
        assert bridge.client.config.max_rank == 0
