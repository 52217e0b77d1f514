# SPDX-License-Identifier: Apache-2.0
"""Test helpers for :mod:`bench.serving_throughput` (never a source of serving numbers).

``python -m throughput_fake_sglang`` stands in for ``sglang.launch_server``: it takes ``--model-path``, ``--port``,
``--host`` and ignores other flags except ``--kv-compressor``, ``--mosaic-compression-ratio`` and ``--kv-cache-dtype``,
from which it reports a KV capacity (:func:`capacity`) on ``GET /get_server_info`` (with ``max_req_input_len`` one
below ``--context-length`` when that is given); it answers ``/health`` and
``/v1/completions`` (the readiness check) and counts ``POST /flush_cache``; ``GET /metrics`` gives SGLang's
request-time metrics of the requests the fake bench reported (``POST /fake_served``); for the real bench_serving it also answers
``/v1/models``, ``/server_info`` and a streamed ``POST /generate`` (one character per token, ``completion_tokens``
counted up to ``max_new_tokens``, 1 ms a token). ``--fake-exit-after-info N`` makes it
exit (status 3) right after answering its N-th ``/get_server_info``, like a crash mid-sweep.

``python -m throughput_fake_bench`` (:func:`bench_main`) stands in for ``sglang.benchmark.serving``: it parses the
flags the script may pass with SGLang 0.5.17's names and defaults (and refuses others, exit status 2), asks the
server for ``/get_server_info`` (so it fails against a wrong port or a dead server), flushes with ``--flush-cache``,
and appends one result line shaped like bench_serving's to ``--output-file``, with throughput and TPOT a fixed
function of the request (:func:`fake_metrics`), which it also reports to the server's ``/metrics``. Environment: ``FAKE_BENCH_SLEEP`` seconds per run;
``FAKE_BENCH_SLOW=C:S`` sleeps S seconds at ``--max-concurrency C``; ``FAKE_BENCH_CALLS`` names a file that gets
each run's argument list as a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.request
from typing import Any, Dict, List, Optional

from mkv_http_fake import LocalServer, QuietHandler


def capacity(ratio: float, fp8: bool) -> int:
    """The fake's ``max_total_num_tokens``: 100,000 tokens at ratio 1, twice that with fp8."""
    return int(100_000 * ratio * (2 if fp8 else 1))


def fake_metrics(ratio: float, input_len: int, output_len: int, batch: int) -> Dict[str, float]:
    """TPOT grows with the context and the batch, more slowly for a compressed cache; throughput follows."""
    tpot = 5.0 + input_len * batch / (1000.0 * ratio)
    return {"median_tpot_ms": tpot, "p99_tpot_ms": 1.5 * tpot, "median_itl_ms": tpot, "p99_itl_ms": 2 * tpot,
            "output_throughput": batch * 1000.0 / tpot, "mean_ttft_ms": 0.01 * input_len}  # fmt: skip


class FakeServer(LocalServer):
    def __init__(self, port: int, ratio: float, fp8: bool, exit_after_info: int) -> None:
        self.server = None
        self.info = {"max_total_num_tokens": capacity(ratio, fp8), "kv_compressor": "mosaic" if ratio > 1 else None,
                     "mosaic_compression_ratio": ratio, "version": "fake", "internal_states": [{}]}  # fmt: skip
        self.flushes = 0
        self.infos = 0
        self.served = {"requests": 0, "e2e": 0.0, "ttft": 0.0, "tokens": 0}  # for /metrics
        state = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                if path == "/health":
                    self._send(200, "")
                elif path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
                elif path == "/server_info":
                    self._send(200, state.info)
                elif path == "/metrics":
                    self._send(200, state.metrics())
                elif path == "/get_server_info":
                    state.infos += 1
                    self._send(200, state.info)
                    if exit_after_info and state.infos >= exit_after_info:
                        self.wfile.flush()
                        os._exit(3)
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b"{}"
                path = self.path.split("?")[0]
                if path == "/generate":
                    self._generate(json.loads(raw))
                elif path == "/fake_served":  # the fake bench's requests, for /metrics
                    done = json.loads(raw)
                    for key in state.served:
                        state.served[key] += done[key]
                    self._send(200, "")
                elif path == "/flush_cache":
                    state.flushes += 1
                    self._send(200, "Cache flushed.\n")
                elif path == "/v1/completions":
                    self._send(200, {"choices": [{"index": 0, "text": " fake", "finish_reason": "length"}]})
                else:
                    self._send(404, {"detail": "Not Found"})

            def _generate(self, body: Dict[str, Any]) -> None:
                prompt = body.get("input_ids") or body.get("text") or ""
                max_new = int((body.get("sampling_params") or {}).get("max_new_tokens", 16))
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for k in range(1, max_new + 1):
                    chunk = {"text": "x" * k, "meta_info": {"id": "fake", "prompt_tokens": len(prompt),
                                                            "completion_tokens": k}}  # fmt: skip
                    self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                    self.wfile.flush()
                    time.sleep(0.001)
                self.wfile.write(b"data: [DONE]\n\n")

        self._serve(Handler, port)

    def metrics(self) -> str:
        """SGLang's request-time metrics of the fake bench's requests, in two label sets as SGLang splits them."""
        s, lines = self.served, []
        for name, value in (("e2e_request_latency_seconds_sum", s["e2e"]),
                            ("e2e_request_latency_seconds_count", s["requests"]),
                            ("time_to_first_token_seconds_sum", s["ttft"]), ("generation_tokens_total", s["tokens"])):
            lines.append(f"# TYPE sglang:{name} untyped")
            lines += [f'sglang:{name}{{is_streaming="{st}",model_name="fake"}} {value / 2}' for st in ("false", "true")]
        return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-path")
    ap.add_argument("--host")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--kv-compressor")
    ap.add_argument("--mosaic-compression-ratio", type=float, default=1.0)
    ap.add_argument("--kv-cache-dtype")
    ap.add_argument("--context-length", type=int, default=0)
    ap.add_argument("--fake-exit-after-info", type=int, default=0)
    args, _ = ap.parse_known_args()
    ratio = args.mosaic_compression_ratio if args.kv_compressor == "mosaic" else 1.0
    fake = FakeServer(args.port, ratio, bool(args.kv_cache_dtype and "fp8" in args.kv_cache_dtype),
                      args.fake_exit_after_info)  # fmt: skip
    if args.context_length:
        fake.info["max_req_input_len"] = args.context_length - 1
    print(f"fake SGLang serving at {fake.url}", flush=True)
    threading.Event().wait()


def _bench_parser() -> argparse.ArgumentParser:
    """The subset of SGLang 0.5.17 bench_serving's flags that the script and the tests use, with its defaults."""
    ap = argparse.ArgumentParser(prog="fake bench_serving")
    ap.add_argument("--backend", default="sglang", choices=["sglang"])
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int)
    ap.add_argument("--model")
    ap.add_argument("--tokenizer")
    ap.add_argument("--output-file")
    ap.add_argument("--dataset-name", default="sharegpt", choices=["random", "random-ids", "generated-shared-prefix"])
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--random-input-len", type=int, default=1024)
    ap.add_argument("--random-output-len", type=int, default=1024)
    ap.add_argument("--random-range-ratio", type=float, default=0.0)
    ap.add_argument("--request-rate", type=float, default=float("inf"))
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--tokenize-prompt", action="store_true")
    ap.add_argument("--flush-cache", action="store_true")
    ap.add_argument("--disable-tqdm", action="store_true")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--extra-request-body", type=json.loads, default=None)
    ap.add_argument("--gsp-num-groups", type=int, default=64)
    ap.add_argument("--gsp-prompts-per-group", type=int, default=16)
    ap.add_argument("--gsp-system-prompt-len", type=int, default=2048)
    ap.add_argument("--gsp-question-len", type=int, default=128)
    ap.add_argument("--gsp-output-len", type=int, default=256)
    return ap


def bench_main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _bench_parser().parse_args(argv)
    calls = os.environ.get("FAKE_BENCH_CALLS")
    if calls:
        with open(calls, "a") as f:
            f.write(json.dumps(argv) + "\n")
    base = f"http://{args.host}:{args.port}"
    with urllib.request.urlopen(base + "/get_server_info", timeout=10) as resp:
        info: Dict[str, Any] = json.loads(resp.read())
    if args.flush_cache:
        urllib.request.urlopen(urllib.request.Request(base + "/flush_cache", method="POST"), timeout=10).close()
    if args.dataset_name == "generated-shared-prefix":
        requests = args.gsp_num_groups * args.gsp_prompts_per_group
        input_len, output_len = args.gsp_system_prompt_len + args.gsp_question_len, args.gsp_output_len
    else:
        requests, input_len, output_len = args.num_prompts, args.random_input_len, args.random_output_len
    batch = min(args.max_concurrency or requests, requests)
    slow = os.environ.get("FAKE_BENCH_SLOW", "")
    if slow and int(slow.split(":")[0]) == args.max_concurrency:
        time.sleep(float(slow.split(":")[1]))
    time.sleep(float(os.environ.get("FAKE_BENCH_SLEEP", "0")))
    ratio = float(info.get("mosaic_compression_ratio") or 1.0)
    m = fake_metrics(ratio, input_len, output_len, batch)
    served = {"requests": requests, "ttft": requests * m["mean_ttft_ms"] / 1000, "tokens": requests * output_len,
              "e2e": requests * (m["mean_ttft_ms"] + (output_len - 1) * m["median_tpot_ms"]) / 1000}
    urllib.request.urlopen(urllib.request.Request(base + "/fake_served", data=json.dumps(served).encode(),
                                                  method="POST"), timeout=10).close()  # fmt: skip
    line = {"tag": None, "backend": args.backend, "dataset_name": args.dataset_name, "request_rate": args.request_rate,
            "max_concurrency": args.max_concurrency, "random_input_len": args.random_input_len,
            "random_output_len": args.random_output_len, "random_range_ratio": args.random_range_ratio,
            "server_info": info, "duration": 1.0, "completed": requests, "total_input_tokens": requests * input_len,
            "total_output_tokens": requests * output_len, "request_throughput": float(requests),
            "input_throughput": float(requests * input_len), "total_throughput": 0.0,
            "median_ttft_ms": m["mean_ttft_ms"], "mean_tpot_ms": m["median_tpot_ms"], "mean_itl_ms": m["median_itl_ms"],
            "concurrency": float(batch), "max_concurrent_requests": batch, **m}  # fmt: skip
    with open(args.output_file, "a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"fake bench_serving: {requests} requests at concurrency {batch}", flush=True)
    return 0


if __name__ == "__main__":
    main()
