# SPDX-License-Identifier: Apache-2.0
"""The step's streams above the seals' (``MOSAICKV_STEP_PRIORITY``, patches/model_runner.py)."""

from __future__ import annotations

import inspect
import re
from types import SimpleNamespace

import pytest
import torch

from mosaickv_sglang.config import MosaicKVConfig
from mosaickv_sglang.patches import model_runner, seam
from mosaickv_sglang.stream_priority import STEP_PRIORITY_ENV, step_priority_enabled, step_stream

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _runner(stream: object, compressor: str = "mosaic") -> SimpleNamespace:
    args = SimpleNamespace()
    seam.attach_config(args, MosaicKVConfig(compressor))
    return SimpleNamespace(**{seam.MODEL_RUNNER_FORWARD_STREAM_ATTR: stream, seam.MODEL_RUNNER_SERVER_ARGS_ATTR: args})


@pytest.mark.parametrize("raw, on", [(None, True), ("", True), ("1", True), ("0", False)])
def test_the_setting_is_on_unless_zero(monkeypatch, raw, on):
    if raw is None:
        monkeypatch.delenv(STEP_PRIORITY_ENV, raising=False)
    else:
        monkeypatch.setenv(STEP_PRIORITY_ENV, raw)
    assert step_priority_enabled() is on


def test_a_bad_setting_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(STEP_PRIORITY_ENV, "yes")
    with pytest.raises(ValueError, match=f"{STEP_PRIORITY_ENV}: expected 0 or 1, got 'yes'"):
        step_priority_enabled()


def test_the_forward_stream_is_created_just_before_initialize_and_read_by_nothing_in_between():
    """The hook replaces the stream before ``initialize``: nothing may have taken the old one (an allocator or graph
    runner holding it would wait on a stream that no step runs on any more)."""
    from sglang.srt.model_executor.model_runner import ModelRunner

    src = inspect.getsource(ModelRunner.__init__)
    created = re.search(rf"self\.{seam.MODEL_RUNNER_FORWARD_STREAM_ATTR} = .*Stream\(\)", src)
    init = src.find("self.initialize()")
    assert created is not None and init > created.end()
    assert seam.MODEL_RUNNER_FORWARD_STREAM_ATTR not in src[created.end():init]
    assert f"self.{seam.MODEL_RUNNER_SERVER_ARGS_ATTR} = " in src[: created.start()]


@pytest.mark.parametrize("compressor", ["none", "mosaic"])
def test_a_stream_that_is_not_cuda_is_left_alone(compressor):
    stream = object()
    runner = _runner(stream, compressor)
    model_runner.prioritize_forward_stream(runner)
    assert getattr(runner, seam.MODEL_RUNNER_FORWARD_STREAM_ATTR) is stream


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("compressor, raw, raised", [("mosaic", "1", True), ("mosaic", "0", False),
                                                     ("none", "1", False)])  # fmt: skip
def test_on_cuda_a_mosaic_servers_forward_stream_gets_the_highest_priority(monkeypatch, compressor, raw, raised):
    monkeypatch.setenv(STEP_PRIORITY_ENV, raw)
    stream = torch.cuda.Stream()
    runner = _runner(stream, compressor)
    model_runner.prioritize_forward_stream(runner)
    now = getattr(runner, seam.MODEL_RUNNER_FORWARD_STREAM_ATTR)
    least, greatest = torch.cuda.Stream.priority_range()
    assert (now is not stream) is raised
    assert now.priority == (greatest if raised else least)
    assert now.device == stream.device


@pytest.mark.gpu
@gpu
def test_on_cuda_the_step_stream_outranks_a_default_stream(monkeypatch):
    monkeypatch.delenv(STEP_PRIORITY_ENV, raising=False)
    least, greatest = torch.cuda.Stream.priority_range()
    assert greatest < least
    assert step_stream(torch.cuda.current_device()).priority == greatest
    assert torch.cuda.Stream().priority == least
