# SPDX-License-Identifier: Apache-2.0
"""MosaicKVConfig: defaults, coercion and one clear error per invalid value."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mosaickv_sglang.config import OPTIONS, MosaicConfigError, MosaicKVConfig


def test_defaults_are_stock_sglang():
    """With no options the compressor is 'none' and the documented defaults apply."""
    config = MosaicKVConfig.from_options({})
    assert config == MosaicKVConfig()
    assert not config.enabled
    assert config.to_options() == {opt.kwarg: opt.default for opt in OPTIONS}


def test_round_trip_through_options():
    """to_options() and from_options() are inverse, and strings coerce like CLI values."""
    config = MosaicKVConfig.from_options(
        {
            "kv_compressor": "mosaic",
            "mosaic_compression_ratio": "4.5",
            "mosaic_segment_size": "128",
            "mosaic_hot_window": 1024,
            "mosaic_sink_tokens": 4,
            "mosaic_decode_read_budget": 0,
            "mosaic_sidecar": "off",
            "mosaic_resegment": "OFF",
        }
    )
    assert config == MosaicKVConfig("mosaic", 4.5, 128, 1024, 4, 0, False, False)
    assert MosaicKVConfig.from_options(config.to_options()) == config
    assert config.sink_segments == 1 and config.enabled


@pytest.mark.parametrize(
    "options, message",
    [
        ({"kv_compressor": "zip"}, r"--kv-compressor: expected one of 'none', 'mosaic', got 'zip'"),
        ({"mosaic_compression_ratio": 0.5}, r"--mosaic-compression-ratio: expected a number in \[1, 16\], got 0.5"),
        ({"mosaic_compression_ratio": 1000}, r"--mosaic-compression-ratio: expected a number in \[1, 16\]"),
        ({"mosaic_compression_ratio": float("nan")}, r"--mosaic-compression-ratio: expected a finite number"),
        ({"mosaic_compression_ratio": "three"}, r"--mosaic-compression-ratio: expected a number, got 'three'"),
        ({"mosaic_compression_ratio": True}, r"--mosaic-compression-ratio: expected a number, got True"),
        ({"mosaic_segment_size": 48}, r"--mosaic-segment-size: expected a power of two in \[16, 256\], got 48"),
        ({"mosaic_segment_size": 0}, r"--mosaic-segment-size: expected a power of two"),
        ({"mosaic_segment_size": 512}, r"--mosaic-segment-size: expected a power of two"),
        ({"mosaic_segment_size": 64.5}, r"--mosaic-segment-size: expected an integer, got 64.5"),
        ({"mosaic_hot_window": -1}, r"--mosaic-hot-window: expected an integer in \[0, 65536\], got -1"),
        ({"mosaic_sink_tokens": 10**6}, r"--mosaic-sink-tokens: expected an integer in \[0, 8192\]"),
        ({"mosaic_decode_read_budget": 10}, r"--mosaic-decode-read-budget: expected 0 \(read all\) or at least"),
        ({"mosaic_decode_read_budget": -64}, r"--mosaic-decode-read-budget: expected 0"),
        ({"mosaic_sidecar": "maybe"}, r"--mosaic-sidecar: expected 'on' or 'off', got 'maybe'"),
        ({"mosaic_resegment": "maybe"}, r"--mosaic-resegment: expected 'on' or 'off', got 'maybe'"),
        ({"mosaic_resegment": 0}, r"--mosaic-resegment: expected 'on' or 'off', got 0"),
        ({"mosaic_ratio": 3}, r"mosaic_ratio: unknown MosaicKV option"),
    ],
)
def test_invalid_option_names_the_flag(options, message):
    """Each invalid value raises MosaicConfigError (a ValueError) naming the CLI flag and the value."""
    with pytest.raises(MosaicConfigError, match=message):
        MosaicKVConfig.from_options(options)
    assert issubclass(MosaicConfigError, ValueError)


def test_direct_construction_is_validated_too():
    """Fields are checked in __post_init__, not only on the option path."""
    with pytest.raises(MosaicConfigError, match="--mosaic-sidecar"):
        MosaicKVConfig(sidecar="on")  # type: ignore[arg-type]
    with pytest.raises(MosaicConfigError, match="--mosaic-resegment: expected 'on' or 'off', got 'off'"):
        MosaicKVConfig(resegment="off")  # type: ignore[arg-type]
    with pytest.raises(MosaicConfigError, match="--mosaic-segment-size: expected an integer"):
        MosaicKVConfig(segment_size="64")  # type: ignore[arg-type]


@given(ratio=st.floats(allow_nan=False, allow_infinity=False, min_value=-100, max_value=100))
def test_ratio_accepted_exactly_in_range(ratio):
    """A ratio is accepted iff 1 <= ratio <= 16."""
    if 1.0 <= ratio <= 16.0:
        assert MosaicKVConfig(compression_ratio=ratio).compression_ratio == ratio
    else:
        with pytest.raises(MosaicConfigError, match="--mosaic-compression-ratio"):
            MosaicKVConfig(compression_ratio=ratio)


@given(size=st.integers(min_value=-10, max_value=1024))
def test_segment_size_accepted_exactly_for_powers_of_two(size):
    """A segment size is accepted iff it is a power of two in [16, 256]."""
    if size in (16, 32, 64, 128, 256):
        assert MosaicKVConfig(segment_size=size, decode_read_budget=0).segment_size == size
    else:
        with pytest.raises(MosaicConfigError, match="--mosaic-segment-size"):
            MosaicKVConfig(segment_size=size, decode_read_budget=0)
