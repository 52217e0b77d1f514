# SPDX-License-Identifier: Apache-2.0
"""Which SGLang settings MosaicKV can serve with, checked once at startup.

The checks read a :class:`ServingSettings`, a plain snapshot of the SGLang options and model facts
that matter, which ``patches.seam`` builds from SGLang's ``ServerArgs``. Keeping the rules here, on
plain data, makes each one testable without starting SGLang.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mosaickv_sglang.config import MosaicConfigError, MosaicKVConfig

# KV dtypes MosaicKV stores (its arena is 16-bit; fp8 is its own third axis, not SGLang's fp8 pool).
SUPPORTED_KV_CACHE_DTYPES = ("auto", "bfloat16", "float16")


@dataclass(frozen=True)
class ServingSettings:
    """The SGLang options and model facts MosaicKV depends on.

    Fields named ``*_flag_set`` hold what the *user* asked for (before SGLang fills in defaults);
    the rest are resolved values.
    """

    page_size: int = 1
    attention_backend_flag_set: Optional[str] = None
    prefill_attention_backend_flag_set: Optional[str] = None
    decode_attention_backend_flag_set: Optional[str] = None
    kv_cache_dtype: str = "auto"
    enable_hierarchical_cache: bool = False
    disaggregation_mode: str = "null"
    speculative_algorithm: Optional[str] = None
    enable_dp_attention: bool = False
    pp_size: int = 1
    dcp_size: int = 1
    use_ray: bool = False
    enable_lmcache: bool = False
    enable_hisparse: bool = False
    prefill_only_disable_kv_cache: bool = False
    enable_unified_memory: bool = False
    enable_page_major_kv_layout: bool = False
    model_is_mla: bool = False
    model_is_hybrid_swa: bool = False
    model_is_hybrid_linear: bool = False
    model_is_encoder_decoder: bool = False
    model_architecture: str = ""


def check_compatibility(config: MosaicKVConfig, settings: ServingSettings) -> None:
    """Raise :class:`MosaicConfigError` for the first setting MosaicKV cannot serve with.

    With the compressor ``"none"`` only the ``mosaic`` attention backend is refused (it has no cache to read);
    everything else is stock SGLang's to accept or not.
    """
    s = settings
    user_backends = (
        ("--attention-backend", s.attention_backend_flag_set),
        ("--prefill-attention-backend", s.prefill_attention_backend_flag_set),
        ("--decode-attention-backend", s.decode_attention_backend_flag_set),
    )
    if not config.enabled:
        for flag, value in user_backends:
            if value == "mosaic":
                raise MosaicConfigError(f"{flag}: 'mosaic' reads the MosaicKV cache and needs --kv-compressor mosaic")
        return
    arch = s.model_architecture or "this model"
    for flag, value in user_backends:
        if value not in (None, "mosaic"):
            raise MosaicConfigError(
                f"{flag}: --kv-compressor mosaic uses its own 'mosaic' attention backend, got {value!r}; "
                f"drop {flag}"
            )
    rules: tuple[tuple[bool, str], ...] = (
        (
            s.kv_cache_dtype not in SUPPORTED_KV_CACHE_DTYPES,
            f"--kv-cache-dtype: --kv-compressor mosaic stores a 16-bit cache, got {s.kv_cache_dtype!r}; "
            "use 'auto', 'bfloat16' or 'float16'",
        ),
        (
            s.model_is_mla,
            f"--model-path: --kv-compressor mosaic supports MHA/GQA models, but {arch} uses MLA/DSA attention",
        ),
        (
            s.model_is_hybrid_swa,
            f"--model-path: --kv-compressor mosaic does not support hybrid sliding-window models ({arch}) yet",
        ),
        (
            s.model_is_hybrid_linear,
            f"--model-path: --kv-compressor mosaic does not support hybrid linear-attention/Mamba models ({arch})",
        ),
        (
            s.model_is_encoder_decoder,
            f"--model-path: --kv-compressor mosaic does not support encoder-decoder models ({arch})",
        ),
        (
            s.enable_hierarchical_cache,
            "--enable-hierarchical-cache: not supported with --kv-compressor mosaic (HiCache copies raw KV pages)",
        ),
        (
            s.disaggregation_mode != "null",
            "--disaggregation-mode: prefill/decode disaggregation is not supported with --kv-compressor mosaic",
        ),
        (
            s.speculative_algorithm is not None,
            "--speculative-algorithm: speculative decoding is not supported with --kv-compressor mosaic",
        ),
        (
            s.enable_dp_attention,
            "--enable-dp-attention: data-parallel attention is not supported with --kv-compressor mosaic",
        ),
        (s.pp_size > 1, "--pp-size: pipeline parallelism is not supported with --kv-compressor mosaic"),
        (s.dcp_size > 1, "--dcp-size: decode context parallelism is not supported with --kv-compressor mosaic"),
        (
            s.use_ray,
            "--use-ray: Ray workers do not load SGLang plugins, so --kv-compressor mosaic cannot run under Ray",
        ),
        (s.enable_lmcache, "--enable-lmcache: not supported with --kv-compressor mosaic"),
        (s.enable_hisparse, "--enable-hisparse: not supported with --kv-compressor mosaic"),
        (
            s.prefill_only_disable_kv_cache,
            "--prefill-only-disable-kv-cache: there is no KV cache to compress; drop --kv-compressor mosaic",
        ),
        (s.enable_unified_memory, "--enable-unified-memory: not supported with --kv-compressor mosaic"),
        (
            s.enable_page_major_kv_layout,
            "--enable-page-major-kv-layout: not supported with --kv-compressor mosaic (MosaicKV lays out its own pool)",
        ),
    )
    for broken, message in rules:
        if broken:
            raise MosaicConfigError(message)
    if config.segment_size != s.page_size:
        raise MosaicConfigError(
            f"--page-size: --kv-compressor mosaic uses pages of --mosaic-segment-size ({config.segment_size}) "
            f"tokens, got {s.page_size}; drop --page-size or set it to the segment size"
        )
