# SPDX-License-Identifier: Apache-2.0
"""Serving sweeps of stock SGLang, fp8 KV and MosaicKV: throughput over concurrency, TPOT over context (GPU machine).

For every configuration (names as in :mod:`bench.serve_check`: ``dense``, ``fp8``, ``mosaic-r<ratio>...``, each with
an optional ``-tp<N>``) the script starts ``python -m sglang.launch_server`` once, with the same model and extra
flags, waits for it, reads the KV capacity (``max_total_num_tokens``) from ``/get_server_info``, runs one
``python -m sglang.benchmark.serving --backend sglang`` per point of the sweep against it (``sglang.bench_serving``
is that module's deprecated alias in SGLang 0.5.17; ``--bench-module`` picks another), then stops it:

* throughput over concurrency: for each workload (``--workload NAME='bench_serving dataset flags'``, repeatable, so
  a ``random-ids`` and a ``generated-shared-prefix`` workload run against the same server) and each
  ``--concurrency`` C, a run with the workload's flags plus ``--max-concurrency C --num-prompts N``, where
  N = max(C x ``--prompts-per-slot``, ``--min-prompts``) unless the workload fixes ``--num-prompts``. A
  ``generated-shared-prefix`` workload always sends ``--gsp-num-groups`` x ``--gsp-prompts-per-group`` requests
  (bench_serving ignores ``--num-prompts`` there), so the sweep adds none and records that count. Without
  ``--concurrency`` each workload runs once, as given (``--bench-args`` is the older spelling of one workload).
* TPOT over context (``--context-lengths``): for each length L and batch B (``--context-batch``, default 1 and 16),
  B requests of exactly L prompt tokens (``--dataset-name random-ids --random-input-len L --random-range-ratio 1.0
  --tokenize-prompt``) and ``--context-output-len`` output tokens, all sent at once (``--request-rate inf
  --max-concurrency B --num-prompts B``, special tokens kept in the streamed text); median and p99 TPOT and ITL are
  recorded, and with the server's ``--enable-metrics`` its own mean TTFT and TPOT over the point (``server_mean_*``,
  from ``/metrics`` before and after; counted in tokens, so right also where bench_serving sees no text; the summary
  and the figure prefer it). At B > 1 a request's time after its first token includes the prefill chunks of the
  requests admitted after it. bench_serving at a fixed concurrency is used rather than ``sglang.bench_one_batch``
  because it measures TPOT through the same server that users run (scheduler, batching, CUDA graphs or not, and the
  plugin's hooks and sidecar), not a bare model runner.

Every run flushes the radix cache after bench_serving's warm-up request (``--flush-cache``; ``--no-flush-cache``
keeps it), so no point reuses the prompts of another, and disables tqdm (``--disable-tqdm``).

Time budget: with ``--budget-seconds`` each configuration gets an equal share of what is left of the budget (less
``--budget-reserve`` for stopping the last server) when it starts, so a cut run still has every configuration at its
first points; time a configuration leaves unused passes to the next. A point starts only while at least
``--min-point-seconds`` of the share remain, and its timeout (``--point-timeout``) is capped at the end of the share;
points not started are recorded as ``{"skipped": "budget"}``. A point that fails or times out is recorded with its
``error`` and the sweep goes on; if the server exits, the configuration's remaining points are skipped. A context
point longer than the server's ``max_req_input_len`` is skipped without a run.

``--merge DIR...`` starts nothing: it joins the results of runs made apart (one configuration per GPU, or per
time-limited device call) into one ``<out>/throughput.json`` and recomputes the ratios.

Output, rewritten after every point (``<out>/throughput.json``, schema ``mosaickv.serving_throughput/2``; read by
:mod:`bench.figures`)::

    {"schema": "mosaickv.serving_throughput/2", "model", "command", "settings": {...},
     "budget": {"seconds", "spent_seconds", "cut"},
     "configs": {NAME: {"config", "server_command", "startup_seconds", "max_total_num_tokens", "server_info",
                        "error"?, "points": [{"workload", "kind": "concurrency" | "context", "max_concurrency",
                        "num_prompts", "context_length"?, "output_len"?, "bench_args", "seconds",
                        "output_throughput", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms",
                        "mean_ttft_ms", ..., "server_requests"?, "server_mean_ttft_ms"?, "server_mean_tpot_ms"?,
                        "tpot_note"? | "error" | "skipped"}]}},
     "summary": {"capacity_vs_dense": {NAME: x}, "throughput_vs_dense": [{config, workload, max_concurrency,
                 output_throughput, dense_output_throughput, output_throughput_vs_dense}],
                 "tpot_vs_dense": [{config, context_length, batch, median_tpot_ms?, dense_median_tpot_ms?,
                 median_tpot_vs_dense?, server_mean_tpot_ms?, dense_server_mean_tpot_ms?,
                 server_mean_tpot_vs_dense?}]}}

Ratios are against the stock configuration of the same tensor parallelism (``dense`` or ``dense-tp<N>``) at the same
workload and concurrency (or context length and batch). Per point, bench_serving's own result line and log stay
in ``<out>/points/<config>/<point>.json`` and ``.log``; each server's log in ``<out>/server_<config>.log``.

Run ``python -m bench.serving_throughput --help``. Example (the 8B shape with dummy weights, 2 hours at most)::

    python -m bench.serving_throughput --model $MKV_MODELS/llama-3.1-8b-shape --configs dense mosaic-r3 \\
        --server-args "--load-format dummy --mem-fraction-static 0.8 --context-length 40000" \\
        --workload random='--dataset-name random-ids --random-input-len 8000 --random-output-len 256
                           --random-range-ratio 1.0' \\
        --workload shared='--dataset-name generated-shared-prefix --gsp-num-groups 8 --gsp-prompts-per-group 8
                           --gsp-system-prompt-len 4096 --gsp-question-len 128 --gsp-output-len 128' \\
        --concurrency 1 8 32 128 --context-lengths 4096 16384 32768 --budget-seconds 7200 --out $OUT/tput
    python -m bench.figures --throughput $OUT/tput/throughput.json --only throughput tpot capacity --out $OUT/figs
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from prometheus_client.parser import text_string_to_metric_families

from bench.serve_check import Server, _get, config_flags, split_tp

logger = logging.getLogger("bench.serving_throughput")

SCHEMA = "mosaickv.serving_throughput/2"
BENCH_MODULE = "sglang.benchmark.serving"
GSP = "generated-shared-prefix"
GSP_DEFAULT_REQUESTS = (64, 16)  # bench_serving 0.5.17's --gsp-num-groups, --gsp-prompts-per-group defaults
BENCH_DEFAULT_PROMPTS = 1000  # bench_serving 0.5.17's --num-prompts default
# Keys of bench_serving's --output-file JSON lines that a point keeps (bench_serving's "concurrency", the measured
# mean number of requests in flight, is kept as "mean_concurrency").
KEPT = ("completed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
        "input_throughput", "output_throughput", "total_throughput", "mean_e2e_latency_ms", "median_e2e_latency_ms",
        "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
        "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "concurrency", "max_concurrent_requests",
        "max_output_tokens_per_s")  # fmt: skip
RENAMED = {"concurrency": "mean_concurrency"}
# Flags the script sets on every bench_serving run; a workload may not set them.
RESERVED = ("--backend", "--base-url", "--host", "--port", "--model", "--tokenizer", "--output-file")
SERVER_INFO_KEYS = ("max_total_num_tokens", "max_req_input_len", "max_running_requests", "attention_backend",
                    "kv_cache_dtype", "cuda_graph_max_bs", "page_size", "version")  # fmt: skip


# =====================================================================================================================
# the sweep's points
# =====================================================================================================================
def flag_value(args: Sequence[str], flag: str) -> Optional[str]:
    """Value of ``flag`` in an argument list (``--flag value`` or ``--flag=value``; the last one wins), else None."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a[len(flag) + 1 :]
    return value


def has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _int_flag(args: Sequence[str], flag: str, default: int, where: str) -> int:
    text = flag_value(args, flag)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{where} {flag}: expected an integer, got {text!r}") from None


@dataclass
class Point:
    """One bench_serving run of the sweep: the workload's flags plus the sweep's."""

    workload: str
    kind: str  # "concurrency" or "context"
    args: List[str]
    max_concurrency: Optional[int]
    num_prompts: Optional[int]
    context_length: Optional[int] = None
    output_len: Optional[int] = None

    @property
    def slug(self) -> str:
        """File name stem of the point's result and log."""
        if self.kind == "context":
            return f"context-L{self.context_length}-b{self.max_concurrency}"
        return f"{self.workload}-c{self.max_concurrency}" if self.max_concurrency else self.workload

    def describe(self) -> str:
        if self.kind == "context":
            return f"context {self.context_length} tokens, batch {self.max_concurrency}"
        return f"{self.workload} at concurrency {self.max_concurrency} ({self.num_prompts} requests)"

    def record(self) -> Dict[str, Any]:
        rec: Dict[str, Any] = {"workload": self.workload, "kind": self.kind, "max_concurrency": self.max_concurrency,
                               "num_prompts": self.num_prompts}  # fmt: skip
        if self.kind == "context":
            rec.update(context_length=self.context_length, output_len=self.output_len)
        rec["bench_args"] = shlex.join(self.args)
        return rec


def parse_workload(text: str) -> Tuple[str, List[str]]:
    """``("random", [flags])`` of ``random='--dataset-name random-ids ...'``."""
    name, sep, rest = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not rest.strip():
        raise argparse.ArgumentTypeError(f"expected NAME='bench_serving dataset flags' (NAME of letters, digits, "
                                         f"'_', '-', '.'), got {text!r}")  # fmt: skip
    return name, shlex.split(rest)


def workload_points(name: str, args: List[str], concurrency: Sequence[int], prompts_per_slot: int,
                    min_prompts: int) -> List[Point]:  # fmt: skip
    """The points of one workload: one per concurrency (see the module docstring), or the workload as given."""
    where = f"--workload {name}:"
    for flag in RESERVED:
        if has_flag(args, flag):
            raise ValueError(f"{where} expected no {flag} (the script sets it), got {shlex.join(args)!r}")
    fixed = _int_flag(args, "--num-prompts", 0, where) or None
    if flag_value(args, "--dataset-name") == GSP:
        requests: Optional[int] = (_int_flag(args, "--gsp-num-groups", GSP_DEFAULT_REQUESTS[0], where)
                                   * _int_flag(args, "--gsp-prompts-per-group", GSP_DEFAULT_REQUESTS[1], where))
    else:
        requests = fixed
    if not concurrency:
        conc = _int_flag(args, "--max-concurrency", 0, where) or None
        return [Point(name, "concurrency", list(args), conc, requests or BENCH_DEFAULT_PROMPTS)]
    if has_flag(args, "--max-concurrency"):
        raise ValueError(f"{where} expected no --max-concurrency with --concurrency (the sweep sets it), got "
                         f"{shlex.join(args)!r}")  # fmt: skip
    points = []
    for c in concurrency:
        if requests is not None:
            n, extra = requests, []
        else:
            n = max(c * prompts_per_slot, min_prompts)
            extra = ["--num-prompts", str(n)]
        points.append(Point(name, "concurrency", [*args, "--max-concurrency", str(c), *extra], c, n))
    return points


def context_points(lengths: Sequence[int], batches: Sequence[int], output_len: int) -> List[Point]:
    """TPOT over context: B requests of exactly L prompt tokens, all at once, for each B and L: the small batches first,
    so a time budget cuts the costliest points (the largest batch at the longest context), not the single requests.

    The requests keep special tokens in their text (``skip_special_tokens`` false): bench_serving counts a token only
    when its streamed text grows, and a model with dummy weights can emit special tokens only (the eleventh run's 32k
    points: no first token seen, so bench_serving's TPOT held the prefill)."""
    body = json.dumps({"sampling_params": {"temperature": 0.0, "max_new_tokens": output_len, "ignore_eos": True,
                                           "skip_special_tokens": False}})  # fmt: skip
    return [Point("context", "context", ["--dataset-name", "random-ids", "--random-input-len", str(n),
                                         "--random-output-len", str(output_len), "--random-range-ratio", "1.0",
                                         "--tokenize-prompt", "--request-rate", "inf", "--max-concurrency", str(b),
                                         "--num-prompts", str(b), "--extra-request-body", body],
                  b, b, n, output_len)
            for b in batches for n in lengths]  # fmt: skip


# SGLang's request-time metrics (with --enable-metrics), summed over their label sets
REQUEST_TIME_METRICS = ("sglang:e2e_request_latency_seconds_sum", "sglang:e2e_request_latency_seconds_count",
                        "sglang:time_to_first_token_seconds_sum", "sglang:generation_tokens_total")


def request_times(url: str) -> Optional[Dict[str, float]]:
    """The sums of :data:`REQUEST_TIME_METRICS` on ``url``'s ``/metrics``, or None without them (no --enable-metrics,
    another server)."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
            text = resp.read().decode()
    except (OSError, ValueError):
        return None
    sums = dict.fromkeys(REQUEST_TIME_METRICS, 0.0)
    seen = set()
    for family in text_string_to_metric_families(text):  # as bench.decode_steps.read_scrape reads a scrape
        for sample in family.samples:
            if sample.name in sums:
                sums[sample.name] += sample.value
                seen.add(sample.name)
    return sums if len(seen) == len(sums) else None


def server_token_times(before: Optional[Dict[str, float]], after: Optional[Dict[str, float]]) -> Dict[str, Any]:
    """Mean TTFT and TPOT of the requests served between two :func:`request_times` scrapes, as the server timed them
    (by token counts, whatever the text; bench_serving's warm-up request included): TPOT is the requests' time after
    their first token over the tokens after the first."""
    if not before or not after:
        return {}
    d = {k: after[k] - before[k] for k in REQUEST_TIME_METRICS}
    requests = round(d["sglang:e2e_request_latency_seconds_count"])
    later_tokens = d["sglang:generation_tokens_total"] - requests
    if requests <= 0 or later_tokens <= 0:
        return {}
    decode = d["sglang:e2e_request_latency_seconds_sum"] - d["sglang:time_to_first_token_seconds_sum"]
    return {"server_requests": requests,
            "server_mean_ttft_ms": round(1000.0 * d["sglang:time_to_first_token_seconds_sum"] / requests, 3),
            "server_mean_tpot_ms": round(1000.0 * decode / later_tokens, 3)}  # fmt: skip


# =====================================================================================================================
# time budget
# =====================================================================================================================
class Budget:
    """The run's time budget (``None``: unlimited), shared out between configurations as they start."""

    def __init__(self, seconds: Optional[float], reserve: float = 60.0, min_point: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.seconds, self.reserve, self.min_point, self.clock = seconds, reserve, min_point, clock
        self.t0 = clock()

    def spent(self) -> float:
        return self.clock() - self.t0

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.spent()

    def share_deadline(self, configs_left: int) -> float:
        """Clock time by which a configuration starting now is done: an equal share, among the ``configs_left``
        configurations still to run, of what is left of the budget less the reserve."""
        if self.seconds is None:
            return math.inf
        return self.clock() + max(0.0, self.left() - self.reserve) / max(1, configs_left)

    def room(self, deadline: float) -> float:
        """Seconds until ``deadline``."""
        return deadline - self.clock()

    def can_start(self, deadline: float) -> bool:
        """Whether a point (or a server start) may begin: at least ``min_point`` seconds before ``deadline``."""
        return self.room(deadline) >= self.min_point


# =====================================================================================================================
# running
# =====================================================================================================================
def run_bench(module: str, url: str, model: str, bench_args: List[str], result_file: Path, log_path: Path,
              timeout: float) -> Dict[str, Any]:  # fmt: skip
    """One bench_serving run (its process group killed after ``timeout`` s); the kept keys of its result line."""
    port = url.rsplit(":", 1)[1]
    cmd = [sys.executable, "-m", module, "--backend", "sglang", "--host", "127.0.0.1", "--port", port,
           "--model", model, "--tokenizer", model, "--output-file", str(result_file), *bench_args]  # fmt: skip
    logger.info("bench: %s", shlex.join(cmd))
    result_file.unlink(missing_ok=True)  # bench_serving appends
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"bench_serving: expected to finish within {timeout:.0f} s, got it still running "
                               f"(killed; see {log_path.name})") from None
    if rc != 0:
        raise RuntimeError(f"bench_serving exited with {rc} (see {log_path.name})")
    lines = result_file.read_text().strip().splitlines() if result_file.exists() else []
    if not lines:
        raise RuntimeError(f"bench_serving: expected a result line in {result_file.name}, got none "
                           f"(see {log_path.name})")  # fmt: skip
    data = json.loads(lines[-1])
    return {RENAMED.get(k, k): data[k] for k in KEPT if k in data}


def server_info(url: str) -> Dict[str, Any]:
    """The capacity and serving settings of ``/get_server_info`` (top level, else the first internal state)."""
    info = _get(url + "/get_server_info")
    states = info.get("internal_states") or [{}]
    first = states[0] if isinstance(states[0], dict) else {}
    out = {}
    for k in SERVER_INFO_KEYS:
        v = info.get(k, first.get(k))
        if v is not None:
            out[k] = v
    return out


def _measured(p: Dict[str, Any], key: str) -> bool:
    return not p.get("error") and not p.get("skipped") and isinstance(p.get(key), (int, float))


def _tpot_value(p: Dict[str, Any], key: str) -> Optional[float]:
    """A context point's TPOT by one measure: the server's mean (``server_mean_tpot_ms``), or bench_serving's median
    (``median_tpot_ms``) when it saw the first token (otherwise that TPOT holds the prefill)."""
    if not _measured(p, key) or (key == "median_tpot_ms" and not p.get("median_ttft_ms")):
        return None
    return float(p[key])


def point_tpot(p: Dict[str, Any]) -> Optional[Tuple[float, str]]:
    """A context point's TPOT and its measure: the server's mean where recorded, else bench_serving's median (see
    :func:`_tpot_value`); None when neither holds."""
    for key in ("server_mean_tpot_ms", "median_tpot_ms"):
        value = _tpot_value(p, key)
        if value is not None:
            return value, key
    return None


def summarize(configs: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Each configuration against the stock one of the same TP size: capacity, output throughput at the same workload
    and concurrency, median TPOT at the same context length and batch."""
    capacity: Dict[str, float] = {}
    tput: List[Dict[str, Any]] = []
    tpot: List[Dict[str, Any]] = []
    for name, res in configs.items():
        _, tp = split_tp(name)
        dense_name = "dense" if tp == 1 else f"dense-tp{tp}"
        base = configs.get(dense_name)
        if base is None or name == dense_name:
            continue
        cap, cap0 = res.get("max_total_num_tokens"), base.get("max_total_num_tokens")
        if cap and cap0:
            capacity[name] = round(cap / cap0, 3)
        ref_tput = {(p["workload"], p["max_concurrency"], p["num_prompts"]): p for p in base.get("points", [])
                    if p["kind"] == "concurrency" and _measured(p, "output_throughput")}  # fmt: skip
        ref_tpot = {(p["context_length"], p["max_concurrency"]): p for p in base.get("points", [])
                    if p["kind"] == "context" and point_tpot(p)}  # fmt: skip
        for p in res.get("points", []):
            if p["kind"] == "concurrency" and _measured(p, "output_throughput"):
                q = ref_tput.get((p["workload"], p["max_concurrency"], p["num_prompts"]))
                if q and q["output_throughput"]:
                    tput.append({"config": name, "dense": dense_name, "workload": p["workload"],
                                 "max_concurrency": p["max_concurrency"], "output_throughput": p["output_throughput"],
                                 "dense_output_throughput": q["output_throughput"],
                                 "output_throughput_vs_dense": round(p["output_throughput"]
                                                                     / q["output_throughput"], 3)})  # fmt: skip
            elif p["kind"] == "context" and point_tpot(p):
                q = ref_tpot.get((p["context_length"], p["max_concurrency"]))
                row = {"config": name, "dense": dense_name, "context_length": p["context_length"],
                       "batch": p["max_concurrency"]}  # fmt: skip
                for key in ("median_tpot_ms", "server_mean_tpot_ms"):
                    a, b = (_tpot_value(x, key) for x in (p, q or {}))
                    if a and b:
                        row.update({key: a, f"dense_{key}": b, key.replace("_ms", "_vs_dense"): round(a / b, 3)})
                if len(row) > 4:
                    tpot.append(row)
    return {"capacity_vs_dense": capacity, "throughput_vs_dense": tput, "tpot_vs_dense": tpot}


def merge(paths: List[Path]) -> Dict[str, Any]:
    """One result from the ``throughput.json`` of several runs (e.g. one configuration per GPU or per device call):
    their configurations together (a later run's wins), the summary recomputed."""
    docs = []
    for p in paths:
        f = p / "throughput.json" if p.is_dir() else p
        if not f.is_file():
            raise FileNotFoundError(f"--merge: expected {f}, found none")
        doc = json.loads(f.read_text())
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise ValueError(f"--merge: expected schema {SCHEMA} in {f}, got "
                             f"{doc.get('schema') if isinstance(doc, dict) else type(doc).__name__!r}")  # fmt: skip
        docs.append((f, doc))
    first = docs[0][1]
    out: Dict[str, Any] = {**first, "configs": {}, "merged_from": [str(f) for f, _ in docs]}
    for f, doc in docs:
        for key in ("workloads", "concurrency", "context_lengths", "context_batch", "context_output_len"):
            if doc.get("settings", {}).get(key) != first.get("settings", {}).get(key):
                logger.warning("--merge: %s has other %s than %s", f, key, docs[0][0])
        out["configs"].update(doc["configs"])
    out["budget"] = {"seconds": None, "spent_seconds": round(sum(d.get("budget", {}).get("spent_seconds") or 0
                                                                  for _, d in docs), 1),
                     "cut": any(d.get("budget", {}).get("cut") for _, d in docs)}  # fmt: skip
    out["summary"] = summarize(out["configs"])
    return out


class Sweep:
    """The whole run: configurations in turn, one server each, every point of the sweep against it."""

    def __init__(self, args: argparse.Namespace, points: List[Point], settings: Dict[str, Any],
                 budget: Budget) -> None:  # fmt: skip
        self.args, self.points, self.budget = args, points, budget
        self.path = args.out / "throughput.json"
        self.doc: Dict[str, Any] = {"schema": SCHEMA, "model": args.model, "command": args.command,
                                    "settings": settings, "budget": {}, "configs": {}, "summary": {}}  # fmt: skip

    def save(self) -> None:
        self.doc["budget"] = {"seconds": self.budget.seconds, "reserve_seconds": self.budget.reserve,
                              "spent_seconds": round(self.budget.spent(), 1),
                              "cut": any(p.get("skipped") == "budget" for res in self.doc["configs"].values()
                                         for p in res["points"])}  # fmt: skip
        self.doc["summary"] = summarize(self.doc["configs"])
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1))
        os.replace(tmp, self.path)

    def run(self) -> Dict[str, Any]:
        configs = self.args.configs
        for k, name in enumerate(configs):
            self.run_config(name, self.budget.share_deadline(len(configs) - k))
        self.save()
        return self.doc

    def _skip_rest(self, res: Dict[str, Any], start: int, why: str) -> None:
        res["points"].extend({**p.record(), "skipped": why} for p in self.points[start:])
        if start < len(self.points):
            logger.warning("%s: %d point(s) skipped: %s", res["config"], len(self.points) - start, why)

    def run_config(self, name: str, deadline: float) -> None:
        args = self.args
        res: Dict[str, Any] = {"config": name, "points": []}
        self.doc["configs"][name] = res
        if not self.budget.can_start(deadline):
            res["skipped"] = "budget"
            self._skip_rest(res, 0, "budget")
            self.save()
            return
        cfg_dir = args.out / "points" / name
        cfg_dir.mkdir(parents=True, exist_ok=True)
        server = Server(args.model, args.port, config_flags(name, args.dense_backend), args.out / f"server_{name}.log",
                        shlex.split(args.server_args), module=args.launch_module)  # fmt: skip
        res["server_command"] = shlex.join(server.cmd)
        try:
            ready_timeout = min(args.ready_timeout, self.budget.room(deadline))
            t0 = time.time()
            try:
                server.wait_ready(ready_timeout)
            except RuntimeError as err:
                capped = " (timeout capped by the time budget)" if ready_timeout < args.ready_timeout else ""
                raise RuntimeError(f"{err}{capped}") from None
            res["startup_seconds"] = round(time.time() - t0, 1)
            try:
                res["server_info"] = server_info(server.url)
                res["max_total_num_tokens"] = res["server_info"].get("max_total_num_tokens")
            except Exception as err:  # noqa: BLE001 - recorded; the sweep does not need it
                res["server_info_error"] = repr(err)
            logger.info("%s: ready in %.0f s, KV capacity %s tokens", name, res["startup_seconds"],
                        res.get("max_total_num_tokens"))  # fmt: skip
            self.save()
            for done, point in enumerate(self.points):
                if server.proc.poll() is not None:
                    res["error"] = f"server exited with {server.proc.returncode} during the sweep (see its log)"
                    self._skip_rest(res, done, "server exited")
                    break
                if not self.budget.can_start(deadline):
                    self._skip_rest(res, done, "budget")
                    break
                limit = res.get("server_info", {}).get("max_req_input_len")
                if point.context_length and limit and point.context_length > limit:
                    res["points"].append({**point.record(), "skipped": f"longer than the server's max_req_input_len "
                                                                      f"{limit}"})  # fmt: skip
                    logger.warning("[%s %d/%d] %s: skipped, %s", name, done + 1, len(self.points), point.describe(),
                                   res["points"][-1]["skipped"])  # fmt: skip
                    continue
                res["points"].append(self.run_point(name, point, done, cfg_dir, server.url, deadline))
                self.save()
        except Exception as err:  # noqa: BLE001 - recorded for the report
            res["error"] = str(err) if isinstance(err, RuntimeError) else repr(err)
            logger.error("%s: %s", name, err)
            self._skip_rest(res, len(res["points"]), "server not ready" if "startup_seconds" not in res else "error")
        finally:
            server.stop()
        self.save()

    def run_point(self, name: str, point: Point, index: int, cfg_dir: Path, url: str,
                  deadline: float) -> Dict[str, Any]:  # fmt: skip
        args = self.args
        room = self.budget.room(deadline)
        timeout = min(args.point_timeout, room)
        left = "" if math.isinf(room) else f", {room:.0f} s of its budget share left"
        logger.info("[%s %d/%d] %s%s", name, index + 1, len(self.points), point.describe(), left)
        rec = point.record()
        extra = (["--flush-cache"] if args.flush_cache else []) + ["--disable-tqdm"]
        t0 = time.time()
        before = request_times(url) if point.kind == "context" else None
        try:
            rec.update(run_bench(args.bench_module, url, args.model, point.args + extra,
                                 cfg_dir / f"{point.slug}.json", cfg_dir / f"{point.slug}.log", timeout))
            rec.update(server_token_times(before, request_times(url) if before else None))
            if point.kind == "context" and not rec.get("median_ttft_ms"):
                rec["tpot_note"] = ("bench_serving saw no first token (no streamed text): its TPOT holds the prefill; "
                                    "server_mean_tpot_ms does not")  # fmt: skip
            logger.info("[%s %d/%d] %.1f output tok/s, TPOT median %.1f ms, p99 %.1f ms", name, index + 1,
                        len(self.points), rec.get("output_throughput") or 0, rec.get("median_tpot_ms") or 0,
                        rec.get("p99_tpot_ms") or 0)  # fmt: skip
        except Exception as err:  # noqa: BLE001 - recorded for the report
            rec["error"] = str(err) if isinstance(err, (TimeoutError, RuntimeError)) else repr(err)
            logger.error("[%s %d/%d] %s", name, index + 1, len(self.points), rec["error"])
        rec["bench_args"] = shlex.join(point.args + extra)
        rec["seconds"] = round(time.time() - t0, 1)
        return rec


# =====================================================================================================================
# CLI
# =====================================================================================================================
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def _log_summary(doc: Dict[str, Any]) -> None:
    for name, res in doc["configs"].items():
        ok = sum(_measured(p, "output_throughput") for p in res["points"])
        logger.info("%s: KV capacity %s tokens, %d/%d points measured%s", name, res.get("max_total_num_tokens"), ok,
                    len(res["points"]), f", error: {res['error']}" if res.get("error") else "")  # fmt: skip
    s = doc["summary"]
    for row in s["throughput_vs_dense"]:
        logger.info("%s %s c=%s: %.1f output tok/s = %.3fx %s", row["config"], row["workload"],
                    row["max_concurrency"], row["output_throughput"], row["output_throughput_vs_dense"],
                    row["dense"])  # fmt: skip
    for row in s["tpot_vs_dense"]:
        for key, label in (("server_mean_tpot_ms", "server mean"), ("median_tpot_ms", "bench_serving median")):
            if key in row:
                logger.info("%s context %s batch %s: TPOT (%s) %.1f ms = %.3fx %s", row["config"],
                            row["context_length"], row["batch"], label, row[key], row[key.replace("_ms", "_vs_dense")],
                            row["dense"])  # fmt: skip


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", help="model path, served and used as bench_serving's tokenizer; required unless "
                    "--merge")  # fmt: skip
    ap.add_argument("--configs", nargs="+", default=["dense", "mosaic-r3"],
                    help="configurations in order: dense, fp8, mosaic-r<ratio>[-b<read budget>][-h<hot window>], "
                         "each with an optional -tp<N>")  # fmt: skip
    ap.add_argument("--server-args", default="", help="extra flags for every server, one string")
    ap.add_argument("--dense-backend", default="flashinfer", help="attention backend of dense and fp8")
    ap.add_argument("--workload", action="append", type=parse_workload, default=[], metavar="NAME='FLAGS'",
                    help="a named bench_serving workload (dataset flags, one string); repeatable")
    ap.add_argument("--bench-args", default=None, help="one workload's bench_serving flags, one string (named after "
                    "its --dataset-name); same as --workload NAME='FLAGS'")  # fmt: skip
    ap.add_argument("--concurrency", nargs="+", type=_positive_int, default=[], metavar="C",
                    help="sweep: one run per workload and C with --max-concurrency C")
    ap.add_argument("--prompts-per-slot", type=_positive_int, default=4,
                    help="sweep: --num-prompts is C x this (default 4) ...")
    ap.add_argument("--min-prompts", type=_positive_int, default=16, help="... but at least this (default 16)")
    ap.add_argument("--context-lengths", nargs="+", type=_positive_int, default=[], metavar="L",
                    help="TPOT over context: prompt lengths in tokens")
    ap.add_argument("--context-batch", nargs="+", type=_positive_int, default=[1, 16], metavar="B",
                    help="TPOT over context: requests sent at once (default 1 16)")
    ap.add_argument("--context-output-len", type=_positive_int, default=128,
                    help="TPOT over context: output tokens per request (default 128)")
    ap.add_argument("--budget-seconds", type=_seconds, default=None,
                    help="time budget of the whole run; no new point starts once it is nearly spent")
    ap.add_argument("--budget-reserve", type=_seconds, default=60.0,
                    help="seconds of the budget kept for stopping the last server and writing (default 60)")
    ap.add_argument("--min-point-seconds", type=_seconds, default=30.0,
                    help="a point (or a server start) begins only with this much of the budget share left "
                         "(default 30)")  # fmt: skip
    ap.add_argument("--point-timeout", "--bench-timeout", dest="point_timeout", type=_seconds, default=1800.0,
                    help="seconds one bench_serving run may take (default 1800)")
    ap.add_argument("--ready-timeout", type=_seconds, default=420.0)
    ap.add_argument("--no-flush-cache", dest="flush_cache", action="store_false",
                    help="do not pass --flush-cache (radix cache kept between warm-up and run)")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--launch-module", default="sglang.launch_server", help="module run as the server")
    ap.add_argument("--bench-module", default=BENCH_MODULE,
                    help=f"module run as bench_serving (default {BENCH_MODULE})")
    ap.add_argument("--merge", nargs="+", type=Path, metavar="DIR",
                    help="start no server: merge the throughput.json of earlier runs (directories or files) into "
                         "<out>/throughput.json, ratios to dense recomputed")  # fmt: skip
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.command = "python -m bench.serving_throughput " + shlex.join(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.merge:
        doc = merge(args.merge)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "throughput.json").write_text(json.dumps(doc, indent=1))
        _log_summary(doc)
        print(json.dumps(doc["summary"], indent=1))
        return 0
    if not args.model:
        ap.error("--model: expected a model path (required unless --merge), got none")

    for name in args.configs:
        try:
            config_flags(name)
        except ValueError as err:
            ap.error(str(err))
    workloads = list(args.workload)
    if args.bench_args is not None:
        bench_args = shlex.split(args.bench_args)
        workloads.append((flag_value(bench_args, "--dataset-name") or "default", bench_args))
    names = [n for n, _ in workloads]
    dup = sorted({n for n in names if names.count(n) > 1 or n == "context"})
    if dup:
        ap.error(f"--workload: expected distinct names other than 'context' (the context sweep's), got {dup}")
    if not workloads and not args.context_lengths:
        ap.error("--workload: expected at least one workload (--workload, --bench-args) or --context-lengths, got none")
    points: List[Point] = []
    try:
        for name, wargs in workloads:
            points += workload_points(name, wargs, args.concurrency, args.prompts_per_slot, args.min_prompts)
    except ValueError as err:
        ap.error(str(err))
    points += context_points(args.context_lengths, args.context_batch, args.context_output_len)
    settings = {"configs": args.configs, "server_args": args.server_args, "dense_backend": args.dense_backend,
                "workloads": {n: shlex.join(a) for n, a in workloads}, "concurrency": args.concurrency,
                "prompts_per_slot": args.prompts_per_slot, "min_prompts": args.min_prompts,
                "context_lengths": args.context_lengths, "context_batch": args.context_batch,
                "context_output_len": args.context_output_len, "point_timeout": args.point_timeout,
                "flush_cache": args.flush_cache, "bench_module": args.bench_module,
                "launch_module": args.launch_module}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_seconds, args.budget_reserve, args.min_point_seconds)
    logger.info("%d configuration(s) x %d point(s)%s", len(args.configs), len(points),
                f", budget {args.budget_seconds:.0f} s" if args.budget_seconds is not None else "")  # fmt: skip
    doc = Sweep(args, points, settings, budget).run()
    _log_summary(doc)
    print(json.dumps(doc["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
