# SPDX-License-Identifier: Apache-2.0
"""The scheduler freezes its garbage-collector heap once, at an idle tick after its first decode batches
(mosaickv_sglang.gc_freeze, the AFTER Scheduler.on_idle hook in patches/scheduler.py)."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest

from mosaickv_sglang import gc_freeze


@pytest.fixture(autouse=True)
def _thawed(monkeypatch):
    from mosaickv_sglang.runtime import current_sealer, register_sealer

    monkeypatch.delenv(gc_freeze.ENV_VAR, raising=False)
    earlier = current_sealer()  # an earlier test's backend in this process: not this test's scheduler
    register_sealer(None)
    gc.unfreeze()
    gc_freeze._reset_for_tests()
    yield
    gc.unfreeze()
    gc_freeze._reset_for_tests()
    register_sealer(earlier)


def test_it_freezes_once_after_a_decode_batch():
    assert not gc_freeze.maybe_freeze(None)  # no mosaic backend in this process
    assert not gc_freeze.maybe_freeze(SimpleNamespace(decode_plans=0))  # startup: nothing served yet
    assert gc.get_freeze_count() == 0
    kept = [[] for _ in range(1000)]  # containers (tracked by the collector), alive now: frozen with the rest
    assert gc_freeze.maybe_freeze(SimpleNamespace(decode_plans=3))
    frozen = gc.get_freeze_count()
    assert frozen >= len(kept)
    later = [[] for _ in range(1000)]  # a second freeze would take these too
    assert not gc_freeze.maybe_freeze(SimpleNamespace(decode_plans=4))  # once
    # frozen objects may die meanwhile (the count falls), but none joins them without a freeze
    assert gc.get_freeze_count() <= frozen
    del kept, later


def test_the_setting_turns_it_off_and_a_bad_value_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(gc_freeze.ENV_VAR, "0")
    assert not gc_freeze.maybe_freeze(SimpleNamespace(decode_plans=3))
    assert gc.get_freeze_count() == 0
    monkeypatch.setenv(gc_freeze.ENV_VAR, " 1 ")
    assert gc_freeze.gc_freeze_enabled()
    monkeypatch.setenv(gc_freeze.ENV_VAR, "yes")
    with pytest.raises(ValueError, match=r"MOSAICKV_GC_FREEZE: expected 0 or 1, got 'yes'"):
        gc_freeze.maybe_freeze(SimpleNamespace(decode_plans=3))


def test_the_idle_hook_freezes_the_heap_of_a_mosaic_scheduler():
    pytest.importorskip("sglang")
    from mosaickv_sglang.patches.scheduler import freeze_gc_after_warmup
    from mosaickv_sglang.runtime import register_sealer

    freeze_gc_after_warmup(None, object())  # a stock scheduler (no sealer): untouched
    assert gc.get_freeze_count() == 0
    register_sealer(SimpleNamespace(decode_plans=1))
    try:
        freeze_gc_after_warmup(None, object())
        assert gc.get_freeze_count() > 0
    finally:
        register_sealer(None)  # the fixture puts back an earlier test's sealer
