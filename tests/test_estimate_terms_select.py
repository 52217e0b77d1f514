# SPDX-License-Identifier: Apache-2.0
"""The startup choice of the fast estimator's channel terms: the faster timed method becomes the planner's CUDA
default; ``MOSAICKV_ESTIMATE_TERMS`` fixes it without timing and a bad value is named. (Timing the kernel itself,
through the interpreter, is in tests/kernels/test_estimate_terms.py.)"""

from __future__ import annotations

import pytest
import torch

from mosaickv_sglang import estimate_terms_select as E
from mosaickv_sglang import planner


@pytest.fixture(autouse=True)
def keep_default(monkeypatch):
    monkeypatch.setattr(planner, "ESTIMATE_TERMS_ON_CUDA", "torch")
    monkeypatch.delenv(E.ENV_VAR, raising=False)


def test_the_faster_timed_method_becomes_the_default():
    cpu = torch.device("cpu")
    assert E.select_estimate_terms_method(cpu, 128, 64, timings={"torch": 3e-3, "kernel": 1e-3}) == "kernel"
    assert planner.ESTIMATE_TERMS_ON_CUDA == "kernel"
    assert E.select_estimate_terms_method(cpu, 128, 64, timings={}) == "kernel"  # nothing timed: unchanged
    assert E.select_estimate_terms_method(cpu, 128, 64, timings={"torch": 1e-3, "kernel": 2e-3}) == "torch"


@pytest.mark.parametrize("value, want", [("kernel", "kernel"), (" TORCH ", "torch")])
def test_the_environment_fixes_the_method_without_timing(monkeypatch, value, want):
    monkeypatch.setenv(E.ENV_VAR, value)
    monkeypatch.setattr(E, "time_estimate_terms_methods", lambda *a, **k: pytest.fail("timed although fixed"))
    assert E.select_estimate_terms_method(torch.device("cpu"), 64, 16) == want == planner.ESTIMATE_TERMS_ON_CUDA


def test_a_bad_environment_value_is_named(monkeypatch):
    monkeypatch.setenv(E.ENV_VAR, "fused")
    with pytest.raises(ValueError, match=r"MOSAICKV_ESTIMATE_TERMS: expected auto or one of torch, kernel, got "
                                         r"'fused'"):  # fmt: skip
        E.select_estimate_terms_method(torch.device("cpu"), 64, 16)
    assert planner.ESTIMATE_TERMS_ON_CUDA == "torch"


def test_a_method_that_fails_is_not_chosen(monkeypatch):
    from mosaickv_sglang.kernels import estimate_terms

    def broken(*args, **kwargs):
        raise RuntimeError("not here")

    monkeypatch.setattr(estimate_terms, "chan_terms_fwd", broken)
    assert set(E.time_estimate_terms_methods(torch.device("cpu"), 64, 16, segments=2, repeats=1)) == {"torch"}
    # without the torch ops' terms the kernel cannot be checked: nothing is timed, the default stays
    monkeypatch.setattr(planner, "_chan_terms_torch", broken)
    assert E.time_estimate_terms_methods(torch.device("cpu"), 64, 16, segments=2) == {}
    assert E.select_estimate_terms_method(torch.device("cpu"), 64, 16) == "torch"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_both_methods_are_timed_on_the_gpu():
    got = E.time_estimate_terms_methods(torch.device("cuda"), 128, 64)
    assert set(got) == set(planner.ESTIMATE_TERMS_METHODS) and all(0 < t < 1 for t in got.values()), got
