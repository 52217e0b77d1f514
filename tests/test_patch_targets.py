# SPDX-License-Identifier: Apache-2.0
"""Every SGLang name the seam relies on exists in the installed SGLang (an upgrade fails here first)."""

from __future__ import annotations

import dataclasses
import pkgutil

import pytest

from mosaickv_sglang.patches import seam


def test_sglang_version_is_the_pinned_one():
    """The seam was written against SGLang 0.5.17."""
    import sglang

    assert sglang.__version__ == seam.SGLANG_VERSION


@pytest.mark.parametrize("target", seam.HOOK_TARGETS)
def test_hook_target_resolves(target):
    """Each hook target resolves to a callable attribute of SGLang."""
    assert callable(pkgutil.resolve_name(target))


def test_server_args_fields_exist():
    """Every ServerArgs field the compatibility snapshot reads is a real field."""
    from sglang.srt.server_args import ServerArgs

    names = {f.name for f in dataclasses.fields(ServerArgs)}
    missing = (set(seam.SERVER_ARGS_FIELDS.values()) | set(seam.USER_BACKEND_FIELDS.values())) - names
    assert missing == set()


def test_model_fact_helpers_exist():
    """The model-inspection helpers the seam imports exist with the expected names."""
    from sglang.srt.configs.hybrid_arch import linear_attn_model_spec
    from sglang.srt.configs.model_config import AttentionArch, ModelConfig, is_encoder_decoder_model
    from sglang.srt.plugins.hook_registry import _current_plugin_source

    assert AttentionArch.MLA and callable(ModelConfig.from_server_args)
    assert callable(linear_attn_model_spec) and callable(is_encoder_decoder_model)
    assert _current_plugin_source.get() is None
