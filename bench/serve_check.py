# SPDX-License-Identifier: Apache-2.0
"""Serve a model with stock SGLang and with ``--kv-compressor mosaic`` in turn and check the answers (GPU machine).

For every configuration (``dense`` = stock SGLang; ``mosaic-r<R>`` = ``--kv-compressor mosaic
--mosaic-compression-ratio R``; a ``-b0`` suffix sets ``--mosaic-decode-read-budget 0``, i.e. read every segment;
``-sc0`` sets ``--mosaic-sidecar off`` and ``-rs0`` ``--mosaic-resegment off``, so ``mosaic-r3`` against
``mosaic-r3-rs0`` compares re-segmentation on and off at equal bytes) the script starts
``python -m sglang.launch_server``, waits for it, then runs:

* ``/v1/completions``: RULER-style needle prompts (:mod:`bench.ruler`, completion style) at the given lengths plus
  short plain prompts, greedy, ``--max-tokens`` tokens each; exact match of the needle;
* ``/v1/chat/completions``: one chat question;
* an SGLang frontend program with ``fork``, ``gen`` and ``select`` (``sglang.RuntimeEndpoint``);
* a prefix-reuse probe: the same long context sent twice with different questions (the second hits the radix
  cache: ``cached_tokens`` is read from the response), then ``/flush_cache``;
* ``/get_server_info``: ``max_total_num_tokens`` (KV capacity in tokens).

It writes ``<out>/serve_<config>.json`` and the server log ``<out>/server_<config>.log`` as it goes, and at the end
``<out>/serve_check.json`` with the comparison against ``dense``: completions equal token for token (text), needle
exact-match counts, capacity ratio.

Run ``python -m bench.serve_check --help``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Dict, List, Optional

logger = logging.getLogger("bench.serve_check")

PLAIN_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "List three primary colors:\n1.",
]
CHAT_QUESTION = "What is the boiling point of water at sea level in Celsius? Answer in one sentence."


def _post(url: str, payload: Dict[str, Any], timeout: float = 600.0) -> Dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode())


def _get(url: str, timeout: float = 30.0) -> Dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        body = resp.read().decode()
    return json.loads(body) if body.strip().startswith("{") else {"text": body}


def split_tp(name: str) -> "tuple[str, int]":
    """``("mosaic-r3", 2)`` for ``mosaic-r3-tp2``; a name without a ``-tp<N>`` suffix runs at TP 1."""
    base, sep, tp = name.rpartition("-tp")
    if sep and tp.isdigit() and int(tp) >= 1:
        return base, int(tp)
    return name, 1


# Stock attention backends a ``dense-<backend>`` configuration may name (stock against stock: the rounding noise of
# two kernels, the floor under "equal to dense").
STOCK_BACKENDS = ("flashinfer", "triton", "torch_native", "fa3")


def config_flags(name: str, dense_backend: str = "flashinfer") -> List[str]:
    """Server flags of a configuration name (``dense``, ``dense-<backend>``, ``fp8``,
    ``mosaic-r<ratio>[-b<tokens>][-h<tokens>][-sc0][-rs0][-cg][-ov]``, each with an optional ``-tp<N>`` suffix for
    ``--tp-size N``); ``sc0`` turns the sidecar off, ``rs0`` re-segmentation, ``cg`` turns decode CUDA graphs on
    (``--mosaic-cuda-graph on``), ``ov`` the overlap scheduler (``--mosaic-overlap-schedule on``); stock
    configurations use ``dense_backend``, ``dense-<backend>`` one of :data:`STOCK_BACKENDS` (compared against
    ``dense`` like any other)."""
    base, tp = split_tp(name)
    flags = ["--tp-size", str(tp)] if tp > 1 else []
    if base == "dense":
        return flags + ["--attention-backend", dense_backend]
    if base.startswith("dense-") and base[len("dense-") :] in STOCK_BACKENDS:
        return flags + ["--attention-backend", base[len("dense-") :]]
    if base == "fp8":
        return flags + ["--attention-backend", dense_backend, "--kv-cache-dtype", "fp8_e4m3"]
    if base.startswith("mosaic-r"):
        parts = base[len("mosaic-r") :].split("-")
        flags += ["--kv-compressor", "mosaic", "--mosaic-compression-ratio", parts[0]]
        for extra in parts[1:]:
            if extra == "sc0":
                flags += ["--mosaic-sidecar", "off"]
            elif extra == "rs0":
                flags += ["--mosaic-resegment", "off"]
            elif extra == "cg":
                flags += ["--mosaic-cuda-graph", "on"]
            elif extra == "ov":
                flags += ["--mosaic-overlap-schedule", "on"]
            elif extra.startswith("b"):
                flags += ["--mosaic-decode-read-budget", extra[1:]]
            elif extra.startswith("h"):
                flags += ["--mosaic-hot-window", extra[1:]]
            else:
                raise ValueError(f"config: unknown suffix {extra!r} in {name!r} (expected b<tokens>, h<tokens>, sc0, "
                                 "rs0, cg, ov or tp<N>)")  # fmt: skip
        return flags
    raise ValueError(f"config: expected dense, fp8 or mosaic-r<ratio>[-b<tokens>][-h<tokens>][-sc0][-rs0][-cg][-ov] "
                     f"with an optional -tp<N>, or dense-<{'|'.join(STOCK_BACKENDS)}>, got {name!r}")  # fmt: skip


class Server:
    """One ``sglang.launch_server`` process with its log file."""

    def __init__(self, model: str, port: int, flags: List[str], log_path: Path, extra: List[str],
                 module: str = "sglang.launch_server") -> None:  # fmt: skip
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", module, "--model-path", model, "--port", str(port),
               "--host", "127.0.0.1", *extra, *flags]  # fmt: skip
        logger.info("starting: %s", " ".join(cmd))
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.cmd = cmd

    @classmethod
    def from_args(cls, args: List[str], log_path: Path, default_port: int = 30000,
                  module: str = "sglang.launch_server") -> "Server":  # fmt: skip
        """A server from one whole ``launch_server`` argument list (``--model-path`` required, ``--port`` defaulting
        to ``default_port``; both in ``--flag value`` or ``--flag=value`` form); the rest is passed on as given."""
        rest: List[str] = []
        found: Dict[str, str] = {}
        i = 0
        while i < len(args):
            name, eq, value = args[i].partition("=")
            if name in ("--model-path", "--model", "--port"):
                if not eq:
                    if i + 1 >= len(args):
                        raise ValueError(f"{name}: expected a value, got the end of the arguments")
                    value, i = args[i + 1], i + 1
                found["--port" if name == "--port" else "--model-path"] = value
            else:
                rest.append(args[i])
            i += 1
        if "--model-path" not in found:
            raise ValueError(f"--model-path: expected it among the server arguments, got {' '.join(args)!r}")
        port = found.get("--port", str(default_port))
        if not port.isdigit():
            raise ValueError(f"--port: expected a port number, got {port!r}")
        return cls(found["--model-path"], int(port), [], log_path, rest, module)

    def wait_ready(self, timeout: float) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before it was ready (see its log)")
            try:
                _get(self.url + "/health", timeout=10)
                _post(self.url + "/v1/completions", {"model": "default", "prompt": "Hello", "max_tokens": 4,
                                                     "temperature": 0.0}, timeout=300)  # fmt: skip
                logger.info("server ready after %.0f s", time.time() - t0)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(2)
        raise RuntimeError(f"server not ready after {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def _completion(url: str, prompt: str, max_tokens: int) -> Dict[str, Any]:
    r = _post(url + "/v1/completions",
              {"model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0})  # fmt: skip
    return {"text": r["choices"][0]["text"], "usage": r.get("usage", {})}


def _frontend_program(url: str) -> Dict[str, Any]:
    import sglang as sgl

    @sgl.function
    def tips(s, topic):
        s += "Here are two short tips about " + topic + ".\n"
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += f"Tip {i + 1}:" + sgl.gen("tip", max_tokens=24, stop="\n", temperature=0.0)
        s += "Tip 1:" + forks[0]["tip"] + "\nTip 2:" + forks[1]["tip"] + "\n"
        s += "Is this advice useful? Answer: " + sgl.select("verdict", choices=["yes", "no"])

    backend = sgl.RuntimeEndpoint(url)
    state = tips.run(topic="staying healthy", backend=backend)
    return {"text": state.text(), "verdict": state["verdict"]}


def probe(url: str, samples: List[Any], max_tokens: int) -> Dict[str, Any]:
    """Every check against one running server; each failure is recorded, not raised."""
    out: Dict[str, Any] = {"completions": [], "errors": []}
    try:
        out["server_info"] = {k: v for k, v in _get(url + "/get_server_info").items()
                              if k in ("max_total_num_tokens", "max_running_requests", "page_size",
                                       "attention_backend", "kv_cache_dtype", "version")}  # fmt: skip
    except Exception as err:  # noqa: BLE001 - recorded for the report
        out["errors"].append(f"get_server_info: {err!r}")
    for sm in samples:
        try:
            t0 = time.time()
            r = _completion(url, sm.prompt, max_tokens)
            out["completions"].append({"task": sm.task, "target_tokens": sm.target_tokens, "answer": sm.answer,
                                       "text": r["text"], "correct": sm.exact_match(r["text"]),
                                       "prompt_tokens": r["usage"].get("prompt_tokens"),
                                       "seconds": round(time.time() - t0, 3)})  # fmt: skip
        except Exception as err:  # noqa: BLE001
            out["errors"].append(f"completion {sm.task}@{sm.target_tokens}: {err!r}")
    for p in PLAIN_PROMPTS:
        try:
            out["completions"].append({"task": "plain", "prompt": p, "text": _completion(url, p, max_tokens)["text"]})
        except Exception as err:  # noqa: BLE001
            out["errors"].append(f"completion plain: {err!r}")
    try:
        r = _post(url + "/v1/chat/completions", {"model": "default", "max_tokens": 48, "temperature": 0.0,
                                                 "messages": [{"role": "user", "content": CHAT_QUESTION}]})
        out["chat"] = r["choices"][0]["message"]["content"]
    except Exception as err:  # noqa: BLE001
        out["errors"].append(f"chat: {err!r}")
    try:
        out["frontend"] = _frontend_program(url)
    except Exception as err:  # noqa: BLE001
        out["errors"].append(f"frontend: {err!r}")
    if samples:
        try:
            ctx = samples[-1].context
            first = _post(url + "/v1/completions", {"model": "default", "prompt": ctx + "\n\nQuestion: What is the"
                          " first word of this text?\nAnswer:", "max_tokens": 8, "temperature": 0.0})
            second = _post(url + "/v1/completions", {"model": "default", "prompt": samples[-1].prompt,
                           "max_tokens": max_tokens, "temperature": 0.0})
            out["prefix_reuse"] = {
                "first_cached": (first.get("usage", {}).get("prompt_tokens_details") or {}).get("cached_tokens"),
                "second_cached": (second.get("usage", {}).get("prompt_tokens_details") or {}).get("cached_tokens"),
                "second_text": second["choices"][0]["text"],
                "second_correct": samples[-1].exact_match(second["choices"][0]["text"]),
            }
            flush = urllib.request.urlopen(urllib.request.Request(url + "/flush_cache", method="POST"), timeout=60)
            out["prefix_reuse"]["flush_status"] = flush.status
            again = _completion(url, samples[0].prompt, max_tokens)
            out["prefix_reuse"]["after_flush_correct"] = samples[0].exact_match(again["text"])
        except Exception as err:  # noqa: BLE001
            out["errors"].append(f"prefix_reuse: {err!r}")
    return out


def _equal_rows(base: Dict[str, Any], res: Dict[str, Any]) -> Dict[str, Any]:
    pairs = list(zip(base.get("completions", []), res.get("completions", [])))
    return {"equal": sum(a["text"] == b["text"] for a, b in pairs), "compared": len(pairs),
            "chat_equal": res.get("chat") == base.get("chat"),
            "frontend_equal": res.get("frontend") == base.get("frontend")}  # fmt: skip


def compare(results: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Each configuration against the stock server at the same TP size (``dense`` or ``dense-tp<N>``): completions
    equal, needle accuracy, capacity ratio; a ``-tp<N>`` configuration also against itself at TP 1."""
    summary: Dict[str, Any] = {}
    for name, res in results.items():
        comps = res.get("completions", [])
        needles = [c for c in comps if c["task"] != "plain"]
        row: Dict[str, Any] = {
            "needle_correct": sum(c["correct"] for c in needles), "needles": len(needles),
            "errors": len(res.get("errors", [])),
            "capacity_tokens": res.get("server_info", {}).get("max_total_num_tokens"),
        }  # fmt: skip
        base_name, tp = split_tp(name)
        dense_name = "dense" if tp == 1 else f"dense-tp{tp}"
        base = results.get(dense_name)
        if base is not None and name != dense_name:
            eq = _equal_rows(base, res)
            row.update(equal_to_dense=eq["equal"], compared=eq["compared"], chat_equal=eq["chat_equal"],
                       frontend_equal=eq["frontend_equal"])  # fmt: skip
            cap, cap0 = row["capacity_tokens"], base.get("server_info", {}).get("max_total_num_tokens")
            row["capacity_vs_dense"] = round(cap / cap0, 3) if cap and cap0 else None
        if tp > 1 and base_name in results:
            eq = _equal_rows(results[base_name], res)
            row.update(equal_to_tp1=eq["equal"], chat_equal_to_tp1=eq["chat_equal"],
                       frontend_equal_to_tp1=eq["frontend_equal"])  # fmt: skip
        summary[name] = row
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="model path (a Hugging Face checkpoint directory); required unless --merge")
    ap.add_argument("--configs", nargs="+", default=["dense", "mosaic-r1-b0", "mosaic-r3"],
                    help="configurations in order: dense, dense-<stock backend> (stock with another attention "
                         "backend, compared against dense), fp8, mosaic-r<ratio>[-b<read budget>][-h<hot window>]"
                         "[-sc0 (sidecar off)][-rs0 (re-segmentation off)][-cg (decode CUDA graphs)][-ov (overlap "
                         "scheduler)], each with an optional -tp<N> (--tp-size N)")
    ap.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 7680], help="needle prompt lengths")
    ap.add_argument("--tasks", nargs="+", default=["niah_single", "niah_multikey"], help="bench.ruler tasks")
    ap.add_argument("--samples", type=int, default=2, help="samples per task and length")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--ready-timeout", type=float, default=420.0)
    ap.add_argument("--server-args", default="", help="extra flags for every server, one string")
    ap.add_argument("--dense-backend", default="flashinfer", help="attention backend of dense and fp8 (default: "
                    "flashinfer; the GPU bundle has no FA3)")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="DIR",
                    help="start no server: compare the serve_<config>.json of earlier runs (e.g. ones run side by side "
                         "on separate GPUs) and write <out>/serve_check.json")  # fmt: skip
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        return _write_summary(args.out, load_results(args.merge))
    if not args.model:
        ap.error("--model is required unless --merge is given")
    for name in args.configs:
        config_flags(name)  # fail early on a bad name

    from transformers import AutoTokenizer

    from bench import ruler

    tok = AutoTokenizer.from_pretrained(args.model)
    count = lambda s: len(tok(s).input_ids)  # noqa: E731
    samples = [ruler.generate(t, target_tokens=n, seed=0, index=i, count_tokens=count)
               for n in args.lengths for t in args.tasks for i in range(args.samples)]  # fmt: skip
    results: Dict[str, Dict[str, Any]] = {}
    for name in args.configs:
        extra = args.server_args.split()
        if "--enable-cache-report" not in extra:  # cached_tokens in the radix-reuse probe's responses
            extra.append("--enable-cache-report")
        server = Server(args.model, args.port, config_flags(name, args.dense_backend), args.out / f"server_{name}.log",
                        extra)  # fmt: skip
        res: Dict[str, Any] = {"config": name, "command": " ".join(server.cmd)}
        t0 = time.time()
        try:
            server.wait_ready(args.ready_timeout)
            res["startup_seconds"] = round(time.time() - t0, 1)
            res.update(probe(server.url, samples, args.max_tokens))
        except Exception as err:  # noqa: BLE001
            res.setdefault("errors", []).append(f"server: {err!r}")
            logger.error("%s: %s", name, err)
        finally:
            server.stop()
        results[name] = res
        (args.out / f"serve_{name}.json").write_text(json.dumps(res, indent=1))
        logger.info("%s: %s", name, json.dumps(compare({name: res})[name]))
    return _write_summary(args.out, results)


def load_results(dirs: List[Path]) -> Dict[str, Dict[str, Any]]:
    """The ``serve_<config>.json`` files of ``dirs`` by configuration name (a later directory wins)."""
    results: Dict[str, Dict[str, Any]] = {}
    for d in dirs:
        files = sorted(f for f in d.glob("serve_*.json") if f.name != "serve_check.json")
        if not files:
            raise FileNotFoundError(f"--merge: expected serve_<config>.json files in {d}, found none")
        for f in files:
            res = json.loads(f.read_text())
            results[res.get("config", f.stem[len("serve_") :])] = res
    return results


def _write_summary(out: Path, results: Dict[str, Dict[str, Any]]) -> int:
    summary = compare(results)
    (out / "serve_check.json").write_text(json.dumps({"summary": summary, "results": results}, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
