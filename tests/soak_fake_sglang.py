# SPDX-License-Identifier: Apache-2.0
"""Test helpers for :mod:`bench.soak` (never a source of soak numbers).

:class:`FakeSGLang` is a tiny HTTP server shaped like SGLang 0.5.17's native API: ``POST /generate`` with
``input_ids`` and ``sampling_params`` (``max_new_tokens``, ``n``), answered in one JSON (a list for ``n > 1``) or, with
``stream``, as server-sent events carrying the cumulative ``output_ids`` and ``meta_info`` (``finish_reason``,
``completion_tokens``; ``index`` for ``n > 1``) and a final ``data: [DONE]``; ``GET /health``, ``/get_server_info``,
``/v1/loads``; ``POST /flush_cache`` (400 while requests run, as SGLang). Outputs are a fixed function of the prompt
(:func:`fake_output`); tests can make it fail the first requests, answer differently while other requests are in
flight, stall before the first chunk of long prompts, and append lines to a log file after some requests.

:func:`tree_root`, :func:`scheduler_like` and :func:`sidecar_like` build a real process tree shaped like a server's:
``launch_server`` → scheduler (a ``multiprocessing`` spawn child, optionally titled ``sglang::scheduler_TP0``) →
sidecar (a spawn child of the scheduler, started again whenever it dies). They live in this module because spawned
children import their target by module name.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, List, Optional

from mkv_http_fake import LocalServer, QuietHandler


def fake_output(input_ids: List[int], max_new: int, sample: int = 0) -> List[int]:
    """The fake's answer: a fixed function of the prompt and the sample number."""
    base = sum(input_ids) * 31 + 7 * sample
    return [(base + i) % 50_000 for i in range(max_new)]


@dataclass
class FakeSGLang(LocalServer):
    """Server state and behaviour (see the module docstring)."""

    token_delay: float = 0.001  # seconds per streamed token
    fail: List[Optional[int]] = field(default_factory=list)  # HTTP statuses for the first /generate requests (None: ok)
    differ_under_load: bool = False  # change output token 2 when another request is in flight at the start
    long_prompt: int = 10**9  # prompts at least this long ...
    prefill_delay: float = 0.0  # ... wait this long (after the headers) before their first chunk
    log_path: Optional[Path] = None  # after `log_after` /generate requests, append `log_lines` here once
    log_after: int = 0
    log_lines: List[str] = field(default_factory=list)
    generated: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    disconnects: int = 0  # streams whose client went away before the end
    flushes: List[int] = field(default_factory=list)
    startup_time: float = field(default_factory=time.time)
    port: int = 0
    context_len: int = 1_000_000  # /get_model_info's context_length
    exit_after: int = 0  # > 0: the process exits (status 3) after this many /generate requests, like a crash
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: Optional[ThreadingHTTPServer] = None

    def __enter__(self) -> "FakeSGLang":
        state = self

        class Handler(QuietHandler):

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/health":
                    self._send(200, "")
                elif path == "/get_server_info":
                    self._send(200, {"version": "fake", "startup_time": state.startup_time, "internal_states": [{}]})
                elif path == "/get_model_info":
                    self._send(200, {"model_path": "fake", "context_length": state.context_len})
                elif path == "/v1/loads":
                    self._send(200, {"loads": [{"dp_rank": 0, "num_running_reqs": state.in_flight,
                                                "num_waiting_reqs": 0,
                                                "token_usage": 0.9 if state.in_flight else 0.0}]})  # fmt: skip
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                if self.path.split("?")[0] == "/flush_cache":
                    status = 400 if state.in_flight else 200
                    state.flushes.append(status)
                    return self._send(status, "Cache flushed.\n" if status == 200 else "Flush cache failed.\n")
                if self.path == "/v1/completions":  # what bench.serve_check's readiness check sends
                    return self._send(200, {"choices": [{"index": 0, "text": " fake", "finish_reason": "length"}]})
                if self.path != "/generate":
                    return self._send(404, {"detail": "Not Found"})
                body = json.loads(raw)
                with state.lock:
                    failure = state.fail.pop(0) if state.fail else None
                    state.in_flight += 1
                    state.max_in_flight = max(state.max_in_flight, state.in_flight)
                    busy = state.in_flight > 1
                try:
                    if failure is not None:
                        return self._send(failure, {"error": {"message": f"injected {failure}"}})
                    self._generate(body, busy)
                finally:
                    with state.lock:
                        state.in_flight -= 1
                        state.generated += 1
                        write = state.log_path is not None and state.generated == state.log_after
                    if write and state.log_path is not None:
                        with open(state.log_path, "a") as f:
                            f.write("".join(line + "\n" for line in state.log_lines))
                    if state.exit_after and state.generated >= state.exit_after:
                        os._exit(3)

            def _generate(self, body: Dict[str, Any], busy: bool) -> None:
                params = body.get("sampling_params") or {}
                ids, max_new, n = body["input_ids"], int(params.get("max_new_tokens", 128)), int(params.get("n", 1))
                outs = [fake_output(ids, max_new, j) for j in range(n)]
                if state.differ_under_load and busy:
                    for out in outs:
                        if len(out) > 2:
                            out[2] += 1
                meta = lambda j, k: {"id": f"fake-{j}", "prompt_tokens": len(ids), "completion_tokens": k,  # noqa: E731
                                     "finish_reason": {"type": "length", "length": max_new} if k == max_new else None}
                if not body.get("stream"):
                    items = [{"text": "", "output_ids": o, "meta_info": meta(j, max_new)} for j, o in enumerate(outs)]
                    return self._send(200, items if n > 1 else items[0])
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                self.wfile.flush()
                try:
                    if len(ids) >= state.long_prompt:
                        time.sleep(state.prefill_delay)
                    for k in range(1, max_new + 1):
                        for j, out in enumerate(outs):
                            chunk = {"text": "", "output_ids": out[:k], "meta_info": meta(j, k)}
                            if n > 1:
                                chunk["index"] = j
                            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                        time.sleep(state.token_delay)
                    self.wfile.write(b"data: [DONE]\n\n")
                except (BrokenPipeError, ConnectionResetError):
                    with state.lock:
                        state.disconnects += 1

        self._serve(Handler, self.port)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop()


def main() -> None:
    """Run the fake as a server process, with ``launch_server``'s ``--model-path``/``--port``/``--host`` (the first
    ignored) for ``bench.soak --launch ... --launch-module soak_fake_sglang``."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path")
    ap.add_argument("--host")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--exit-after", type=int, default=0)
    args = ap.parse_args()
    with FakeSGLang(port=args.port, exit_after=args.exit_after) as fake:
        print(f"fake SGLang serving at {fake.url}", flush=True)
        threading.Event().wait()


def sidecar_like() -> None:
    time.sleep(600)


def scheduler_like(title: Optional[str]) -> None:
    """Like SGLang's scheduler: set the process title, then keep one spawned sidecar alive (restart it on death)."""
    if title:
        import setproctitle

        setproctitle.setproctitle(title)
    ctx = multiprocessing.get_context("spawn")
    while True:
        child = ctx.Process(target=sidecar_like, name="mosaickv-sidecar", daemon=True)
        child.start()
        child.join()


def tree_root(title: str = "") -> None:
    """Like ``launch_server``: one spawned scheduler; runs until stdin closes."""
    ctx = multiprocessing.get_context("spawn")
    ctx.Process(target=scheduler_like, args=(title or None,)).start()  # not a daemon: daemons have no children
    sys.stdin.read()


if __name__ == "__main__":
    main()
