# SPDX-License-Identifier: Apache-2.0
"""Bad requests against a running SGLang server (issue #8): each must get one 4xx naming the field, and the server
must stay up.

    python -m sglang.launch_server --model-path M --kv-compressor mosaic --port 30000 &
    python -m bench.bad_input --url http://127.0.0.1:30000 --out results.json

For every case of :data:`BAD_REQUEST_CASES` it records the HTTP status and the error message (for a streamed request
that starts with 200, the error event inside the stream), classifies it (:func:`classify`), then checks that
``/health`` answers 200 and that one normal greedy request still completes. It prints a table and writes JSON. If the
server stops answering, the remaining cases are marked not run. Startup bad input is tested on the CPU in
``tests/test_bad_input.py``. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any, Optional

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
GENERATE = "/generate"

# Placeholders in case bodies, filled from the server (see materialize).
MODEL = "<served model>"
OVER_CONTEXT_PROMPT = "<prompt longer than the context length>"
OVER_CONTEXT_TOKENS = "<context length + 1000>"

GREEDY_PROMPT = "The capital of France is"


@dataclass(frozen=True)
class BadRequest:
    """One bad request: where it goes, what it sends, and what a good error message names."""

    id: str
    path: str
    body: Any  # JSON body (placeholders allowed), or ``bytes`` sent as they are
    names: str  # regex (case-insensitive) a good message matches: the field at fault
    what: str  # the bad input, in words


BAD_REQUEST_CASES = [
    BadRequest("prompt-over-context", COMPLETIONS, {"model": MODEL, "prompt": OVER_CONTEXT_PROMPT, "max_tokens": 8},
               r"context|prompt|input", "prompt longer than the context length"),
    BadRequest("max-tokens-over-context", COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": OVER_CONTEXT_TOKENS},
               r"max_tokens|context|max_new_tokens", "max_tokens larger than the context length"),
    BadRequest("max-tokens-huge", COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": 10**18},
               r"max_tokens|context|max_new_tokens", "max_tokens = 10^18"),
    BadRequest("max-tokens-negative", COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": -1},
               r"max_tokens", "max_tokens = -1"),
    BadRequest("max-tokens-zero", COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": 0},
               r"max_tokens", "max_tokens = 0"),
    BadRequest("max-tokens-not-a-number", COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": "ten"},
               r"max_tokens", "max_tokens = \"ten\""),
    BadRequest("prompt-empty", COMPLETIONS, {"model": MODEL, "prompt": "", "max_tokens": 8},
               r"prompt", "empty prompt"),
    BadRequest("prompt-empty-list", COMPLETIONS, {"model": MODEL, "prompt": [], "max_tokens": 8},
               r"prompt", "prompt = []"),
    BadRequest("prompt-missing", COMPLETIONS, {"model": MODEL, "max_tokens": 8}, r"prompt", "no prompt field"),
    BadRequest("prompt-wrong-type", COMPLETIONS, {"model": MODEL, "prompt": {"text": "Hi"}, "max_tokens": 8},
               r"prompt", "prompt is an object"),
    BadRequest("prompt-token-out-of-vocab", COMPLETIONS, {"model": MODEL, "prompt": [1, 2, 999_999_999], "max_tokens": 8},
               r"token|vocab|prompt|input_ids", "token id beyond the vocabulary"),
    BadRequest("prompt-token-negative", COMPLETIONS, {"model": MODEL, "prompt": [1, -5], "max_tokens": 8},
               r"token|vocab|prompt|input_ids", "negative token id"),
    BadRequest("malformed-json", COMPLETIONS, b'{"model": "m", "prompt": "Hi", "max_tokens": ',
               r"json|decode|body|parse", "truncated JSON body"),
    BadRequest("body-not-an-object", COMPLETIONS, b"[1, 2, 3]", r"body|object|dict|field", "JSON array as the body"),
    BadRequest("model-unknown", COMPLETIONS, {"model": "no-such-model", "prompt": "Hi", "max_tokens": 8},
               r"model", "unknown model name"),
    BadRequest("temperature-negative", COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": 8, "temperature": -1},
               r"temperature", "temperature = -1"),
    BadRequest("temperature-not-a-number", COMPLETIONS,
               {"model": MODEL, "prompt": "Hi", "max_tokens": 8, "temperature": "hot"},
               r"temperature", "temperature = \"hot\""),
    BadRequest("top-p-over-1", COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": 8, "top_p": 1.5},
               r"top_p", "top_p = 1.5"),
    BadRequest("top-k-zero", COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": 8, "top_k": 0},
               r"top_k", "top_k = 0"),
    BadRequest("frequency-penalty-over-2", COMPLETIONS,
               {"model": MODEL, "prompt": "Hi", "max_tokens": 8, "frequency_penalty": 5.0},
               r"frequency_penalty", "frequency_penalty = 5"),
    BadRequest("n-zero", COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": 8, "n": 0}, r"\bn\b", "n = 0"),
    BadRequest("n-negative", COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": 8, "n": -2}, r"\bn\b", "n = -2"),
    BadRequest("stop-wrong-type", COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": 8, "stop": 42},
               r"stop", "stop = 42"),
    BadRequest("stop-list-of-numbers", COMPLETIONS, {"model": MODEL, "prompt": "Hi", "max_tokens": 8, "stop": [1, 2]},
               r"stop", "stop = [1, 2]"),
    BadRequest("stream-bad-temperature", COMPLETIONS,
               {"model": MODEL, "prompt": "Hi", "max_tokens": 8, "stream": True, "temperature": -1},
               r"temperature", "streamed request with temperature = -1"),
    BadRequest("stream-bad-max-tokens", COMPLETIONS,
               {"model": MODEL, "prompt": "Hi", "max_tokens": -1, "stream": True},
               r"max_tokens", "streamed request with max_tokens = -1"),
    BadRequest("chat-messages-empty", CHAT, {"model": MODEL, "messages": [], "max_tokens": 8},
               r"messages", "chat with no messages"),
    BadRequest("chat-role-unknown", CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "Hi"}],
                                           "max_tokens": 8}, r"role", "chat message with role \"wizard\""),
    BadRequest("generate-no-input", GENERATE, {"sampling_params": {"max_new_tokens": 8}},
               r"text|input_ids|input", "/generate with neither text nor input_ids"),
    BadRequest("generate-max-new-tokens-negative", GENERATE,
               {"text": "Hi", "sampling_params": {"max_new_tokens": -1}}, r"max_new_tokens", "max_new_tokens = -1"),
    BadRequest("generate-sampling-params-wrong-type", GENERATE, {"text": "Hi", "sampling_params": "greedy"},
               r"sampling_params", "sampling_params is a string"),
    BadRequest("generate-regex-invalid", GENERATE,
               {"text": "Hi", "sampling_params": {"max_new_tokens": 8, "regex": "(["}}, r"regex",
               "constrained decoding with an invalid regex"),
    BadRequest("json-schema-invalid", COMPLETIONS,
               {"model": MODEL, "prompt": "Hi", "max_tokens": 8, "response_format": {"type": "json_schema",
                                                                                      "json_schema": {"name": "x",
                                                                                      "schema": {"type": 7}}}},
               r"schema|json", "response_format with an invalid JSON schema"),
]  # fmt: skip


@dataclass(frozen=True)
class ServerFacts:
    model: str
    context_len: int


@dataclass
class CaseResult:
    id: str
    what: str
    path: str
    status: Optional[int]  # HTTP status, or the code of the error event of a stream that began with 200
    message: str
    in_stream: bool
    outcome: str  # see classify()
    server_up: bool
    verdict: str  # "pass", "FAIL" or "not run"


def materialize(body: Any, facts: ServerFacts) -> Any:
    """``body`` with the placeholders replaced by values for this server (pure)."""
    if isinstance(body, dict):
        return {k: materialize(v, facts) for k, v in body.items()}
    if isinstance(body, list):
        return [materialize(v, facts) for v in body]
    if body == MODEL:
        return facts.model
    if body == OVER_CONTEXT_PROMPT:
        return "hello " * (facts.context_len + 1000)  # at least one token per word with any tokenizer
    if body == OVER_CONTEXT_TOKENS:
        return facts.context_len + 1000
    return body


def error_message(text: str) -> str:
    """The human message of an error body: OpenAI-style ``{"message"}``/``{"error": {"message"}}``, FastAPI
    ``{"detail"}`` (a string or a list of ``{"loc", "msg"}``), or the text itself (pure)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    if isinstance(obj, dict):
        if isinstance(obj.get("error"), dict):
            obj = obj["error"]
        if "message" in obj:
            return str(obj["message"])[:500]
        detail = obj.get("detail")
        if isinstance(detail, list):
            return "; ".join(
                ".".join(str(p) for p in d.get("loc", [])) + ": " + str(d.get("msg", "")) if isinstance(d, dict)
                else str(d)
                for d in detail
            )[:500]  # fmt: skip
        if detail is not None:
            return str(detail)[:500]
    return text.strip()[:500]


def stream_error(text: str) -> Optional[tuple[Optional[int], str]]:
    """The first ``data: {"error": ...}`` event of a server-sent-event body as (code, message), else None (pure)."""
    for line in text.splitlines():
        if not line.startswith("data:"):
            continue
        payload = line[len("data:"):].strip()
        try:
            obj = json.loads(payload)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
            code = obj["error"].get("code")
            return (int(code) if isinstance(code, int) or str(code).isdigit() else None,
                    str(obj["error"].get("message", "")))  # fmt: skip
    return None


def classify(case: BadRequest, status: Optional[int], message: str) -> str:
    """What the server did with a bad request (pure).

    ``4xx-names-field`` is the goal; ``4xx-vague`` a client error whose message does not match ``case.names``;
    ``accepted`` a 2xx (the bad input was served or ignored); ``5xx`` a server error; ``no-response`` no HTTP answer.
    """
    if status is None:
        return "no-response"
    if 400 <= status < 500:
        return "4xx-names-field" if re.search(case.names, message, re.IGNORECASE) else "4xx-vague"
    if 200 <= status < 300:
        return "accepted"
    if status >= 500:
        return "5xx"
    return f"status-{status}"


def verdict(outcome: str, server_up: bool) -> str:
    return "pass" if outcome == "4xx-names-field" and server_up else "FAIL"


def format_table(results: list[CaseResult]) -> str:
    """A fixed-width table of the results, one row per case (pure)."""
    header = ("case", "status", "outcome", "up", "verdict", "message")
    rows = [
        (r.id, "-" if r.status is None else f"{r.status}{'*' if r.in_stream else ''}", r.outcome,
         "yes" if r.server_up else "NO", r.verdict, " ".join(r.message.split())[:70])
        for r in results
    ]  # fmt: skip
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    passed = sum(r.verdict == "pass" for r in results)
    lines.append(f"{passed}/{len(results)} pass (* = error event inside a stream that began with 200)")
    return "\n".join(lines)


def _send(url: str, body: Any, timeout: float) -> tuple[Optional[int], str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
        return None, f"{type(err).__name__}: {err}"


def _send_get(url: str, timeout: float) -> tuple[Optional[int], str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as err:
        return err.code, ""
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
        return None, str(err)


def _get_json(url: str, timeout: float) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def server_facts(base: str, timeout: float) -> ServerFacts:
    """Served model name and context length, from ``/v1/models`` (``/get_model_info`` for the length if needed)."""
    card = _get_json(base + "/v1/models", timeout)["data"][0]
    context_len = card.get("max_model_len") or _get_json(base + "/get_model_info", timeout).get("context_length")
    if not context_len:
        raise RuntimeError(f"--url: expected /v1/models or /get_model_info to give the context length, got none at {base}")
    return ServerFacts(model=card["id"], context_len=int(context_len))


def server_is_up(base: str, facts: ServerFacts, timeout: float) -> bool:
    """``/health`` answers 200 and a greedy completion of 8 tokens comes back with a choice."""
    status, _ = _send_get(base + "/health", timeout)
    if status != 200:
        return False
    body = {"model": facts.model, "prompt": GREEDY_PROMPT, "max_tokens": 8, "temperature": 0}
    status, text = _send(base + COMPLETIONS, body, timeout)
    try:
        return status == 200 and bool(json.loads(text)["choices"])
    except (ValueError, KeyError, TypeError):
        return False


def run_case(base: str, case: BadRequest, facts: ServerFacts, timeout: float) -> CaseResult:
    status, text = _send(base + case.path, materialize(case.body, facts), timeout)
    in_stream = False
    message = error_message(text) if status is not None else text
    if status is not None and 200 <= status < 300:
        event = stream_error(text)
        if event is not None:
            status, message, in_stream = event[0], event[1], True
        else:
            message = " ".join(text.split())[:200]
    outcome = classify(case, status, message)
    up = server_is_up(base, facts, timeout)
    return CaseResult(case.id, case.what, case.path, status, message, in_stream, outcome, up, verdict(outcome, up))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:30000", help="base URL of the SGLang server")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    ap.add_argument("--cases", default=None, help="comma-separated case ids to run (default: all)")
    args = ap.parse_args(argv)
    base = args.url.rstrip("/")
    cases = BAD_REQUEST_CASES
    if args.cases:
        wanted = args.cases.split(",")
        unknown = sorted(set(wanted) - {c.id for c in cases})
        if unknown:
            ap.error(f"--cases: expected ids of BAD_REQUEST_CASES, got {unknown[0]!r}")
        cases = [c for c in cases if c.id in wanted]
    facts = server_facts(base, args.timeout)
    if not server_is_up(base, facts, args.timeout):
        print(f"error: --url: expected a healthy server answering a greedy request, got none at {base}",
              file=sys.stderr)  # fmt: skip
        return 2
    results: list[CaseResult] = []
    for case in cases:
        if results and not results[-1].server_up:
            results.append(CaseResult(case.id, case.what, case.path, None, "", False, "not run", False, "not run"))
            continue
        results.append(run_case(base, case, facts, args.timeout))
    print(format_table(results))
    if args.out:
        record = {
            "url": base, "model": facts.model, "context_len": facts.context_len,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "results": [asdict(r) for r in results],
        }  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return 0 if all(r.verdict == "pass" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
