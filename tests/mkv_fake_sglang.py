# SPDX-License-Identifier: Apache-2.0
"""A tiny stand-in for SGLang's native HTTP API, for testing :mod:`bench.agreement`'s client (never a source of
agreement numbers).

``POST /generate`` answers a ``return_logprob`` request in SGLang 0.5.17's layout: ``meta_info.input_token_logprobs``
holds ``[logprob, token_id, null]`` for every prompt position from ``logprob_start_len`` (the first logprob ``null``)
and ``meta_info.input_top_logprobs`` ``null`` then ``[[logprob, token_id, null]]`` per position. The "model" is two
test-supplied functions of ``(input_ids, position)``: the logprob of the actual token at ``position`` and the top-1
``(token, logprob)`` predicted for it. ``POST /v1/tokenize`` maps each whitespace word to a small id;
``GET /server_info`` returns ``info``; ``POST /flush_cache`` is counted and answered in plain text, as SGLang does.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from mkv_http_fake import LocalServer, QuietHandler

MODEL = "fake-sglang"


def word_id(word: str) -> int:
    """Token id of a whitespace word in the fake tokenizer (stable, < 1000)."""
    return sum((k + 1) * ord(c) for k, c in enumerate(word)) % 997 + 3


def default_logprob(ids: Sequence[int], p: int) -> float:
    return -0.5 - 0.125 * (p % 5)


def default_top1(ids: Sequence[int], p: int) -> Tuple[int, float]:
    return (ids[p] if p % 3 else ids[p] + 1), -0.25


@dataclass
class FakeSGLang(LocalServer):
    """Server state and behaviour (see the module docstring)."""

    logprob: Callable[[Sequence[int], int], float] = default_logprob
    top1: Callable[[Sequence[int], int], Tuple[int, float]] = default_top1
    info: Optional[Dict[str, Any]] = field(default_factory=lambda: {
        "version": "fake", "model_path": MODEL, "chunked_prefill_size": 512, "page_size": 64,
        "kv_compressor": "mosaic", "mosaic_hot_window": 512, "mosaic_sink_tokens": 64})
    generate_body: Optional[Callable[[Dict[str, Any]], Any]] = None
    max_model_len: Optional[int] = None  # /v1/models' max_model_len and /get_model_info's context_length when set
    requests: List[Dict[str, Any]] = field(default_factory=list)
    flushes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: Optional[ThreadingHTTPServer] = None

    def generates(self) -> List[Dict[str, Any]]:
        return [r["body"] for r in self.requests if r["path"] == "/generate"]

    def answer(self, body: Dict[str, Any]) -> Dict[str, Any]:
        """SGLang's ``/generate`` answer for a ``return_logprob`` request with ``top_logprobs_num`` 1."""
        ids, s = body["input_ids"], int(body["logprob_start_len"])
        tok: List[List[Any]] = [[None, ids[s], None]]
        top: List[Any] = [None]
        for p in range(s + 1, len(ids)):
            tok.append([self.logprob(ids, p), ids[p], None])
            t, lp = self.top1(ids, p)
            top.append([[lp, t, None]])
        return {"text": " x", "output_ids": [7], "meta_info": {
            "id": "fake", "finish_reason": {"type": "length", "length": 1}, "prompt_tokens": len(ids),
            "completion_tokens": 1, "cached_tokens": 0, "input_token_logprobs": tok, "output_token_logprobs": [
                [-0.1, 7, None]], "input_top_logprobs": top, "output_top_logprobs": [[[-0.1, 7, None]]]}}

    def __enter__(self) -> "FakeSGLang":
        state = self

        class Handler(QuietHandler):
            text_content_type = "text/plain"

            def do_GET(self) -> None:
                with state.lock:
                    state.requests.append({"method": "GET", "path": self.path, "body": None})
                if self.path == "/v1/models":
                    card = {"id": MODEL, "object": "model"}
                    if state.max_model_len is not None:
                        card["max_model_len"] = state.max_model_len
                    self._send(200, {"object": "list", "data": [card]})
                elif self.path == "/get_model_info" and state.max_model_len is not None:
                    self._send(200, {"model_path": MODEL, "context_length": state.max_model_len})
                elif self.path == "/server_info" and state.info is not None:
                    self._send(200, state.info)
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
                with state.lock:
                    state.requests.append({"method": "POST", "path": self.path, "body": body})
                if self.path == "/v1/tokenize":
                    ids = [word_id(w) for w in body["prompt"].split()]
                    return self._send(200, {"tokens": ids, "count": len(ids), "max_model_len": 1 << 20})
                if self.path == "/flush_cache":  # SGLang answers plain text
                    with state.lock:
                        state.flushes += 1
                    return self._send(200, "Cache flushed.\nPlease check backend logs for more details.\n")
                if self.path != "/generate":
                    return self._send(404, {"detail": "Not Found"})
                if state.generate_body is not None:
                    return self._send(200, state.generate_body(body))
                self._send(200, state.answer(body))

        self._serve(Handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop()
