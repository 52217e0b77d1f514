# SPDX-License-Identifier: Apache-2.0
"""A tiny OpenAI-compatible HTTP server for testing the accuracy suite's client (never a source of accuracy numbers).

It answers ``POST /v1/completions`` with text from a test-supplied function, ``POST /v1/tokenize`` with a whitespace
word count, and ``GET /v1/models`` / ``/get_server_info`` with fixed JSON. Tests can make the first requests fail
(``fail``: a list of HTTP statuses, or ``"sleep"`` to stall past the client's timeout) and read what was asked
(``requests``, each with its arrival time ``t`` and, for answered completions, ``t_done`` on ``time.monotonic()``) and
how many completions were in flight at once (``max_in_flight``). With ``cache_report`` a completion's ``usage`` carries
``prompt_tokens_details.cached_tokens`` as SGLang's ``--enable-cache-report`` does: here the longest common prefix,
in words, of the prompt with an earlier completion's prompt (a stand-in for the radix cache).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Union

from mkv_http_fake import LocalServer, QuietHandler

MODEL = "fake-model"


@dataclass
class FakeOpenAI(LocalServer):
    """Server state and behaviour (see the module docstring)."""

    answer: Callable[[str], str] = lambda prompt: " 0000000."
    delay: float = 0.0
    fail: List[Union[int, str]] = field(default_factory=list)
    stall: float = 1.0
    completion_body: Optional[Callable[[Dict[str, Any]], Any]] = None
    cache_report: bool = False
    requests: List[Dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: Optional[ThreadingHTTPServer] = None

    def completions(self) -> List[Dict[str, Any]]:
        return [r["body"] for r in self.requests if r["path"] == "/v1/completions"]

    def completed(self) -> List[Dict[str, Any]]:
        """The completion requests answered so far (with ``t`` and ``t_done``), in arrival order."""
        return [r for r in self.requests if r["path"] == "/v1/completions" and "t_done" in r]

    def __enter__(self) -> "FakeOpenAI":
        state = self

        class Handler(QuietHandler):

            def do_GET(self) -> None:
                with state.lock:
                    state.requests.append({"method": "GET", "path": self.path, "body": None, "t": time.monotonic()})
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
                elif self.path == "/get_server_info":
                    self._send(200, {"version": "fake", "model_path": MODEL, "kv_compressor": "none"})
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                record = {"method": "POST", "path": self.path, "body": body, "t": time.monotonic()}
                with state.lock:
                    earlier = [r["body"]["prompt"].split() for r in state.completed()]
                    state.requests.append(record)
                    failure = state.fail.pop(0) if state.fail and self.path == "/v1/completions" else None
                if failure == "sleep":
                    time.sleep(state.stall)
                    return self._send(200, {})
                if failure is not None:
                    return self._send(int(failure), {"object": "error", "message": f"injected {failure}"})
                if self.path == "/v1/tokenize":
                    n = len(body["prompt"].split())
                    return self._send(200, {"tokens": list(range(n)), "count": n, "max_model_len": 8192})
                if self.path != "/v1/completions":
                    return self._send(404, {"detail": "Not Found"})
                with state.lock:
                    state.in_flight += 1
                    state.max_in_flight = max(state.max_in_flight, state.in_flight)
                try:
                    time.sleep(state.delay)
                    if state.completion_body is not None:
                        reply = state.completion_body(body)
                    else:
                        reply = self._completion(body, earlier)
                        with state.lock:
                            record["t_done"] = time.monotonic()
                finally:
                    # Before the reply is written: a client may send its next request as soon as it reads this one.
                    with state.lock:
                        state.in_flight -= 1
                self._send(200, reply)

            def _completion(self, body: Dict[str, Any], earlier: List[List[str]]) -> Dict[str, Any]:
                text = state.answer(body["prompt"])
                words = body["prompt"].split()
                usage: Dict[str, Any] = {"prompt_tokens": len(words), "completion_tokens": len(text.split()),
                                         "total_tokens": 0}
                if state.cache_report:
                    usage["prompt_tokens_details"] = {"cached_tokens": max(
                        [0] + [len(os.path.commonprefix([words, e])) for e in earlier])}
                return {"id": "cmpl-fake", "object": "text_completion", "model": body.get("model"),
                        "choices": [{"index": 0, "text": text, "finish_reason": "stop"}], "usage": usage}

        self._serve(Handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop()
