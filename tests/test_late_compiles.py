# SPDX-License-Identifier: Apache-2.0
"""The watch for MosaicKV kernels compiled after the warmup: logs and counts ours only, chains the hook installed
before it, gives it back; on a GPU, Triton's own compile calls it."""

from __future__ import annotations

import logging
import random

import pytest
import torch
import triton
import triton.language as tl
from triton import knobs
from triton.runtime.jit import JitFunctionInfo

from mosaickv_sglang.late_compiles import KERNEL_MODULE_PREFIX, LateCompileWatch


def _hook_call(module: str, name: str, manual: bool = False) -> dict:
    return dict(key=("sig",), repr=f"{name}[num_warps=4](x: *fp16)", fn=JitFunctionInfo(module, name, None),
                compile={}, is_manual_warmup=manual, already_compiled=False)  # fmt: skip


@pytest.fixture
def clean_hook():
    saved = knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = None
    yield
    knobs.runtime.jit_post_compile_hook = saved


def test_logs_and_counts_only_our_kernels(clean_hook, caplog):
    watch = LateCompileWatch().install()
    hook = knobs.runtime.jit_post_compile_hook
    assert hook is watch
    with caplog.at_level(logging.WARNING, logger="mosaickv_sglang.late_compiles"):
        hook(**_hook_call("mosaickv_sglang.kernels._triton.pack", "_pack_segments_main_kernel"))
        hook(**_hook_call("sglang.srt.layers.attention.triton_ops.decode_attention", "_fwd_kernel_stage1"))
        hook(**_hook_call("mosaickv_sglang.kernels._triton.unpack", "_unpack_segments_main_kernel", manual=True))
        hook(**_hook_call("mosaickv_sglang.kernels._triton.extend", "_extend_attn_main_kernel"))
    assert watch.compiles == ["_pack_segments_main_kernel", "_extend_attn_main_kernel"]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "_pack_segments_main_kernel compiled after the warmup (1 so far)" in warnings[0]
    assert "(x: *fp16)" in warnings[0] and "(2 so far)" in warnings[1]


def test_chains_the_previous_hook_and_gives_it_back(clean_hook):
    seen = []

    def previous(**kwargs):
        seen.append(kwargs["fn"].name)
        return "previous result"

    knobs.runtime.jit_post_compile_hook = previous
    watch = LateCompileWatch().install()
    assert watch.install() is watch and knobs.runtime.jit_post_compile_hook is watch  # once
    assert knobs.runtime.jit_post_compile_hook(**_hook_call("other.module", "k")) == "previous result"
    assert seen == ["k"] and watch.compiles == []
    watch.uninstall()
    assert knobs.runtime.jit_post_compile_hook is previous
    watch.uninstall()  # a second time: nothing to give back
    assert knobs.runtime.jit_post_compile_hook is previous


def test_a_second_watch_in_the_process_returns_the_first(clean_hook):
    first = LateCompileWatch().install()
    assert LateCompileWatch().install() is first and knobs.runtime.jit_post_compile_hook is first
    knobs.runtime.jit_post_compile_hook(**_hook_call("mosaickv_sglang.kernels._triton.pack", "k"))
    assert first.compiles == ["k"]


def test_leaves_a_hook_installed_after_it(clean_hook):
    watch = LateCompileWatch().install()

    def later(**kwargs):
        return None

    knobs.runtime.jit_post_compile_hook = later
    watch.uninstall()
    assert knobs.runtime.jit_post_compile_hook is later


def _probe_kernel(x_ptr, VALUE: tl.constexpr):
    tl.store(x_ptr, VALUE)


_probe_kernel.__module__ = KERNEL_MODULE_PREFIX + "late_compile_probe"
_probe = triton.jit(_probe_kernel)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_calls_it_for_a_real_compile(clean_hook):
    """A fresh specialization (a constexpr never used before in this process) compiles, and Triton calls the watch
    with the kernel's name; a second launch of it does not compile."""
    watch = LateCompileWatch().install()
    x = torch.zeros(1, device="cuda", dtype=torch.int32)
    value = random.randrange(1 << 20, 1 << 30)
    _probe[(1,)](x, VALUE=value)
    _probe[(1,)](x, VALUE=value)
    torch.cuda.synchronize()
    assert int(x.item()) == value
    assert watch.compiles == ["_probe_kernel"]
