# SPDX-License-Identifier: Apache-2.0
"""Settings MosaicKV cannot serve with stop the launch with one sentence naming the option."""

from __future__ import annotations

import dataclasses

import pytest

from mosaickv_sglang.compat import ServingSettings, check_compatibility
from mosaickv_sglang.config import MosaicConfigError, MosaicKVConfig

MOSAIC = MosaicKVConfig(compressor="mosaic")

INCOMPATIBLE = [
    ({"page_size": 128}, r"^--page-size: --kv-compressor mosaic uses pages of --mosaic-segment-size \(64\) tokens, got 128"),
    ({"page_size": 16}, r"^--page-size: --kv-compressor mosaic uses pages of --mosaic-segment-size \(64\) tokens, got 16"),
    ({"attention_backend_flag_set": "flashinfer"}, r"^--attention-backend: .*got 'flashinfer'; drop --attention-backend$"),
    ({"prefill_attention_backend_flag_set": "fa3"}, r"^--prefill-attention-backend: "),
    ({"decode_attention_backend_flag_set": "triton"}, r"^--decode-attention-backend: "),
    ({"kv_cache_dtype": "fp8_e4m3"}, r"^--kv-cache-dtype: .*got 'fp8_e4m3'"),
    ({"model_is_mla": True, "model_architecture": "DeepseekV3ForCausalLM"}, r"^--model-path: .*DeepseekV3ForCausalLM uses MLA"),
    ({"model_is_hybrid_swa": True}, r"^--model-path: .*hybrid sliding-window"),
    ({"model_is_hybrid_linear": True}, r"^--model-path: .*linear-attention/Mamba"),
    ({"model_is_encoder_decoder": True}, r"^--model-path: .*encoder-decoder"),
    ({"enable_hierarchical_cache": True}, r"^--enable-hierarchical-cache: not supported"),
    ({"disaggregation_mode": "prefill"}, r"^--disaggregation-mode: "),
    ({"speculative_algorithm": "EAGLE"}, r"^--speculative-algorithm: "),
    ({"enable_dp_attention": True}, r"^--enable-dp-attention: "),
    ({"pp_size": 2}, r"^--pp-size: "),
    ({"dcp_size": 2}, r"^--dcp-size: "),
    ({"use_ray": True}, r"^--use-ray: "),
    ({"enable_lmcache": True}, r"^--enable-lmcache: "),
    ({"enable_hisparse": True}, r"^--enable-hisparse: "),
    ({"prefill_only_disable_kv_cache": True}, r"^--prefill-only-disable-kv-cache: "),
    ({"enable_unified_memory": True}, r"^--enable-unified-memory: "),
]


@pytest.mark.parametrize("changes, message", INCOMPATIBLE, ids=[next(iter(c)) for c, _ in INCOMPATIBLE])
def test_incompatible_setting_is_rejected_by_name(changes, message):
    """Each unsupported setting alone is rejected for mosaic and accepted for 'none'."""
    settings = dataclasses.replace(ServingSettings(), **changes)
    with pytest.raises(MosaicConfigError, match=message):
        check_compatibility(MOSAIC, settings)
    check_compatibility(MosaicKVConfig(), settings)  # stock SGLang decides for itself


@pytest.mark.parametrize(
    "field, flag",
    [
        ("attention_backend_flag_set", "--attention-backend"),
        ("prefill_attention_backend_flag_set", "--prefill-attention-backend"),
        ("decode_attention_backend_flag_set", "--decode-attention-backend"),
    ],
)
def test_mosaic_backend_needs_the_compressor(field, flag):
    """The 'mosaic' attention backend without --kv-compressor mosaic has no cache to read: refused by name."""
    settings = dataclasses.replace(ServingSettings(page_size=64), **{field: "mosaic"})
    with pytest.raises(MosaicConfigError, match=f"^{flag}: 'mosaic' reads the MosaicKV cache and needs --kv-compressor"):
        check_compatibility(MosaicKVConfig(), settings)
    check_compatibility(MOSAIC, settings)


def test_supported_settings_pass():
    """Plain GQA serving with pages of one segment, the mosaic backend named or not, 16-bit KV."""
    for settings in (
        ServingSettings(page_size=64),
        ServingSettings(page_size=64, attention_backend_flag_set="mosaic", kv_cache_dtype="bfloat16"),
        ServingSettings(page_size=64, kv_cache_dtype="float16"),
    ):
        check_compatibility(MOSAIC, settings)
