# SPDX-License-Identifier: Apache-2.0
"""patches/model_runner.py: MOSAICKV_FORWARD_PRIORITY=high gives a mosaic runner's forward stream the highest
priority before SGLang's ModelRunner.initialize hands it out (a stand-in CUDA stream class on this CPU machine)."""

from __future__ import annotations

import inspect
import logging
from types import SimpleNamespace

import pytest
import torch

from mosaickv_sglang.config import MosaicKVConfig
from mosaickv_sglang.patches import model_runner, seam


class FakeStream:
    made = []

    def __init__(self, device=None, priority=0):
        self.device, self.priority = device, priority
        FakeStream.made.append(self)

    @staticmethod
    def priority_range():
        return (0, -5)


@pytest.fixture
def fake_cuda_stream(monkeypatch):
    FakeStream.made = []
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    return FakeStream


def runner(compressor: str, stream) -> SimpleNamespace:
    args = SimpleNamespace()
    seam.attach_config(args, MosaicKVConfig(compressor=compressor))
    return SimpleNamespace(server_args=args, forward_stream=stream)


def test_high_priority_replaces_a_mosaic_runners_cuda_stream(fake_cuda_stream, monkeypatch, caplog):
    monkeypatch.setenv(model_runner.ENV_VAR, "High")
    old = FakeStream(device="cuda:1")
    r = runner("mosaic", old)
    with caplog.at_level(logging.INFO, logger=model_runner.__name__):
        model_runner.prioritize_forward_stream(r)
    assert r.forward_stream is not old and isinstance(r.forward_stream, FakeStream)
    assert (r.forward_stream.device, r.forward_stream.priority) == ("cuda:1", -5)
    assert "runs at priority -5, the highest" in caplog.text


@pytest.mark.parametrize("env, compressor", [(None, "mosaic"), ("default", "mosaic"), ("", "mosaic"),
                                             ("high", "none")])  # fmt: skip
def test_left_alone_unless_asked_and_mosaic(fake_cuda_stream, monkeypatch, env, compressor):
    if env is None:
        monkeypatch.delenv(model_runner.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(model_runner.ENV_VAR, env)
    old = FakeStream(device="cuda:0")
    r = runner(compressor, old)
    model_runner.prioritize_forward_stream(r)
    assert r.forward_stream is old and FakeStream.made == [old]


def test_a_non_cuda_stream_is_kept_with_a_warning(fake_cuda_stream, monkeypatch, caplog):
    monkeypatch.setenv(model_runner.ENV_VAR, "high")
    r = runner("mosaic", "a cpu stream")
    with caplog.at_level(logging.WARNING, logger=model_runner.__name__):
        model_runner.prioritize_forward_stream(r)
    assert r.forward_stream == "a cpu stream" and "not a CUDA stream (str)" in caplog.text


def test_a_bad_value_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv(model_runner.ENV_VAR, "urgent")
    with pytest.raises(ValueError, match=r"MOSAICKV_FORWARD_PRIORITY: expected one of default, high, got 'urgent'"):
        model_runner.prioritize_forward_stream(runner("mosaic", None))


def test_sglang_makes_the_forward_stream_once_just_before_initialize():
    """The hook's premise in the installed SGLang: ModelRunner.__init__ sets the forward stream, the only place its
    module sets it, then calls initialize(); the memory pool (alloc_memory_pool, called by the TP worker after the
    runner is built) reads it later."""
    import sglang.srt.model_executor.model_runner as mr

    made = f"self.{seam.MODEL_RUNNER_FORWARD_STREAM_ATTR} = "
    init = inspect.getsource(mr.ModelRunner.__init__)
    assert init.index(made) < init.index("self.initialize(")
    assert inspect.getsource(mr).count(made) == 1
    assert f"self.{seam.MODEL_RUNNER_FORWARD_STREAM_ATTR}" in inspect.getsource(mr.ModelRunner.alloc_memory_pool) + \
        inspect.getsource(mr.ModelRunner.init_kv_cache_configurator)
