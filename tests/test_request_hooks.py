# SPDX-License-Identifier: Apache-2.0
"""Request validation hooks: token ids outside the vocabulary are refused before they reach the GPU, and a
parallel-sample count ``n`` that is not an integer >= 1 before SGLang reads it."""

from __future__ import annotations

import asyncio
import json
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


@pytest.mark.parametrize("params, got", [({"n": 0}, "0"), ({"n": -2}, "-2"), ({"n": 1.5}, "1.5"), ({"n": "3"}, "'3'"),
                                         ({"n": 3.0}, "3.0"), ({"n": True}, "True"), ({"n": None}, "None"),
                                         ([{"n": 2}, {"n": 0}], "0")])  # fmt: skip
def test_bad_n_names_the_field_and_the_value(params, got):
    assert requests.bad_n(params) == f"n: expected an integer >= 1, got {got}"


@pytest.mark.parametrize("params", [{"n": 1}, {"n": 3}, {"max_new_tokens": 8}, {}, None, [{"n": 3}, {"n": 3}], [],
                                    "greedy"])  # fmt: skip
def test_bad_n_passes_good_or_absent_n(params):
    """A missing n means 1; what is not a dict (e.g. sampling_params = "greedy") is SGLang's to refuse."""
    assert requests.bad_n(params) is None


def _generate_original(calls):
    async def original(self, obj, request=None):
        calls.append(obj)
        yield {"text": "ok"}

    return original


@pytest.mark.parametrize("n, got", [(0, "0"), (-2, "-2"), (1.5, "1.5"), ("3", "'3'")])
def test_mosaic_server_refuses_bad_n_before_generating(n, got):
    calls = []
    obj = SimpleNamespace(sampling_params={"max_new_tokens": 8, "n": n})
    with pytest.raises(ValueError, match=rf"^n: expected an integer >= 1, got {got}$"):
        requests.n_at_least_one(_generate_original(calls), _manager(MosaicKVConfig("mosaic")), obj, None)
    assert calls == []


@pytest.mark.parametrize("params", [{"n": 1}, {"n": 3}, {"max_new_tokens": 8}, None])
def test_mosaic_server_generates_with_good_n(params):
    calls = []
    obj = SimpleNamespace(sampling_params=params)
    gen = requests.n_at_least_one(_generate_original(calls), _manager(MosaicKVConfig("mosaic")), obj, None)
    assert asyncio.run(gen.__anext__()) == {"text": "ok"}
    assert calls == [obj]


def test_stock_server_leaves_n_alone():
    calls = []
    obj = SimpleNamespace(sampling_params={"n": 0})
    gen = requests.n_at_least_one(_generate_original(calls), _manager(MosaicKVConfig()), obj, None)
    assert asyncio.run(gen.__anext__()) == {"text": "ok"}
    assert calls == [obj]


def _sglang_manager(config: MosaicKVConfig) -> SimpleNamespace:
    """Just enough of a TokenizerManager for generate_request to fail fast after normalizing the request."""
    mgr = _manager(config)
    mgr.auto_create_handle_loop = lambda: None
    mgr._set_default_priority = lambda obj: (_ for _ in ()).throw(RuntimeError("normalized"))
    return mgr


@pytest.mark.parametrize("n", [0, -2, 1.5, "3"])
def test_hooked_sglang_generate_request_refuses_bad_n(sglang_with_plugin, n):
    """Through SGLang's HookRegistry, on its real GenerateReqInput: the 400-bound ValueError comes before
    normalize_batch_and_arguments (which, unchecked, accepts n <= 0 and fails with TypeError on 1.5 or "3")."""
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    obj = GenerateReqInput(text="Hi", sampling_params={"max_new_tokens": 8, "n": n})
    with pytest.raises(ValueError, match=r"^n: expected an integer >= 1, got "):
        TokenizerManager.generate_request(_sglang_manager(MosaicKVConfig("mosaic")), obj, None)
    stock = TokenizerManager.generate_request(_sglang_manager(MosaicKVConfig()), obj, None)
    with pytest.raises((RuntimeError, TypeError)):  # SGLang's own path: normalized (n <= 0) or a TypeError
        asyncio.run(stock.__anext__())


@pytest.mark.parametrize("n", [1, 3])
def test_hooked_sglang_generate_request_passes_good_n(sglang_with_plugin, n):
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    obj = GenerateReqInput(text="Hi", sampling_params={"max_new_tokens": 8, "n": n})
    gen = TokenizerManager.generate_request(_sglang_manager(MosaicKVConfig("mosaic")), obj, None)
    with pytest.raises(RuntimeError, match="normalized"):
        asyncio.run(gen.__anext__())
    assert obj.parallel_sample_num == n


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("n", [0, -2])
def test_openai_completions_answers_400_naming_n(sglang_with_plugin, n, stream):
    """The bench's n-zero / n-negative cases through SGLang's own /v1/completions handler: a 400 naming n (before
    the stream starts), by the same `except ValueError` in SGLang that answers the input_ids check."""
    from sglang.srt.entrypoints.openai.protocol import CompletionRequest
    from sglang.srt.entrypoints.openai.serving_completions import OpenAIServingCompletion
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    tm = TokenizerManager.__new__(TokenizerManager)
    tm.server_args = SimpleNamespace(tokenizer_metrics_allowed_custom_labels=None,
                                     stream_response_default_include_usage=False)  # fmt: skip
    seam.attach_config(tm.server_args, MosaicKVConfig("mosaic"))
    tm.request_logger = SimpleNamespace(log_requests=False, log_requests_level=0)
    templates = SimpleNamespace(completion_template_name=None)
    request = CompletionRequest(model="m", prompt="Hi", max_tokens=8, n=n, stream=stream)
    resp = asyncio.run(OpenAIServingCompletion(tm, templates).handle_request(request, SimpleNamespace(headers={})))
    assert resp.status_code == 400
    assert json.loads(resp.body)["message"] == f"n: expected an integer >= 1, got {n}"
