# SPDX-License-Identifier: Apache-2.0
"""The MosaicKV options on SGLang's real command line and ServerArgs/Engine keywords."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from mosaickv_sglang.config import OPTIONS, MosaicKVConfig
from mosaickv_sglang.patches import seam
from mosaickv_sglang.patches.server_args import serving_defaults


def parse(server_args_module, argv):
    return server_args_module.prepare_server_args(argv)


def test_parser_has_every_option_with_defaults(sglang_with_plugin):
    """ServerArgs.add_cli_args adds every option; unset options parse to None (= config default)."""
    parser = argparse.ArgumentParser()
    sglang_with_plugin.ServerArgs.add_cli_args(parser)
    flags = {flag for action in parser._actions for flag in action.option_strings}
    assert {opt.flag for opt in OPTIONS} <= flags
    args = parser.parse_args(["--model-path", "m"])
    assert all(getattr(args, opt.kwarg) is None for opt in OPTIONS)


def test_cli_defaults_round_trip(sglang_with_plugin, cpu_args):
    """No MosaicKV flag: the carried config is the default one (compressor 'none')."""
    server_args = parse(sglang_with_plugin, cpu_args())
    assert seam.config_of(server_args) == MosaicKVConfig()
    assert getattr(server_args, seam.CONFIG_ATTR) == MosaicKVConfig()


def test_cli_values_round_trip(sglang_with_plugin, cpu_args):
    """Every flag reaches the config with its value and type."""
    server_args = parse(
        sglang_with_plugin,
        cpu_args(
            "--kv-compressor", "mosaic", "--mosaic-compression-ratio", "4", "--mosaic-segment-size", "32",
            "--mosaic-hot-window", "256", "--mosaic-sink-tokens", "0", "--mosaic-decode-read-budget", "2048",
            "--mosaic-sidecar", "off", "--mosaic-resegment", "off",
        ),
    )
    assert seam.config_of(server_args) == MosaicKVConfig("mosaic", 4.0, 32, 256, 0, 2048, False, False)
    assert server_args.page_size == 32  # pages of one segment


def test_mosaic_implies_its_serving_defaults(sglang_with_plugin, cpu_args):
    """--kv-compressor mosaic alone picks the mosaic backend, pages of one segment, no prefill CUDA graphs and no
    overlap scheduling; a --page-size other than the segment size is refused by name."""
    server_args = parse(sglang_with_plugin, cpu_args("--kv-compressor", "mosaic"))
    assert server_args.attention_backend == "mosaic" and server_args.page_size == 64
    assert server_args.disable_prefill_cuda_graph
    assert server_args.disable_overlap_schedule
    same = parse(sglang_with_plugin, cpu_args("--kv-compressor", "mosaic", "--page-size", "64"))
    assert same.page_size == 64


def test_mosaic_cuda_graph_decides_the_decode_graph_default():
    """--mosaic-cuda-graph on (the default) leaves decode CUDA graphs to SGLang; off turns them off; an explicit
    --disable-decode-cuda-graph is the user's. (Parsed on this CPU, SGLang turns every CUDA graph off itself, so the
    defaults the plugin implies are checked directly.)"""
    unset = lambda field: None  # noqa: E731
    on = serving_defaults(MosaicKVConfig("mosaic"), unset)
    assert "disable_decode_cuda_graph" not in on and on["disable_prefill_cuda_graph"]
    off = serving_defaults(MosaicKVConfig("mosaic", cuda_graph=False), unset)
    assert off["disable_decode_cuda_graph"] and off["disable_prefill_cuda_graph"]
    explicit = lambda field: field == "disable_decode_cuda_graph" or None  # noqa: E731
    told = serving_defaults(MosaicKVConfig("mosaic", cuda_graph=False), explicit)
    assert "disable_decode_cuda_graph" not in told


def test_mosaic_overlap_schedule_decides_the_overlap_default(sglang_with_plugin, cpu_args):
    """--mosaic-overlap-schedule off (the default) implies --disable-overlap-schedule; on leaves SGLang's overlap
    scheduler alone. (SGLang decides for itself on this CPU, so the implied defaults are checked directly.)"""
    unset = lambda field: None  # noqa: E731
    assert serving_defaults(MosaicKVConfig("mosaic"), unset)["disable_overlap_schedule"]
    on = serving_defaults(MosaicKVConfig("mosaic", overlap_schedule=True), unset)
    assert "disable_overlap_schedule" not in on and on["disable_prefill_cuda_graph"]
    parsed = parse(sglang_with_plugin, cpu_args("--kv-compressor", "mosaic", "--mosaic-overlap-schedule", "on"))
    assert seam.config_of(parsed).overlap_schedule
    assert not seam.config_of(parse(sglang_with_plugin, cpu_args("--kv-compressor", "mosaic"))).overlap_schedule


def test_mosaic_cuda_graph_option_is_parsed(sglang_with_plugin, cpu_args):
    assert seam.config_of(parse(sglang_with_plugin, cpu_args("--kv-compressor", "mosaic"))).cuda_graph
    off = parse(sglang_with_plugin, cpu_args("--kv-compressor", "mosaic", "--mosaic-cuda-graph", "off"))
    assert not seam.config_of(off).cuda_graph and off.disable_decode_cuda_graph


# Bad values and unsupported combinations on the command line: tests/test_bad_input.py (BAD_STARTUP_CASES).


def test_server_args_keywords(sglang_with_plugin, llama_shape):
    """ServerArgs(...) (what sglang.Engine(**kwargs) builds) takes the same options as keywords."""
    server_args = sglang_with_plugin.ServerArgs(
        model_path=str(llama_shape), load_format="dummy", device="cpu",
        kv_compressor="mosaic", mosaic_compression_ratio=2, mosaic_sidecar="off", mosaic_resegment=False,
    )
    assert seam.config_of(server_args) == MosaicKVConfig("mosaic", 2.0, sidecar=False, resegment=False)
    with pytest.raises(ValueError, match=r"--mosaic-segment-size: expected a power of two in \[16, 256\], got 100"):
        sglang_with_plugin.ServerArgs(model_path=str(llama_shape), device="cpu", mosaic_segment_size=100)


def test_engine_rejects_bad_option_before_launching(sglang_with_plugin, llama_shape):
    """sglang.Engine(kv_compressor=...) validates before any subprocess starts."""
    from sglang.srt.entrypoints.engine import Engine

    with pytest.raises(ValueError, match=r"^--kv-compressor: expected one of 'none', 'mosaic', got 'zip'$"):
        Engine(model_path=str(llama_shape), load_format="dummy", device="cpu", kv_compressor="zip")
    with pytest.raises(ValueError, match=r"^--mosaic-compression-ratio: expected a number in \[1, 16\], got 0.5$"):
        Engine(model_path=str(llama_shape), load_format="dummy", device="cpu", kv_compressor="mosaic",
               mosaic_compression_ratio=0.5)  # fmt: skip


def test_launch_server_help_lists_options():
    """`python -m sglang.launch_server --help` shows every MosaicKV flag with its default."""
    out = subprocess.run(
        [sys.executable, "-m", "sglang.launch_server", "--help"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MosaicKV KV-cache compression (mosaickv-sglang)" in out.stdout
    for opt in OPTIONS:
        assert opt.flag in out.stdout
    assert "--kv-compressor {none,mosaic}" in out.stdout
    assert "Default: 4.0." in out.stdout and "Default: on." in out.stdout
