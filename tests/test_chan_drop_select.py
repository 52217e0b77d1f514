# SPDX-License-Identifier: Apache-2.0
"""The startup choice of the seal planner's chan drop method: the fastest timed method becomes the planner's CUDA
default; ``MOSAICKV_CHAN_DROP`` fixes it without timing and a bad value is named; methods that fail are skipped."""

from __future__ import annotations

import pytest
import torch

from mosaickv_sglang import chan_drop_select as C
from mosaickv_sglang import planner


@pytest.fixture(autouse=True)
def keep_default(monkeypatch):
    monkeypatch.setattr(planner, "CHAN_DROP_METHOD_ON_CUDA", "topk")
    monkeypatch.delenv(C.ENV_VAR, raising=False)


def test_the_fastest_timed_method_becomes_the_default():
    cpu = torch.device("cpu")
    assert C.select_chan_drop_method(cpu, 128, 64, timings={"topk": 3e-3, "sort": 1e-3, "kernel": 2e-3}) == "sort"
    assert planner.CHAN_DROP_METHOD_ON_CUDA == "sort"
    assert C.select_chan_drop_method(cpu, 128, 64, timings={}) == "sort"  # nothing timed: unchanged


@pytest.mark.parametrize("value, want", [("kernel", "kernel"), (" SORT ", "sort")])
def test_the_environment_fixes_the_method_without_timing(monkeypatch, value, want):
    monkeypatch.setenv(C.ENV_VAR, value)
    monkeypatch.setattr(C, "time_chan_drop_methods", lambda *a, **k: pytest.fail("timed although fixed"))
    assert C.select_chan_drop_method(torch.device("cpu"), 64, 16) == want == planner.CHAN_DROP_METHOD_ON_CUDA


def test_a_bad_environment_value_is_named(monkeypatch):
    monkeypatch.setenv(C.ENV_VAR, "radix")
    with pytest.raises(ValueError, match=r"MOSAICKV_CHAN_DROP: expected auto or one of topk, sort, kernel, got "
                                         r"'radix'"):  # fmt: skip
        C.select_chan_drop_method(torch.device("cpu"), 64, 16)
    assert planner.CHAN_DROP_METHOD_ON_CUDA == "topk"


def test_timing_runs_each_method_and_skips_those_that_fail(monkeypatch):
    """On the CPU, top-k and sort are timed on real masks (one call each, then the best of the repeats); a method
    that raises is logged and left out, and the kernel is skipped for a head dim it has no variant for."""
    got = C.time_chan_drop_methods(torch.device("cpu"), 64, 16, methods=("topk", "sort"), segments=8, repeats=2)
    assert set(got) == {"topk", "sort"} and all(0 < t < 5 for t in got.values())
    assert C.time_chan_drop_methods(torch.device("cpu"), 48, 16, methods=("kernel",), segments=4) == {}
    real = planner._chan_drop_masks

    def broken(x, w, ks, method=None):
        if method == "sort":
            raise RuntimeError("no sort here")
        return real(x, w, ks, method=method)

    monkeypatch.setattr(planner, "_chan_drop_masks", broken)
    assert set(C.time_chan_drop_methods(torch.device("cpu"), 64, 16, methods=("topk", "sort"), segments=4)) == {"topk"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_all_three_methods_are_timed_on_the_gpu():
    got = C.time_chan_drop_methods(torch.device("cuda"), 128, 64)
    assert set(got) == set(planner.CHAN_DROP_METHODS) and all(0 < t < 1 for t in got.values()), got
    assert C.select_chan_drop_method(torch.device("cuda"), 128, 64, got) == min(got, key=got.__getitem__)
