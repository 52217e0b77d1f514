# SPDX-License-Identifier: Apache-2.0
"""bench.bad_input, the parts that need no server: the case list, placeholders, error parsing, classification and
the table. Whether a live server answers each case with a 4xx is what the bench itself measures (GPU machine)."""

from __future__ import annotations

import json
import re

import pytest

from bench.bad_input import (
    BAD_REQUEST_CASES,
    CHAT,
    COMPLETIONS,
    GENERATE,
    MODEL,
    OVER_CONTEXT_PROMPT,
    BadRequest,
    CaseResult,
    ServerFacts,
    classify,
    error_message,
    format_table,
    main,
    materialize,
    stream_error,
    verdict,
)

FACTS = ServerFacts(model="llama", context_len=100)
CASE = BadRequest("t", COMPLETIONS, {}, r"max_tokens", "x")


def test_case_list_is_well_formed():
    """Unique ids; known endpoints; every body is JSON-serialisable or raw bytes; every `names` is a valid regex;
    the issue's kinds of bad input are all there."""
    ids = [c.id for c in BAD_REQUEST_CASES]
    assert len(ids) == len(set(ids)) and all(re.fullmatch(r"[a-z0-9-]+", i) for i in ids)
    for case in BAD_REQUEST_CASES:
        assert case.path in (COMPLETIONS, CHAT, GENERATE), case.id
        assert isinstance(case.body, bytes) or json.dumps(materialize(case.body, FACTS)), case.id
        re.compile(case.names)
        assert case.what, case.id
    for required in ("prompt-over-context", "prompt-empty", "max-tokens-huge", "max-tokens-negative", "malformed-json",
                     "prompt-wrong-type", "model-unknown", "temperature-negative", "n-zero", "stop-wrong-type",
                     "stream-bad-temperature"):  # fmt: skip
        assert required in ids, required


def test_malformed_json_case_is_not_json():
    raw = [c.body for c in BAD_REQUEST_CASES if c.id == "malformed-json"][0]
    with pytest.raises(ValueError):
        json.loads(raw)


def test_materialize_fills_the_placeholders():
    """The served model name, and a prompt longer than the context length whatever the tokenizer."""
    body = materialize({"model": MODEL, "prompt": OVER_CONTEXT_PROMPT, "stop": [MODEL], "n": 1}, FACTS)
    assert body["model"] == "llama" and body["stop"] == ["llama"] and body["n"] == 1
    assert len(body["prompt"].split()) > FACTS.context_len
    over = [c for c in BAD_REQUEST_CASES if c.id == "max-tokens-over-context"][0]
    assert materialize(over.body, FACTS)["max_tokens"] > FACTS.context_len


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"object": "error", "message": "max_tokens must be positive", "code": 400}', "max_tokens must be positive"),
        ('{"error": {"message": "Prompt cannot be empty", "code": 400}}', "Prompt cannot be empty"),
        ('{"detail": [{"loc": ["body", "temperature"], "msg": "Input should be a valid number"}]}',
         "body.temperature: Input should be a valid number"),
        ('{"detail": "Not Found"}', "Not Found"),
        ("Internal Server Error", "Internal Server Error"),
    ],
)
def test_error_message_reads_the_usual_error_bodies(text, message):
    assert error_message(text) == message


def test_stream_error_finds_the_error_event():
    """A stream that began with 200 and then sent an error event: its code and message; a clean stream: None."""
    err = json.dumps({"error": {"message": "temperature must be non-negative", "code": 400}})
    text = f'data: {{"choices": []}}\n\ndata: {err}\n\ndata: [DONE]\n'
    assert stream_error(text) == (400, "temperature must be non-negative")
    assert stream_error('data: {"choices": [{"text": "a"}]}\n\ndata: [DONE]\n') is None
    assert stream_error('{"text": "not a stream"}') is None


@pytest.mark.parametrize(
    "status, message, outcome",
    [
        (400, "max_tokens must be positive", "4xx-names-field"),
        (422, "body.MAX_TOKENS: bad", "4xx-names-field"),
        (400, "Bad request", "4xx-vague"),
        (200, "", "accepted"),
        (500, "max_tokens broke something", "5xx"),
        (None, "ConnectionRefusedError", "no-response"),
        (307, "", "status-307"),
    ],
)
def test_classify(status, message, outcome):
    assert classify(CASE, status, message) == outcome


def test_verdict_needs_the_field_named_and_the_server_up():
    assert verdict("4xx-names-field", True) == "pass"
    assert verdict("4xx-names-field", False) == "FAIL"
    assert verdict("4xx-vague", True) == "FAIL" and verdict("accepted", True) == "FAIL"


def test_format_table():
    """One aligned row per case, streams marked, and the pass count."""
    results = [
        CaseResult("max-tokens-negative", "x", COMPLETIONS, 400, "max_tokens must\n be positive", False,
                   "4xx-names-field", True, "pass"),
        CaseResult("stream-bad-temperature", "x", COMPLETIONS, 400, "temperature bad", True, "4xx-names-field",
                   True, "pass"),
        CaseResult("prompt-over-context", "x", COMPLETIONS, None, "", False, "no-response", False, "FAIL"),
    ]  # fmt: skip
    lines = format_table(results).splitlines()
    assert lines[0].split() == ["case", "status", "outcome", "up", "verdict", "message"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split()[:5] == ["max-tokens-negative", "400", "4xx-names-field", "yes", "pass"]
    assert "max_tokens must be positive" in lines[2]
    assert lines[3].split()[1] == "400*"
    assert lines[4].split()[:5] == ["prompt-over-context", "-", "no-response", "NO", "FAIL"]
    assert lines[2].index("4xx") == lines[0].index("outcome") == lines[4].index("no-response")
    assert lines[-1].startswith("2/3 pass")


def test_unknown_case_id_is_refused_before_any_request(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--url", "http://127.0.0.1:9", "--cases", "no-such-case"])
    assert exc.value.code == 2
    assert "--cases: expected ids of BAD_REQUEST_CASES, got 'no-such-case'" in capsys.readouterr().err
