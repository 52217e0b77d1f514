# SPDX-License-Identifier: Apache-2.0
"""Request validation hooks: token ids outside the vocabulary are refused before they reach the GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mosaickv_sglang.config import MosaicKVConfig
from mosaickv_sglang.patches import requests, seam


def _manager(config: MosaicKVConfig, vocab: int = 100) -> SimpleNamespace:
    server_args = SimpleNamespace()
    seam.attach_config(server_args, config)
    return SimpleNamespace(server_args=server_args, model_config=SimpleNamespace(vocab_size=vocab))


@pytest.mark.parametrize("ids, bad", [([1, 2, 100], 100), ([5, -1, 7], -1), ([0, 99, 10**9], 10**9), ([], None),
                                      ([0, 99], None), (None, None)])  # fmt: skip
def test_out_of_vocab_finds_the_first_bad_id(ids, bad):
    assert requests.out_of_vocab(ids, 100) == bad


def test_mosaic_server_refuses_out_of_vocab_ids_and_passes_the_rest_on():
    calls = []

    def original(self, obj, input_ids):
        calls.append(list(input_ids))

    mgr = _manager(MosaicKVConfig("mosaic"))
    with pytest.raises(ValueError, match=r"input_ids: expected token ids in \[0, 100\), got 100"):
        requests.token_ids_in_vocab(original, mgr, object(), [3, 100, 4])
    with pytest.raises(ValueError, match=r"got -5"):
        requests.token_ids_in_vocab(original, mgr, object(), [-5])
    assert calls == []
    requests.token_ids_in_vocab(original, mgr, object(), [3, 99])
    assert calls == [[3, 99]]


def test_stock_server_is_left_alone():
    seen = []
    requests.token_ids_in_vocab(lambda self, obj, ids: seen.append(ids), _manager(MosaicKVConfig()), None, [10**9])
    assert seen == [[10**9]]
