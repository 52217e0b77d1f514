# SPDX-License-Identifier: Apache-2.0
"""Bad input at startup (issue #8): one clear error naming the option, before anything is served.

:data:`BAD_STARTUP_CASES` is the list of record: every MosaicKV option out of range or of the wrong type, every
SGLang option ``--kv-compressor mosaic`` cannot serve with, and a model it does not support. Each case goes the
user's two ways: SGLang's command line with the plugin loaded (``python -m sglang.launch_server``: exit status 2 and
one ``error:`` line) and ``ServerArgs(...)`` keywords (what ``sglang.Engine(...)`` builds: ``MosaicConfigError``, a
``ValueError``). The message is ``"<flag>: ..."``, usually ``"<flag>: expected <x>, got <y>"``.

Request-level bad input needs a live server: ``bench/bad_input.py``.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple, Optional

import pytest
import torch

from mosaickv_sglang.config import MosaicConfigError, MosaicKVConfig
from mosaickv_sglang.patches import seam


class BadStartup(NamedTuple):
    id: str
    argv: Optional[list[str]]  # flags after --model-path ...; None: cannot be written on the command line
    kwargs: Optional[dict[str, Any]]  # ServerArgs / Engine keywords; None: command line only
    message: str  # regex the error matches; starts with the flag
    model: str = "llama"  # "llama" (GQA, supported) or "mla" (DeepSeek-V2 shape)


MOSAIC = ["--kv-compressor", "mosaic"]
ON = {"kv_compressor": "mosaic"}
NOT_WITH_MOSAIC = "not supported with --kv-compressor mosaic"

BAD_STARTUP_CASES = [
    # --- MosaicKV options: out of range or of the wrong type ---
    BadStartup("compressor-unknown", ["--kv-compressor", "zip"], {"kv_compressor": "zip"},
               r"^--kv-compressor: expected one of 'none', 'mosaic', got 'zip'$"),
    BadStartup("compressor-not-a-string", None, {"kv_compressor": True},
               r"^--kv-compressor: expected one of 'none', 'mosaic', got True$"),
    BadStartup("ratio-below-1", [*MOSAIC, "--mosaic-compression-ratio", "0.5"], {**ON, "mosaic_compression_ratio": 0.5},
               r"^--mosaic-compression-ratio: expected a number in \[1, 16\], got 0.5$"),
    BadStartup("ratio-above-16", [*MOSAIC, "--mosaic-compression-ratio", "500"], {**ON, "mosaic_compression_ratio": 500},
               r"^--mosaic-compression-ratio: expected a number in \[1, 16\], got 500.0$"),
    BadStartup("ratio-not-a-number", [*MOSAIC, "--mosaic-compression-ratio", "three"],
               {**ON, "mosaic_compression_ratio": "three"},
               r"^--mosaic-compression-ratio: expected a number, got 'three'$"),
    BadStartup("ratio-nan", [*MOSAIC, "--mosaic-compression-ratio", "nan"], {**ON, "mosaic_compression_ratio": "nan"},
               r"^--mosaic-compression-ratio: expected a finite number, got nan$"),
    BadStartup("ratio-infinite", [*MOSAIC, "--mosaic-compression-ratio", "inf"],
               {**ON, "mosaic_compression_ratio": float("inf")},
               r"^--mosaic-compression-ratio: expected a finite number, got inf$"),
    BadStartup("ratio-a-bool", None, {**ON, "mosaic_compression_ratio": True},
               r"^--mosaic-compression-ratio: expected a number, got True$"),
    BadStartup("segment-not-power-of-two", [*MOSAIC, "--mosaic-segment-size", "48"], {**ON, "mosaic_segment_size": 48},
               r"^--mosaic-segment-size: expected a power of two in \[16, 256\], got 48$"),
    BadStartup("segment-negative", [*MOSAIC, "--mosaic-segment-size", "-64"], {**ON, "mosaic_segment_size": -64},
               r"^--mosaic-segment-size: expected a power of two in \[16, 256\], got -64$"),
    BadStartup("segment-too-large", [*MOSAIC, "--mosaic-segment-size", "512"], {**ON, "mosaic_segment_size": 512},
               r"^--mosaic-segment-size: expected a power of two in \[16, 256\], got 512$"),
    BadStartup("segment-not-an-integer", [*MOSAIC, "--mosaic-segment-size", "64.5"], {**ON, "mosaic_segment_size": 64.5},
               r"^--mosaic-segment-size: expected an integer, got '?64.5'?$"),
    BadStartup("hot-window-negative", [*MOSAIC, "--mosaic-hot-window", "-5"], {**ON, "mosaic_hot_window": -5},
               r"^--mosaic-hot-window: expected an integer in \[0, 65536\], got -5$"),
    BadStartup("hot-window-too-large", [*MOSAIC, "--mosaic-hot-window", "65537"], {**ON, "mosaic_hot_window": 65537},
               r"^--mosaic-hot-window: expected an integer in \[0, 65536\], got 65537$"),
    BadStartup("hot-window-not-an-integer", [*MOSAIC, "--mosaic-hot-window", "lots"], {**ON, "mosaic_hot_window": [512]},
               r"^--mosaic-hot-window: expected an integer, got ('lots'|\[512\])$"),
    BadStartup("sink-tokens-negative", [*MOSAIC, "--mosaic-sink-tokens", "-1"], {**ON, "mosaic_sink_tokens": -1},
               r"^--mosaic-sink-tokens: expected an integer in \[0, 8192\], got -1$"),
    BadStartup("sink-tokens-too-large", [*MOSAIC, "--mosaic-sink-tokens", "9999999"],
               {**ON, "mosaic_sink_tokens": 9999999},
               r"^--mosaic-sink-tokens: expected an integer in \[0, 8192\], got 9999999$"),
    BadStartup("read-budget-below-segment", [*MOSAIC, "--mosaic-decode-read-budget", "8"],
               {**ON, "mosaic_decode_read_budget": 8},
               r"^--mosaic-decode-read-budget: expected 0 \(read all\) or at least --mosaic-segment-size \(64\), got 8$"),
    BadStartup("read-budget-negative", [*MOSAIC, "--mosaic-decode-read-budget", "-64"],
               {**ON, "mosaic_decode_read_budget": -64},
               r"^--mosaic-decode-read-budget: expected 0 \(read all\) or at least --mosaic-segment-size \(64\), got -64$"),
    BadStartup("read-budget-not-an-integer", [*MOSAIC, "--mosaic-decode-read-budget", "all"],
               {**ON, "mosaic_decode_read_budget": "all"},
               r"^--mosaic-decode-read-budget: expected an integer, got 'all'$"),
    BadStartup("sidecar-not-on-off", [*MOSAIC, "--mosaic-sidecar", "maybe"], {**ON, "mosaic_sidecar": "maybe"},
               r"^--mosaic-sidecar: expected 'on' or 'off', got 'maybe'$"),
    BadStartup("sidecar-a-number", None, {**ON, "mosaic_sidecar": 1},
               r"^--mosaic-sidecar: expected 'on' or 'off', got 1$"),
    BadStartup("resegment-not-on-off", [*MOSAIC, "--mosaic-resegment", "maybe"], {**ON, "mosaic_resegment": "maybe"},
               r"^--mosaic-resegment: expected 'on' or 'off', got 'maybe'$"),
    BadStartup("axes-unknown", [*MOSAIC, "--mosaic-axes", "tokens"], {**ON, "mosaic_axes": "tokens"},
               r"^--mosaic-axes: expected one of 'both', 'token', 'channel', got 'tokens'$"),
    BadStartup("cuda-graph-not-on-off", [*MOSAIC, "--mosaic-cuda-graph", "yes"], {**ON, "mosaic_cuda_graph": "yes"},
               r"^--mosaic-cuda-graph: expected 'on' or 'off', got 'yes'$"),
    BadStartup("cuda-graph-without-compressor", ["--mosaic-cuda-graph", "on"], {"mosaic_cuda_graph": "on"},
               r"^--mosaic-cuda-graph: expected together with --kv-compressor mosaic, got --kv-compressor none; "
               r"add --kv-compressor mosaic or drop --mosaic-cuda-graph$"),
    BadStartup("overlap-schedule-not-on-off", [*MOSAIC, "--mosaic-overlap-schedule", "true"],
               {**ON, "mosaic_overlap_schedule": "true"},
               r"^--mosaic-overlap-schedule: expected 'on' or 'off', got 'true'$"),
    BadStartup("overlap-schedule-and-disable-overlap", [*MOSAIC, "--mosaic-overlap-schedule", "on",
                                                        "--disable-overlap-schedule"],
               {**ON, "mosaic_overlap_schedule": "on", "disable_overlap_schedule": True},
               r"^--mosaic-overlap-schedule: expected 'off' with --disable-overlap-schedule, got 'on'; drop one of "
               r"them$"),
    BadStartup("resegment-without-compressor", ["--mosaic-resegment", "off"], {"mosaic_resegment": "off"},
               r"^--mosaic-resegment: expected together with --kv-compressor mosaic, got --kv-compressor none; "
               r"add --kv-compressor mosaic or drop --mosaic-resegment$"),
    # On the command line SGLang's argparse refuses an unknown --mosaic-* flag itself ("unrecognized arguments").
    BadStartup("unknown-mosaic-keyword", None, {**ON, "mosaic_ratio": 3},
               r"^mosaic_ratio: unknown MosaicKV option; expected one of \["),
    BadStartup("mosaic-option-without-compressor", ["--mosaic-compression-ratio", "4"], {"mosaic_compression_ratio": 4},
               r"^--mosaic-compression-ratio: expected together with --kv-compressor mosaic, got --kv-compressor none; "
               r"add --kv-compressor mosaic or drop --mosaic-compression-ratio$"),
    BadStartup("mosaic-option-with-compressor-none", ["--kv-compressor", "none", "--mosaic-hot-window", "256"],
               {"kv_compressor": "none", "mosaic_hot_window": 256},
               r"^--mosaic-hot-window: expected together with --kv-compressor mosaic, got --kv-compressor none"),
    # --- SGLang options --kv-compressor mosaic cannot serve with ---
    BadStartup("page-size-larger", [*MOSAIC, "--page-size", "128"], {**ON, "page_size": 128},
               r"^--page-size: --kv-compressor mosaic uses pages of --mosaic-segment-size \(64\) tokens, got 128; "
               r"drop --page-size or set it to the segment size$"),
    BadStartup("page-size-smaller", [*MOSAIC, "--page-size", "16"], {**ON, "page_size": 16},
               r"^--page-size: --kv-compressor mosaic uses pages of --mosaic-segment-size \(64\) tokens, got 16;"),
    BadStartup("page-size-not-the-custom-segment", [*MOSAIC, "--mosaic-segment-size", "32", "--page-size", "64"],
               {**ON, "mosaic_segment_size": 32, "page_size": 64},
               r"^--page-size: --kv-compressor mosaic uses pages of --mosaic-segment-size \(32\) tokens, got 64;"),
    BadStartup("attention-backend-other", [*MOSAIC, "--attention-backend", "triton"],
               {**ON, "attention_backend": "triton"},
               r"^--attention-backend: --kv-compressor mosaic uses its own 'mosaic' attention backend, got 'triton'; "
               r"drop --attention-backend$"),
    BadStartup("prefill-attention-backend-other", [*MOSAIC, "--prefill-attention-backend", "fa3"],
               {**ON, "prefill_attention_backend": "fa3"},
               r"^--prefill-attention-backend: --kv-compressor mosaic uses its own 'mosaic' attention backend"),
    BadStartup("decode-attention-backend-other", [*MOSAIC, "--decode-attention-backend", "flashinfer"],
               {**ON, "decode_attention_backend": "flashinfer"},
               r"^--decode-attention-backend: --kv-compressor mosaic uses its own 'mosaic' attention backend"),
    BadStartup("mosaic-backend-without-compressor", ["--attention-backend", "mosaic"], {"attention_backend": "mosaic"},
               r"^--attention-backend: 'mosaic' reads the MosaicKV cache and needs --kv-compressor mosaic$"),
    BadStartup("kv-cache-dtype-fp8", [*MOSAIC, "--kv-cache-dtype", "fp8_e4m3"], {**ON, "kv_cache_dtype": "fp8_e4m3"},
               r"^--kv-cache-dtype: --kv-compressor mosaic stores a 16-bit cache, got 'fp8_e4m3'; "
               r"use 'auto', 'bfloat16' or 'float16'$"),
    BadStartup("kv-cache-dtype-mxfp8", [*MOSAIC, "--kv-cache-dtype", "mxfp8"], {**ON, "kv_cache_dtype": "mxfp8"},
               r"^--kv-cache-dtype: --kv-compressor mosaic stores a 16-bit cache, got 'mxfp8'"),
    BadStartup("speculative-eagle", [*MOSAIC, "--speculative-algorithm", "EAGLE"],
               {**ON, "speculative_algorithm": "EAGLE"},
               r"^--speculative-algorithm: speculative decoding is not supported with --kv-compressor mosaic$"),
    BadStartup("speculative-ngram", [*MOSAIC, "--speculative-algorithm", "NGRAM"],
               {**ON, "speculative_algorithm": "NGRAM"}, r"^--speculative-algorithm: speculative decoding"),
    BadStartup("hierarchical-cache", [*MOSAIC, "--enable-hierarchical-cache"], {**ON, "enable_hierarchical_cache": True},
               rf"^--enable-hierarchical-cache: {NOT_WITH_MOSAIC} \(HiCache copies raw KV pages\)$"),
    BadStartup("dp-attention", [*MOSAIC, "--enable-dp-attention", "--dp-size", "2", "--tp-size", "2"],
               {**ON, "enable_dp_attention": True, "dp_size": 2, "tp_size": 2},
               r"^--enable-dp-attention: data-parallel attention is not supported with --kv-compressor mosaic$"),
    BadStartup("pipeline-parallel", [*MOSAIC, "--pp-size", "2"], {**ON, "pp_size": 2},
               r"^--pp-size: pipeline parallelism is not supported with --kv-compressor mosaic$"),
    BadStartup("decode-context-parallel", [*MOSAIC, "--dcp-size", "2"], {**ON, "dcp_size": 2},
               r"^--dcp-size: decode context parallelism is not supported with --kv-compressor mosaic$"),
    BadStartup("pd-disaggregation", [*MOSAIC, "--disaggregation-mode", "prefill"],
               {**ON, "disaggregation_mode": "prefill"},
               r"^--disaggregation-mode: prefill/decode disaggregation is not supported with --kv-compressor mosaic$"),
    BadStartup("ray", [*MOSAIC, "--use-ray"], {**ON, "use_ray": True},
               r"^--use-ray: Ray workers do not load SGLang plugins, so --kv-compressor mosaic cannot run under Ray$"),
    BadStartup("lmcache", [*MOSAIC, "--enable-lmcache"], {**ON, "enable_lmcache": True},
               rf"^--enable-lmcache: {NOT_WITH_MOSAIC}$"),
    BadStartup("hisparse", [*MOSAIC, "--enable-hisparse"], {**ON, "enable_hisparse": True},
               rf"^--enable-hisparse: {NOT_WITH_MOSAIC}$"),
    BadStartup("prefill-only-no-kv-cache", [*MOSAIC, "--prefill-only-disable-kv-cache"],
               {**ON, "prefill_only_disable_kv_cache": True},
               r"^--prefill-only-disable-kv-cache: there is no KV cache to compress; drop --kv-compressor mosaic$"),
    BadStartup("unified-memory", [*MOSAIC, "--enable-unified-memory"], {**ON, "enable_unified_memory": True},
               rf"^--enable-unified-memory: {NOT_WITH_MOSAIC}$"),
    BadStartup("page-major-kv-layout", [*MOSAIC, "--enable-page-major-kv-layout"],
               {**ON, "enable_page_major_kv_layout": True},
               rf"^--enable-page-major-kv-layout: {NOT_WITH_MOSAIC} \(MosaicKV lays out its own pool\)$"),
    # --- a model MosaicKV does not support ---
    BadStartup("mla-model", MOSAIC, ON,
               r"^--model-path: --kv-compressor mosaic supports MHA/GQA models, but DeepseekV2ForCausalLM uses "
               r"MLA/DSA attention$", model="mla"),
]  # fmt: skip

# Any message of ours: one sentence starting with the option as the user wrote it.
FLAG_FIRST = re.compile(r"^(--[a-z0-9-]+|mosaic_[a-z_]+): \S")

CLI_CASES = [c for c in BAD_STARTUP_CASES if c.argv is not None]
KWARG_CASES = [c for c in BAD_STARTUP_CASES if c.kwargs is not None]


@pytest.fixture(scope="module")
def models(llama_shape: Path, mla_shape: Path) -> dict[str, Path]:
    return {"llama": llama_shape, "mla": mla_shape}


def test_the_case_list_is_well_formed():
    """Unique ids, every message anchored at a flag, each case reachable one way at least."""
    ids = [c.id for c in BAD_STARTUP_CASES]
    assert len(ids) == len(set(ids))
    for case in BAD_STARTUP_CASES:
        assert case.argv is not None or case.kwargs is not None, case.id
        assert re.match(r"\^(--[a-z]|mosaic_)", case.message), case.id
        assert case.model in ("llama", "mla"), case.id


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_bad_startup_on_the_command_line(sglang_with_plugin, cpu_args, models, capsys, case):
    """`python -m sglang.launch_server ...`: exit status 2, one `error: <flag>: ...` line, no traceback."""
    with pytest.raises(SystemExit) as exc:
        sglang_with_plugin.prepare_server_args(cpu_args(*case.argv, model=models[case.model]))
    assert exc.value.code == 2
    cause = exc.value.__cause__
    assert isinstance(cause, MosaicConfigError), repr(cause)
    assert FLAG_FIRST.match(str(cause)) and re.search(case.message, str(cause)), str(cause)
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "error:" in line] == [f"error: {cause}"], err
    assert "Traceback" not in err and "usage:" not in err


@pytest.mark.parametrize("case", KWARG_CASES, ids=[c.id for c in KWARG_CASES])
def test_bad_startup_as_server_args_keywords(sglang_with_plugin, models, case):
    """`ServerArgs(...)` / `sglang.Engine(...)` keywords: MosaicConfigError (a ValueError) with the same message."""
    with pytest.raises(MosaicConfigError) as exc:
        sglang_with_plugin.ServerArgs(model_path=str(models[case.model]), load_format="dummy", device="cpu",
                                      **case.kwargs)  # fmt: skip
    assert FLAG_FIRST.match(str(exc.value)) and re.search(case.message, str(exc.value)), str(exc.value)


@pytest.mark.parametrize(
    "flags", [["--page-size", "16"], ["--attention-backend", "triton"], ["--kv-cache-dtype", "fp8_e4m3"]]
)
def test_the_same_sglang_flags_without_mosaic_are_sglangs_business(sglang_with_plugin, cpu_args, flags):
    """Compatibility refusals apply only with --kv-compressor mosaic; stock SGLang accepts these on its own."""
    server_args = sglang_with_plugin.prepare_server_args(cpu_args(*flags))
    assert seam.config_of(server_args) == MosaicKVConfig()


def _mla_configurator(config: MosaicKVConfig) -> SimpleNamespace:
    """The KVCacheConfigurator attributes SGLang's pool dispatch reads for a DeepSeek-V2 (MLA) model on the CPU."""
    server_args = SimpleNamespace(attention_backend="mosaic")
    seam.attach_config(server_args, config)
    kvc = SimpleNamespace(
        server_args=server_args, use_mla_backend=True, mambaish_config=None, is_hybrid_swa=False,
        kv_cache_dtype=torch.float16, pool_page_size=64, device="cpu",
        layer_info=SimpleNamespace(num_effective_layers=2, start_layer=0, end_layer=2),
        model_config=SimpleNamespace(hf_config=SimpleNamespace(architectures=["DeepseekV2ForCausalLM"],
                                                               model_type="deepseek_v2"),
                                     kv_lora_rank=64, qk_rope_head_dim=16),
    )  # fmt: skip
    return kvc


@pytest.mark.parametrize("config", [MosaicKVConfig("mosaic"), MosaicKVConfig()], ids=["mosaic", "none"])
def test_a_pool_other_than_mha_is_refused_where_sglang_builds_it(sglang_with_plugin, monkeypatch, config):
    """Last line of defence in the scheduler: with mosaic on, SGLang's pool dispatch returning any pool but the
    compressed one (here the real MLATokenToKVPool) stops startup naming --kv-compressor; without mosaic it is
    SGLang's pool, untouched."""
    import sglang.srt.mem_cache.kv_cache_configurator as kcc
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool

    monkeypatch.setattr(kcc, "get_memory", lambda: SimpleNamespace(enable_page_major_kv_layout=False))
    monkeypatch.setattr(kcc, "get_exec", lambda: SimpleNamespace(features=SimpleNamespace(enable_memory_saver=False)))
    kvc = _mla_configurator(config)
    kvc._build_mla_kv_pool = functools.partial(kcc.KVCacheConfigurator._build_mla_kv_pool, kvc)

    def build() -> Any:
        return kcc.KVCacheConfigurator._build_token_to_kv_pool(
            kvc, sizes=SimpleNamespace(max_total_num_tokens=256), is_dsa_model=False, is_dsv4_model=False,
            req_to_token_pool=None,
        )  # fmt: skip

    if not config.enabled:
        assert type(build()) is MLATokenToKVPool
        return
    with pytest.raises(MosaicConfigError) as exc:
        build()
    assert str(exc.value) == (
        "--kv-compressor: mosaic expected SGLang to build its MHA KV pool for DeepseekV2ForCausalLM, got "
        "MLATokenToKVPool; MosaicKV compresses MHA/GQA caches only, drop --kv-compressor mosaic"
    )
