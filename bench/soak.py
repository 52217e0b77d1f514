# SPDX-License-Identifier: Apache-2.0
"""Soak and fault injection against an SGLang server (issue #8, GPU machine): many mixed requests, then the leak
check, outputs served alone, and optional faults.

    python -m bench.soak --launch "--model-path M --kv-compressor mosaic --port 30000" --vocab-size 49152 \\
        --max-context 8192 --requests 1000 --flush-during-load --disconnect-long-prefill --restart --out soak.json
    python -m bench.soak --url http://127.0.0.1:30000 --server-log server.log --vocab-size 49152 --out soak.json

**Workload** (:func:`make_workload`, seeded): prompts of token ids sent to SGLang's native ``/generate``
(``input_ids``, ``sampling_params`` with ``max_new_tokens``/``temperature``/``n``/``ignore_eos``, ``stream``), so
no tokenizer is needed. A share of them start with one of a few shared "system" prefixes plus a distinct suffix
(like ``sglang.bench_serving``'s generated-shared-prefix), the rest are random ids of mixed length up to the context
limit (prompt + ``max_new_tokens`` within ``--max-context``); ids are drawn in ``[--id-low, --id-high)`` to avoid
special tokens. Some are streamed (server-sent events), some of those cancelled mid-stream (the client closes the
connection after a few chunks), some ask for ``n > 1`` samples. ``ignore_eos`` keeps every request to its length so
the KV cache stays full and SGLang has to evict and retract.

**Counts**: sent / completed / failed (error classes and the first messages) / cancelled (intended), per kind, and
latencies. **After the drain** it waits for the server to go idle, records ``/get_server_info``, ``/v1/loads`` and
``/metrics`` (if enabled), and scans the server log (the one it started, or ``--server-log``, from where it stood when
the soak began) for SGLang's idle leak check: in 0.5.17 the scheduler's ``on_idle`` runs
``invariant_checker._check_all_pools`` and reports ``pool memory leak detected! [full] total=..., available=...``
through ``raise_error_or_warn`` (a ``ValueError`` that stops the scheduler under the default
``SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE=1``, else a warning). ``kv_tokens_leaked`` is the largest
``total - (available + evictable + protected + session_held + uncached)`` of those reports (0 without one).
``server_restarts`` counts unplanned ones: the started process exited, or ``startup_time`` / the scheduler pids
changed.

**Equal alone**: ``--alone-subset K`` requests are greedy with a fixed ``max_new_tokens``; their output ids under load
are compared with the same requests sent one at a time after the drain (equal, or the first differing position).
This is reported, not asserted: with compression ratio > 1 the fast planner's query statistics pool the recent
queries of all running requests, so a compressed request's plan (and so its output) may legitimately depend on the
batch; exact equality is expected at ratio 1 (every segment dense), up to batch-numerics effects.

**Faults** (each optional, each recorded with its time and outcome): ``--flush-during-load`` (``/flush_cache`` while
requests run), ``--disconnect-long-prefill`` (a very long prompt whose connection is closed while its prefill runs,
then ``/health`` and a greedy request), ``--kill-sidecar-every S`` (SIGKILL one MosaicKV sidecar process, a
``multiprocessing`` spawn child of a scheduler, and watch for a new one), ``--restart`` (after the soak, stop the
started server cleanly, start it with the same flags, check it; a planned restart).

Exit status 1 if a request that was not cancelled on purpose failed, a leak was reported, or the server restarted
unplanned; 2 for bad arguments. Standard library only (``psutil`` if installed, else ``/proc``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import random
import re
import shlex
import signal
import socket
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from bench.accuracy import served_context_length
from bench.bad_input import error_message

GENERATE = "/generate"
FIRST_ERRORS = 5  # messages kept per error class

# ----------------------------------------------------------------------------------------------------------------
# Workload


@dataclass(frozen=True)
class WorkloadSpec:
    """What :func:`make_workload` generates (see the module docstring); validated on construction."""

    requests: int = 1000
    seed: int = 0
    max_context: int = 8192
    id_low: int = 1000
    id_high: int = 31000
    num_prefixes: int = 4
    prefix_len: int = 2048
    suffix_len: Tuple[int, int] = (32, 512)
    min_input: int = 32
    output_len: Tuple[int, int] = (16, 256)
    shared_fraction: float = 0.6
    long_fraction: float = 0.1  # random prompts drawn near the context limit
    stream_fraction: float = 0.4
    cancel_fraction: float = 0.1  # of all requests; each is streamed
    n_fraction: float = 0.1
    max_n: int = 4
    alone_subset: int = 16
    alone_max_tokens: int = 32
    temperature: float = 0.8

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, expected: str, got: Any) -> None:
            if not ok:
                raise ValueError(f"{name}: expected {expected}, got {got!r}")

        need(self.requests >= 1, "--requests", "at least 1", self.requests)
        need(0 <= self.id_low < self.id_high, "--id-low/--id-high", "0 <= low < high", (self.id_low, self.id_high))
        need(self.num_prefixes >= 1, "--num-prefixes", "at least 1", self.num_prefixes)
        need(1 <= self.suffix_len[0] <= self.suffix_len[1], "--suffix-len", "1 <= min <= max", self.suffix_len)
        need(1 <= self.output_len[0] <= self.output_len[1], "--output-len", "1 <= min <= max", self.output_len)
        need(self.min_input >= 1, "--min-input", "at least 1", self.min_input)
        need(self.max_n >= 2, "--max-n", "at least 2", self.max_n)
        need(self.alone_max_tokens >= 1, "--alone-max-tokens", "at least 1", self.alone_max_tokens)
        need(0 <= self.alone_subset <= self.requests, "--alone-subset", f"0..{self.requests} (--requests)",
             self.alone_subset)  # fmt: skip
        need(self.temperature >= 0, "--temperature", "a value >= 0", self.temperature)
        for name in ("shared_fraction", "long_fraction", "stream_fraction", "cancel_fraction", "n_fraction"):
            value = getattr(self, name)
            need(0.0 <= value <= 1.0, "--" + name.replace("_", "-"), "a fraction in [0, 1]", value)
        need(self.cancel_fraction <= self.stream_fraction, "--cancel-fraction",
             f"at most --stream-fraction ({self.stream_fraction}; cancelled requests are streamed)",
             self.cancel_fraction)  # fmt: skip
        longest_out = max(self.output_len[1], self.alone_max_tokens, _CANCEL_MIN_OUTPUT)
        need(self.max_context >= self.min_input + longest_out, "--max-context",
             f"at least --min-input + the longest output ({self.min_input} + {longest_out})",
             self.max_context)  # fmt: skip


_CANCEL_MIN_OUTPUT = 64  # a cancelled request asks for at least this many tokens, so it is still running when cut


@dataclass(frozen=True)
class SoakRequest:
    """One request of the workload."""

    index: int
    prompt: str  # "shared-prefix" or "random"
    prefix: Optional[int]  # which shared prefix, for "shared-prefix"
    input_ids: Tuple[int, ...]
    max_new_tokens: int
    stream: bool
    cancel_after: Optional[int]  # close the connection after this many stream chunks
    n: int
    temperature: float
    alone: bool  # in the equal-alone subset (greedy, n = 1, not cancelled)

    @property
    def tags(self) -> List[str]:
        """The kinds this request counts under (one prompt kind plus its features)."""
        tags = [self.prompt, "streamed" if self.stream else "not-streamed"]
        if self.cancel_after is not None:
            tags.append("cancel-mid-stream")
        if self.n > 1:
            tags.append("n>1")
        if self.alone:
            tags.append("alone-subset")
        return tags

    def body(self, stream: Optional[bool] = None) -> Dict[str, Any]:
        """The ``/generate`` body (``GenerateReqInput`` fields); ``stream`` overrides the request's own."""
        params: Dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                                  "ignore_eos": True}  # fmt: skip
        if self.n > 1:
            params["n"] = self.n
        return {"input_ids": list(self.input_ids), "sampling_params": params,
                "stream": self.stream if stream is None else stream}  # fmt: skip


def make_workload(spec: WorkloadSpec) -> List[SoakRequest]:
    """The seeded request list of ``spec`` (pure: the same spec gives the same list)."""
    rng = random.Random(spec.seed)
    ids = lambda k: tuple(rng.randrange(spec.id_low, spec.id_high) for _ in range(k))  # noqa: E731
    room = spec.max_context - spec.output_len[1]  # prompt room left by the longest ordinary output
    prefix_len = max(1, min(spec.prefix_len, room - spec.suffix_len[0]))
    prefixes = [ids(prefix_len) for _ in range(spec.num_prefixes)]
    alone = set(rng.sample(range(spec.requests), spec.alone_subset))
    out: List[SoakRequest] = []
    for i in range(spec.requests):
        is_alone = i in alone
        cancel = not is_alone and rng.random() < spec.cancel_fraction
        stream = cancel or rng.random() < _stream_share(spec)
        n = rng.randint(2, spec.max_n) if not (is_alone or cancel) and rng.random() < spec.n_fraction else 1
        if is_alone:
            max_new = spec.alone_max_tokens
        else:
            max_new = rng.randint(*spec.output_len)
            if cancel:
                max_new = max(max_new, _CANCEL_MIN_OUTPUT)
        limit = spec.max_context - max_new  # longest prompt this request may have
        if rng.random() < spec.shared_fraction and prefix_len + 1 <= limit:
            which = rng.randrange(spec.num_prefixes)
            room_left = limit - prefix_len
            suffix = rng.randint(min(spec.suffix_len[0], room_left), min(spec.suffix_len[1], room_left))
            prompt, prefix, input_ids = "shared-prefix", which, prefixes[which] + ids(suffix)
        else:
            lo = min(spec.min_input, limit)
            if rng.random() < spec.long_fraction:
                length = rng.randint(max(lo, int(0.9 * limit)), limit)
            else:  # log-uniform: many short prompts, some long
                length = min(limit, int(math.exp(rng.uniform(math.log(lo), math.log(limit)))))
            prompt, prefix, input_ids = "random", None, ids(max(1, length))
        temperature = 0.0 if is_alone else spec.temperature
        out.append(SoakRequest(i, prompt, prefix, input_ids, max_new, stream, rng.randint(1, 4) if cancel else None, n,
                               temperature, is_alone))  # fmt: skip
    return out


def _stream_share(spec: WorkloadSpec) -> float:
    """Probability that a request not cancelled is streamed, so that ``stream_fraction`` of all are."""
    rest = 1.0 - spec.cancel_fraction
    return 0.0 if rest <= 0 else min(1.0, (spec.stream_fraction - spec.cancel_fraction) / rest)


# ----------------------------------------------------------------------------------------------------------------
# HTTP client


@dataclass
class Outcome:
    """What happened to one request."""

    index: int
    status: str  # "completed", "failed", "cancelled" (closed on purpose) or "not-sent"
    error_class: str = ""  # for "failed": http-<status>, abort, stream-error, incomplete-stream, connection, timeout
    message: str = ""
    seconds: float = 0.0
    ttft: Optional[float] = None  # streamed: seconds to the first chunk
    chunks: int = 0
    output_ids: List[List[int]] = field(default_factory=list)  # one list per sample (n)
    finish_reasons: List[str] = field(default_factory=list)


def _connection(base: str, timeout: float) -> http.client.HTTPConnection:
    url = urllib.parse.urlsplit(base)
    if url.scheme == "https":
        return http.client.HTTPSConnection(url.hostname or "127.0.0.1", url.port or 443, timeout=timeout)
    return http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port or 80, timeout=timeout)


def _hard_close(conn: http.client.HTTPConnection, sock: Optional[socket.socket]) -> None:
    """Close the connection's socket at once (FIN to the server), whatever a response still holds. ``sock`` is taken
    right after the request is sent: ``http.client`` forgets it once a response that ends with the connection is
    read, while the response's file still keeps it open."""
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    conn.close()


def merge_stream_ids(have: List[int], chunk_ids: List[int], completion_tokens: Optional[int]) -> List[int]:
    """Output ids after one stream chunk: SGLang sends the cumulative ids by default and only the new ones with
    ``--incremental-streaming-output``; ``meta_info.completion_tokens`` (cumulative) tells which (pure)."""
    if completion_tokens is not None and len(chunk_ids) == completion_tokens and len(chunk_ids) >= len(have):
        return list(chunk_ids)
    return have + list(chunk_ids)


def _finish(item: Dict[str, Any]) -> Tuple[str, str]:
    """(type, message) of a result's ``meta_info.finish_reason`` (``"none"`` when absent)."""
    reason = (item.get("meta_info") or {}).get("finish_reason")
    if isinstance(reason, dict):
        return str(reason.get("type")), str(reason.get("message", ""))
    return ("none", "") if reason is None else (str(reason), "")


def send_generate(base: str, body: Dict[str, Any], timeout: float, cancel_after: Optional[int] = None) -> Outcome:
    """POST ``body`` to ``/generate``; streamed bodies are read as server-sent events and, with ``cancel_after``,
    the connection is closed after that many chunks. Never raises: errors become a failed :class:`Outcome`."""
    out = Outcome(index=-1, status="failed")
    t0 = time.monotonic()
    conn = _connection(base, timeout)
    try:
        conn.request("POST", GENERATE, json.dumps(body), {"Content-Type": "application/json"})
        sock = conn.sock
        resp = conn.getresponse()
        if resp.status != 200:
            out.error_class, out.message = f"http-{resp.status}", error_message(resp.read().decode(errors="replace"))
            return out
        if not body.get("stream"):
            data = json.loads(resp.read())
            items = data if isinstance(data, list) else [data]
            out.output_ids = [list(it.get("output_ids") or []) for it in items]
            out.finish_reasons = [_finish(it)[0] for it in items]
            aborted = [_finish(it) for it in items if _finish(it)[0] == "abort"]
            if aborted:
                out.error_class, out.message = "abort", aborted[0][1]
            else:
                out.status = "completed"
            return out
        return _read_stream(conn, sock, resp, out, t0, cancel_after)
    except (socket.timeout, TimeoutError) as err:
        out.error_class, out.message = "timeout", f"{type(err).__name__}: {err}"
        return out
    except (OSError, http.client.HTTPException) as err:
        out.error_class, out.message = "connection", f"{type(err).__name__}: {err}"
        return out
    except (ValueError, TypeError, AttributeError) as err:
        out.error_class, out.message = "bad-response", f"{type(err).__name__}: {err}"
        return out
    finally:
        out.seconds = time.monotonic() - t0
        if out.status != "cancelled":
            conn.close()


def _read_stream(conn: http.client.HTTPConnection, sock: Optional[socket.socket], resp: http.client.HTTPResponse,
                 out: Outcome, t0: float, cancel_after: Optional[int]) -> Outcome:  # fmt: skip
    ids: Dict[int, List[int]] = {}
    finish: Dict[int, str] = {}
    done = False
    while True:
        line = resp.readline()
        if not line:
            break
        text = line.decode(errors="replace").strip()
        if not text.startswith("data:"):
            continue
        payload = text[len("data:") :].strip()
        if payload == "[DONE]":
            done = True
            break
        obj = json.loads(payload)
        if isinstance(obj, dict) and "error" in obj:
            err = obj["error"]
            out.error_class = "stream-error"
            out.message = str(err.get("message", err)) if isinstance(err, dict) else str(err)
            return out
        if out.ttft is None:
            out.ttft = time.monotonic() - t0
        out.chunks += 1
        k = int(obj.get("index", 0))
        meta = obj.get("meta_info") or {}
        ids[k] = merge_stream_ids(ids.get(k, []), list(obj.get("output_ids") or []), meta.get("completion_tokens"))
        kind, message = _finish(obj)
        if kind != "none":
            finish[k] = kind
            if kind == "abort":
                out.error_class, out.message = "abort", message
        if cancel_after is not None and out.chunks >= cancel_after and not finish:
            _hard_close(conn, sock)
            resp.close()
            out.status = "cancelled"
            break
    out.output_ids = [ids[k] for k in sorted(ids)]
    out.finish_reasons = [finish.get(k, "none") for k in sorted(ids)]
    if out.status == "cancelled" or out.error_class:
        return out
    if not done:
        out.error_class, out.message = "incomplete-stream", f"stream ended after {out.chunks} chunks without [DONE]"
        return out
    out.status = "completed"
    return out


def http_status(base: str, path: str, method: str = "GET", timeout: float = 30.0) -> Tuple[Optional[int], str]:
    """(status, body) of one request; (None, error) when no HTTP answer came."""
    conn = _connection(base, timeout)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    except (OSError, http.client.HTTPException) as err:
        return None, f"{type(err).__name__}: {err}"
    finally:
        conn.close()


def http_json(base: str, path: str, timeout: float = 30.0) -> Any:
    """The JSON body of a GET, or None when it did not answer 200 with JSON."""
    status, text = http_status(base, path, timeout=timeout)
    if status != 200:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _short_request(spec: WorkloadSpec, seed: int, length: int, max_new: int, temperature: float) -> Dict[str, Any]:
    """A ``/generate`` body of ``length`` seeded random ids of the workload's range and ``max_new`` tokens."""
    rng = random.Random(seed)
    return {"input_ids": [rng.randrange(spec.id_low, spec.id_high) for _ in range(length)],
            "sampling_params": {"max_new_tokens": max_new, "temperature": temperature, "ignore_eos": True}}


def greedy_probe(base: str, spec: WorkloadSpec, timeout: float, length: int = 16, max_new: int = 8) -> Dict[str, Any]:
    """``/health`` and one small greedy ``/generate``: is the server serving?"""
    body = _short_request(spec, spec.seed + 1, length, max_new, 0.0)
    health, _ = http_status(base, "/health", timeout=timeout)
    res = send_generate(base, body, timeout)
    ok = health == 200 and res.status == "completed" and bool(res.output_ids) and len(res.output_ids[0]) == max_new
    return {"health": health, "greedy": res.status, "greedy_error": res.message, "output_ids": res.output_ids[:1],
            "ok": ok}  # fmt: skip


def sampling_warmup(base: str, spec: WorkloadSpec, timeout: float, length: int = 16) -> Dict[str, Any]:
    """One short request sampled as the workload's are, before the load: first-use compilers run outside the timed
    load (the ninth run's soak spent its first 113 s compiling FlashInfer's sampling module on a fresh machine, with
    every request waiting)."""
    body = _short_request(spec, spec.seed + 2, length, 4, spec.temperature)
    t0 = time.monotonic()
    res = send_generate(base, body, timeout)
    return {"status": res.status, "error": res.message, "seconds": round(time.monotonic() - t0, 1)}


# ----------------------------------------------------------------------------------------------------------------
# Summaries


def latency_summary(values: List[float]) -> Dict[str, Any]:
    """count, mean, p50, p90, p99 and max of ``values`` in seconds (pure)."""
    if not values:
        return {"count": 0}
    s = sorted(values)
    pct = lambda q: s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]  # noqa: E731
    return {"count": len(s), "mean": round(sum(s) / len(s), 4), "p50": round(pct(0.5), 4),
            "p90": round(pct(0.9), 4), "p99": round(pct(0.99), 4), "max": round(s[-1], 4)}  # fmt: skip


def summarize(requests: List[SoakRequest], outcomes: List[Outcome]) -> Dict[str, Any]:
    """Counts over the load phase (pure): overall, per kind, per error class with the first messages, latencies."""
    by_index = {o.index: o for o in outcomes}
    counts = {"sent": 0, "completed": 0, "failed": 0, "cancelled": 0, "not_sent": 0, "cancel_missed": 0}
    kinds: Dict[str, Dict[str, int]] = {}
    errors: Dict[str, Dict[str, Any]] = {}
    finish: Dict[str, int] = {}
    lat: List[float] = []
    ttft: List[float] = []
    tokens = 0
    for req in requests:
        o = by_index.get(req.index, Outcome(req.index, "not-sent"))
        key = "not_sent" if o.status == "not-sent" else o.status
        counts[key] += 1
        counts["sent"] += o.status != "not-sent"
        counts["cancel_missed"] += req.cancel_after is not None and o.status == "completed"
        for tag in req.tags:
            row = kinds.setdefault(tag, {"sent": 0, "completed": 0, "failed": 0, "cancelled": 0})
            row["sent"] += o.status != "not-sent"
            if key in row:
                row[key] += 1
        if o.status == "failed":
            e = errors.setdefault(o.error_class, {"count": 0, "first": []})
            e["count"] += 1
            if len(e["first"]) < FIRST_ERRORS:
                e["first"].append({"index": o.index, "message": o.message[:300]})
        if o.status == "completed":
            lat.append(o.seconds)
            if o.ttft is not None:
                ttft.append(o.ttft)
            tokens += sum(len(x) for x in o.output_ids)
            for r in o.finish_reasons:
                finish[r] = finish.get(r, 0) + 1
    return {**counts, "output_tokens": tokens, "by_kind": kinds, "errors": errors, "finish_reasons": finish,
            "latency_s": latency_summary(lat), "ttft_s": latency_summary(ttft)}  # fmt: skip


def compare_outputs(under_load: Optional[List[int]], alone: Optional[List[int]]) -> Dict[str, Any]:
    """Equal, or the first differing position (a length difference counts at the shorter length) (pure)."""
    if under_load is None or alone is None:
        return {"equal": None, "first_diff": None}
    n = min(len(under_load), len(alone))
    first = next((i for i in range(n) if under_load[i] != alone[i]), None)
    if first is None and len(under_load) != len(alone):
        first = n
    return {"equal": first is None, "first_diff": first, "len_under_load": len(under_load), "len_alone": len(alone)}


ALONE_NOTE = ("With compression ratio > 1 the fast planner's query statistics pool the recent queries of all running "
              "requests, so a compressed request's plan (and so its output) may legitimately depend on the batch; "
              "exact equality is expected at ratio 1 (every segment dense), up to batch-numerics effects. Reported, "
              "not asserted.")  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Server log


_LEAK_RE = re.compile(r"(\S+) memory leak detected!|(?:Full|SWA) Pool Mem Leak Detected!|KV double free:|"
                      r"KV page use-after-free:")  # fmt: skip
_POOL_RE = re.compile(r"\[([\w-]+)\] total=(\d+), available=(\d+), evictable=(\d+), protected=(\d+), "
                      r"session_held=(\d+)(?:, uncached=(\d+))?")  # fmt: skip
_REQ_POOL_RE = re.compile(r"req_to_token_pool memory leak detected!\s*available_size=(\d+), session_held=(\d+), "
                          r"total_size=(\d+)")  # fmt: skip
_BUSY = "[Mem Check (BUSY)]"
_TRACEBACK = "Traceback (most recent call last)"
_EXCEPTION_RE = re.compile(r"(\w+) hit an exception")
_RETRACT_RE = re.compile(r"KV cache pool is full\. Retract requests\. #retracted_reqs: (\d+)")
_ARENA_FULL = "MosaicKV: compressed arena full"


def scan_log(text: str) -> Dict[str, Any]:
    """SGLang 0.5.17's leak reports and crashes in a server log (pure).

    Leak reports are the lines of ``SchedulerInvariantChecker`` (``<pool> memory leak detected! [full] total=...,
    available=..., evictable=..., protected=..., session_held=..., uncached=...``, the busy check's ``Full Pool Mem Leak
    Detected!``, the page checks' ``KV double free:`` / ``KV page use-after-free:``); the pool lines of a report may
    follow on the next lines. ``kv_tokens_leaked`` is the largest unaccounted token count of a report's pools (0 when
    no report gives one). The busy check's own ``[Mem Check (BUSY)]`` lines are not reports.

    Memory pressure: ``retractions`` counts the scheduler's ``KV cache pool is full. Retract requests.`` lines and
    ``retracted_reqs`` the requests they retracted; ``arena_full_warnings`` the sealer's warnings that the compressed
    arena had no room (pages then stay dense).
    """
    lines = text.splitlines()
    reports: List[Dict[str, Any]] = []
    leaked = 0
    for i, line in enumerate(lines):
        m = _LEAK_RE.search(line)
        if not m:
            continue
        pools = []
        for j in range(i, min(i + 4, len(lines))):  # the header line and pool lines right after it
            if j > i and (_LEAK_RE.search(lines[j]) or _BUSY in lines[j]):
                break
            for p in _POOL_RE.finditer(lines[j]):
                total, *parts = (int(x or 0) for x in p.groups()[1:])
                pools.append({"pool": p.group(1), "total": total, "unaccounted": total - sum(parts)})
        worst = max((abs(p["unaccounted"]) for p in pools), default=0)
        leaked = max(leaked, worst)
        report: Dict[str, Any] = {"line": i + 1, "text": line.strip()[:400], "pools": pools}
        req = _REQ_POOL_RE.search(line)
        if req:
            free, held, total = (int(x) for x in req.groups())
            report["req_slots_unaccounted"] = total - free - held
        reports.append(report)
    tracebacks = [i + 1 for i, line in enumerate(lines) if _TRACEBACK in line]
    crashed = sorted({m.group(1) for line in lines for m in [_EXCEPTION_RE.search(line)] if m})
    retracted = [int(m.group(1)) for line in lines for m in [_RETRACT_RE.search(line)] if m]
    return {"leak_reports": len(reports), "first_leak_reports": reports[:FIRST_ERRORS], "kv_tokens_leaked": leaked,
            "tracebacks": len(tracebacks), "first_traceback_lines": tracebacks[:FIRST_ERRORS],
            "crashed_components": crashed, "retractions": len(retracted), "retracted_reqs": sum(retracted),
            "arena_full_warnings": sum(_ARENA_FULL in line for line in lines)}  # fmt: skip


def read_log(path: Optional[Path], offset: int) -> str:
    if path is None or not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


# ----------------------------------------------------------------------------------------------------------------
# Processes


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    cmdline: str


def process_table() -> Dict[int, Proc]:
    """Every visible process (pid, parent, command line), with ``psutil`` if installed, else from ``/proc``."""
    try:
        import psutil
    except ImportError:
        return _proc_table_from_procfs()
    table: Dict[int, Proc] = {}
    for p in psutil.process_iter(["pid", "ppid", "cmdline"]):
        info = p.info
        table[info["pid"]] = Proc(info["pid"], info["ppid"] or 0, " ".join(info["cmdline"] or []))
    return table


def _proc_table_from_procfs() -> Dict[int, Proc]:
    table: Dict[int, Proc] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])  # fields after "(comm)": state, ppid, ...
        table[int(entry)] = Proc(int(entry), ppid, cmd)
    return table


def descendants(table: Dict[int, Proc], root: int) -> List[int]:
    """Pids under ``root`` (not ``root`` itself) (pure)."""
    children: Dict[int, List[int]] = {}
    for p in table.values():
        children.setdefault(p.ppid, []).append(p.pid)
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return sorted(out)


def _is_spawn(cmd: str) -> bool:
    return "multiprocessing.spawn" in cmd or "spawn_main" in cmd


def _is_scheduler(cmd: str) -> bool:
    return cmd.startswith("sglang::scheduler")  # SGLang's setproctitle for each scheduler (TP rank)


def find_sidecars(table: Dict[int, Proc], root: Optional[int] = None) -> List[int]:
    """MosaicKV sidecar candidates (pure): ``multiprocessing`` spawn children of a scheduler. Under ``root`` (the
    server's ``launch_server`` process) any spawn process whose parent is a scheduler or another process below
    ``root`` counts (schedulers are root's own spawn children); without ``root``, spawn children of processes titled
    ``sglang::scheduler*`` anywhere."""
    scope = set(descendants(table, root)) if root is not None else set(table)
    return sorted(
        pid for pid in scope
        if _is_spawn(table[pid].cmdline) and table[pid].ppid in table
        and (_is_scheduler(table[table[pid].ppid].cmdline) or (root is not None and table[pid].ppid in scope))
    )  # fmt: skip


def scheduler_pids(table: Dict[int, Proc], root: Optional[int] = None) -> List[int]:
    scope = descendants(table, root) if root is not None else list(table)
    return sorted(pid for pid in scope if _is_scheduler(table[pid].cmdline))


def kill_one_sidecar(root: Optional[int], wait: float, turn: int = 0,
                     table: Callable[[], Dict[int, Proc]] = process_table) -> Dict[str, Any]:  # fmt: skip
    """SIGKILL one sidecar (round robin by ``turn``) and watch ``wait`` seconds for a new one to appear."""
    before = find_sidecars(table(), root)
    if not before:
        return {"outcome": "no sidecar process found", "pids_before": []}
    victim = before[turn % len(before)]
    try:
        os.kill(victim, signal.SIGKILL)
    except ProcessLookupError:
        return {"outcome": "sidecar gone before the kill", "pids_before": before, "killed": victim}
    t0 = time.monotonic()
    while time.monotonic() - t0 < wait:
        now = find_sidecars(table(), root)
        new = sorted(set(now) - set(before))
        if new:
            return {"outcome": "replaced", "pids_before": before, "killed": victim, "new": new,
                    "replaced_after_s": round(time.monotonic() - t0, 2)}  # fmt: skip
        time.sleep(0.1)
    return {"outcome": f"no new sidecar within {wait:g} s", "pids_before": before, "killed": victim,
            "pids_after": find_sidecars(table(), root)}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Server


class ServerHandle:
    """The server under test: one we started (``bench.serve_check.Server``) or a URL (with an optional log/pid)."""

    def __init__(self, url: Optional[str], launch: Optional[List[str]], log: Optional[Path], pid: Optional[int],
                 ready_timeout: float, module: str = "sglang.launch_server") -> None:  # fmt: skip
        self.launch_args, self.module = launch, module
        self.ready_timeout = ready_timeout
        self.server: Any = None
        self.log = log
        self.pid = pid
        self.log_offset = log.stat().st_size if (log is not None and log.exists() and launch is None) else 0
        if launch is not None:
            self._start(log or Path("soak_server.log"))
            self.url = self.server.url
        else:
            self.url = (url or "").rstrip("/")

    def _start(self, log: Path) -> None:
        from bench.serve_check import Server

        self.server = Server.from_args(self.launch_args or [], log, module=self.module)
        self.log, self.log_offset, self.pid = log, 0, self.server.proc.pid
        try:
            self.server.wait_ready(self.ready_timeout)
        except RuntimeError:
            self.server.stop()
            raise

    def exited(self) -> Optional[int]:
        """The exit status of a server we started that has exited, else None."""
        return None if self.server is None else self.server.proc.poll()

    def stop(self) -> Optional[int]:
        if self.server is None:
            return None
        self.server.stop()
        return self.server.proc.returncode

    def restart(self, log: Path) -> None:
        self.stop()
        self._start(log)


# ----------------------------------------------------------------------------------------------------------------
# The soak


class Soak:
    """Runs the load phase with its faults; state shared by the worker threads."""

    def __init__(self, args: argparse.Namespace, spec: WorkloadSpec, requests: List[SoakRequest],
                 server: ServerHandle) -> None:  # fmt: skip
        self.args, self.spec, self.requests, self.server = args, spec, requests, server
        self.lock = threading.Lock()
        self.t0 = time.monotonic()
        self.outcomes: Dict[int, Outcome] = {}
        self.sent = 0
        self.in_flight = 0
        self.stop = threading.Event()  # the server is gone: send nothing more
        self.done = threading.Event()  # the load phase is over
        self.faults: List[Dict[str, Any]] = []
        self.load_samples: List[Dict[str, Any]] = []
        self.fault_failures = 0

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def counts(self) -> Dict[str, int]:
        with self.lock:
            c = {"sent": self.sent, "in_flight": self.in_flight, "completed": 0, "failed": 0, "cancelled": 0}
            for o in self.outcomes.values():
                c[o.status] = c.get(o.status, 0) + 1
        return c

    def past_send_deadline(self) -> bool:
        deadline = self.args.send_deadline
        return bool(deadline) and time.monotonic() - self.t0 > deadline

    def _one(self, req: SoakRequest) -> None:
        if self.stop.is_set() or self.past_send_deadline():
            return
        with self.lock:
            self.sent += 1
            self.in_flight += 1
        try:
            out = send_generate(self.server.url, req.body(), self.args.timeout, req.cancel_after)
        finally:
            with self.lock:
                self.in_flight -= 1
        out.index = req.index
        with self.lock:
            self.outcomes[req.index] = out

    def _record(self, fault: str, **info: Any) -> Dict[str, Any]:
        row = {"fault": fault, "t": self.now(), **info}
        with self.lock:
            self.faults.append(row)
        print(f"[soak {row['t']:8.1f}s] fault {fault}: {json.dumps(info)[:200]}", flush=True)
        return row

    def _wait_sent(self, fraction: float) -> bool:
        """Block until ``fraction`` of the requests were sent; False if the load ended first."""
        target = max(1, int(fraction * len(self.requests)))
        while not (self.done.is_set() or self.stop.is_set()):
            with self.lock:
                if self.sent >= target:
                    return True
            time.sleep(0.02)
        return False

    def _flusher(self) -> None:
        k = self.args.flush_during_load
        for i in range(k):
            if not self._wait_sent((i + 1) / (k + 1)):
                return
            status, text = http_status(self.server.url, "/flush_cache", method="POST", timeout=self.args.timeout)
            self._record("flush_cache", status=status, message=" ".join(text.split())[:200],
                         in_flight=self.counts()["in_flight"])  # fmt: skip

    def _disconnector(self) -> None:
        if not self._wait_sent(0.5):
            return
        self.faults_disconnect_long_prefill()

    def faults_disconnect_long_prefill(self) -> Dict[str, Any]:
        """A very long streamed prompt whose connection is closed before its first chunk, then /health and a greedy
        request."""
        rng = random.Random(self.spec.seed + 2)
        length = self.args.long_prefill_tokens or self.spec.max_context - 16
        body = {"input_ids": [rng.randrange(self.spec.id_low, self.spec.id_high) for _ in range(length)],
                "sampling_params": {"max_new_tokens": 8, "temperature": 0.0}, "stream": True}  # fmt: skip
        conn = _connection(self.server.url, self.args.timeout)
        info: Dict[str, Any] = {"prompt_tokens": length}
        sock = None
        try:
            conn.request("POST", GENERATE, json.dumps(body), {"Content-Type": "application/json"})
            sock = conn.sock
            resp = conn.getresponse()  # SGLang sends the headers of a stream before the prefill ends
            info["status"] = resp.status
            if sock is not None:
                sock.settimeout(self.args.disconnect_after)
            try:
                first = resp.readline()
                info["closed"] = "after the first chunk (prefill done first; raise --long-prefill-tokens)" if first \
                    else "after the response ended"  # fmt: skip
            except (socket.timeout, TimeoutError):
                info["closed"] = f"during prefill (no chunk after {self.args.disconnect_after:g} s)"
        except (OSError, http.client.HTTPException) as err:
            info["closed"] = f"request failed: {type(err).__name__}: {err}"
        finally:
            _hard_close(conn, sock)
        time.sleep(0.5)
        probe = greedy_probe(self.server.url, self.spec, self.args.timeout)
        if not probe["ok"]:
            with self.lock:
                self.fault_failures += 1
        return self._record("disconnect_long_prefill", **info, after=probe)

    def _sidecar_killer(self) -> None:
        turn = 0
        while not self.done.wait(self.args.kill_sidecar_every):
            res = kill_one_sidecar(self.server.pid, self.args.sidecar_respawn_wait, turn)
            self._record("kill_sidecar", **res)
            turn += 1

    def _monitor(self) -> None:
        while not self.done.wait(self.args.progress_every):
            c = self.counts()
            loads = _loads(self.server.url)
            if loads is not None:
                self.load_samples.append({"t": self.now(), **loads})
            usage = "" if loads is None else f"  token_usage {loads['token_usage']:.2f}  running {loads['running']}"
            print(f"[soak {self.now():8.1f}s] sent {c['sent']}/{len(self.requests)}  completed {c['completed']}  "
                  f"failed {c['failed']}  cancelled {c['cancelled']}  in flight {c['in_flight']}{usage}",
                  flush=True)  # fmt: skip
            if self._check_exit():
                return

    def _check_exit(self) -> bool:
        """Record once that a server we started has exited, and stop sending."""
        code = self.server.exited()
        if code is None:
            return False
        with self.lock:
            first = not self.stop.is_set()
            self.stop.set()
        if first:
            self._record("server_exited", returncode=code)
        return True

    def run(self) -> List[Outcome]:
        """Send every request; the one-shot faults (flush, disconnect) finish within the load phase, the periodic
        helpers (progress, sidecar kills) run until it ends."""
        one_shot = [h for h, on in ((self._flusher, self.args.flush_during_load),
                                    (self._disconnector, self.args.disconnect_long_prefill)) if on]  # fmt: skip
        periodic = [self._monitor] + ([self._sidecar_killer] if self.args.kill_sidecar_every else [])
        shots = [threading.Thread(target=h, daemon=True) for h in one_shot]
        loops = [threading.Thread(target=h, daemon=True) for h in periodic]
        for t in shots + loops:
            t.start()
        try:
            with ThreadPoolExecutor(max_workers=self.args.concurrency) as pool:
                list(pool.map(self._one, self.requests))
            for t in shots:
                t.join()
            self._check_exit()
        finally:
            self.done.set()
            for t in loops:
                t.join(timeout=self.args.timeout + self.args.sidecar_respawn_wait + 5)
        with self.lock:
            return [self.outcomes[i] for i in sorted(self.outcomes)]


def _loads(base: str) -> Optional[Dict[str, Any]]:
    """Running and waiting requests and token usage summed/maxed over DP ranks, from ``/v1/loads?include=core``."""
    data = http_json(base, "/v1/loads?include=core", timeout=10)
    if not isinstance(data, dict) or not isinstance(data.get("loads"), list):
        return None
    loads = data["loads"]
    return {"running": sum(int(r.get("num_running_reqs", 0)) for r in loads),
            "waiting": sum(int(r.get("num_waiting_reqs", 0)) for r in loads),
            "token_usage": max((float(r.get("token_usage", 0.0)) for r in loads), default=0.0)}  # fmt: skip


def wait_idle(base: str, timeout: float, settle: float) -> Dict[str, Any]:
    """Wait until no request runs or waits (``/v1/loads``), then ``settle`` seconds for the idle check to run."""
    t0 = time.monotonic()
    last = None
    while time.monotonic() - t0 < timeout:
        last = _loads(base)
        if last is not None and last["running"] == 0 and last["waiting"] == 0:
            time.sleep(settle)
            return {"idle": True, "after_s": round(time.monotonic() - t0, 1), "loads": last}
        if last is None and http_status(base, "/health", timeout=10)[0] is None:
            return {"idle": False, "reason": "server not answering", "after_s": round(time.monotonic() - t0, 1)}
        if last is None:  # no /v1/loads: settle and hope
            time.sleep(settle)
            return {"idle": None, "reason": "no /v1/loads", "after_s": round(time.monotonic() - t0, 1)}
        time.sleep(0.5)
    return {"idle": False, "reason": f"still busy after {timeout:g} s", "loads": last}


_METRIC_RE = re.compile(r"^sglang:\w*(retract|evict|abort|token_usage|num_running|num_queue|cache_hit)\w*")


def server_state(base: str) -> Dict[str, Any]:
    """``/get_server_info`` (a few fields), ``/v1/loads`` and the interesting ``/metrics`` lines (if enabled)."""
    info = http_json(base, "/get_server_info") or {}
    keep = ("version", "startup_time", "max_total_num_tokens", "max_running_requests", "page_size", "kv_compressor",
            "mosaic_compression_ratio", "attention_backend", "model_path", "tp_size")  # fmt: skip
    status, text = http_status(base, "/metrics")
    metrics = [line for line in text.splitlines() if _METRIC_RE.match(line)] if status == 200 else None
    return {"server_info": {k: info.get(k) for k in keep if k in info},
            "internal_states": info.get("internal_states"), "loads": _loads(base), "metrics": metrics}  # fmt: skip


def alone_replay(base: str, requests: List[SoakRequest], outcomes: Dict[int, Outcome],
                 timeout: float) -> Dict[str, Any]:  # fmt: skip
    """Send each alone-subset request by itself and compare its output ids with the ones under load."""
    rows = []
    for req in (r for r in requests if r.alone):
        loaded = outcomes.get(req.index)
        if loaded is None:  # never sent (--send-deadline): nothing to compare with
            rows.append({"index": req.index, "prompt_tokens": len(req.input_ids), "alone_status": "not-sent",
                         "equal": None})  # fmt: skip
            continue
        alone = send_generate(base, req.body(stream=False), timeout)
        cmp = compare_outputs(loaded.output_ids[0] if loaded and loaded.status == "completed" and loaded.output_ids
                              else None,
                              alone.output_ids[0] if alone.status == "completed" and alone.output_ids else None)
        rows.append({"index": req.index, "prompt_tokens": len(req.input_ids), "streamed_under_load": req.stream,
                     "alone_status": alone.status, **cmp})  # fmt: skip
    return {"compared": sum(r["equal"] is not None for r in rows), "equal": sum(r["equal"] is True for r in rows),
            "differ": sum(r["equal"] is False for r in rows), "note": ALONE_NOTE, "requests": rows}  # fmt: skip


def restarts_seen(before: Dict[str, Any], after: Dict[str, Any], exited: Optional[int]) -> List[str]:
    """Why the server looks restarted between two states (pure): the started process exited, the startup time or the
    scheduler pids changed, or it stopped answering."""
    why = []
    if exited is not None:
        why.append(f"server process exited with {exited}")
    a, b = before.get("startup_time"), after.get("startup_time")
    if a is not None and b is not None and a != b:
        why.append(f"startup_time changed ({a} -> {b})")
    if before.get("schedulers") and after.get("schedulers") is not None and before["schedulers"] != after["schedulers"]:
        why.append(f"scheduler pids changed ({before['schedulers']} -> {after['schedulers']})")
    if before.get("startup_time") is not None and after.get("startup_time") is None and exited is None:
        why.append("server stopped answering /get_server_info")
    return why


def server_context_len(base: str) -> Optional[int]:
    """The server's context length (:func:`bench.accuracy.served_context_length`); None if it gives none."""
    return served_context_length(lambda path: http_json(base, path))


def _identity(server: ServerHandle) -> Dict[str, Any]:
    info = http_json(server.url, "/get_server_info") or {}
    scheds = scheduler_pids(process_table(), server.pid) if server.pid is not None else None
    return {"startup_time": info.get("startup_time"), "schedulers": scheds}


# ----------------------------------------------------------------------------------------------------------------
# Command line


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one and the help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False) or "default" in text:
            return text
        return super()._get_help_string(action) or text


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__.split("\n\n")[0], formatter_class=_Help,
        epilog="Writes one JSON report (--out) and prints progress lines. Exit status: 0 passed; 1 a request not "
               "cancelled on purpose failed, a fault check failed, a leak was reported or the server restarted "
               "unplanned; 2 bad arguments. The module docstring (bench/soak.py) describes the workload, checks and "
               "faults.",
    )  # fmt: skip
    srv = ap.add_argument_group("server")
    where = srv.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="base URL of a running SGLang server")
    where.add_argument("--launch", metavar="'ARGS...'", help="start `python -m sglang.launch_server ARGS` (one "
                       "quoted string; --model-path required, --port default 30000) and stop it at the end")
    srv.add_argument("--server-log", type=Path, help="the server's log file: with --url, needed for the leak and "
                     "crash checks (scanned from its size at the start); with --launch, where to write it "
                     "(default: next to --out)")  # fmt: skip
    srv.add_argument("--server-pid", type=int, help="with --url: the launch_server pid, for the sidecar finder and "
                     "the scheduler-pid restart check (default: any sglang::scheduler process of this machine; give "
                     "it when several servers run here)")  # fmt: skip
    srv.add_argument("--launch-module", default="sglang.launch_server", help="with --launch: the module run as "
                     "`python -m MODULE ARGS`")  # fmt: skip
    srv.add_argument("--ready-timeout", type=float, default=900.0, help="seconds for a started server to be ready")
    wl = ap.add_argument_group("workload")
    wl.add_argument("--requests", type=int, default=1000)
    wl.add_argument("--seed", type=int, default=0)
    wl.add_argument("--concurrency", type=int, default=128, help="requests in flight")
    wl.add_argument("--max-context", type=int, default=8192, help="prompt + max_new_tokens of every request fits")
    wl.add_argument("--vocab-size", type=int, default=32000, help="model vocabulary size")
    wl.add_argument("--id-low", type=int, default=1000, help="lowest token id sent (ids below are left out)")
    wl.add_argument("--id-high", type=int, help="token ids are below this (default: vocab size - 1000; keep special "
                    "ids above it out)")  # fmt: skip
    wl.add_argument("--num-prefixes", type=int, default=4, help="shared system prefixes")
    wl.add_argument("--prefix-len", type=int, default=2048, help="tokens per shared prefix")
    wl.add_argument("--suffix-len", type=int, nargs=2, default=[32, 512], metavar=("MIN", "MAX"))
    wl.add_argument("--min-input", type=int, default=32, help="shortest random prompt")
    wl.add_argument("--output-len", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"),
                    help="max_new_tokens range (ignore_eos: each request generates exactly that many)")
    wl.add_argument("--shared-fraction", type=float, default=0.6, help="share of shared-prefix prompts")
    wl.add_argument("--long-fraction", type=float, default=0.1, help="share of random prompts near the context limit")
    wl.add_argument("--stream-fraction", type=float, default=0.4, help="share streamed (cancelled ones included)")
    wl.add_argument("--cancel-fraction", type=float, default=0.1, help="share cancelled mid-stream")
    wl.add_argument("--n-fraction", type=float, default=0.1, help="share with n > 1 samples")
    wl.add_argument("--max-n", type=int, default=4)
    wl.add_argument("--temperature", type=float, default=0.8, help="sampling temperature outside the alone subset")
    wl.add_argument("--alone-subset", type=int, default=16, help="greedy requests also sent alone after the drain")
    wl.add_argument("--alone-max-tokens", type=int, default=32)
    wl.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    wl.add_argument("--send-deadline", type=float, default=0.0, metavar="SECONDS",
                    help="stop sending new requests this long after the load starts (0: never); the rest count as "
                    "not sent and the report is still written (for machines with a time limit)")
    flt = ap.add_argument_group("faults")
    flt.add_argument("--flush-during-load", type=int, nargs="?", const=3, default=0, metavar="N",
                     help="POST /flush_cache N times (default 3) while the load runs")  # fmt: skip
    flt.add_argument("--disconnect-long-prefill", action="store_true", help="halfway through, send a very long "
                     "streamed prompt and close the connection while its prefill runs; then /health + greedy")
    flt.add_argument("--long-prefill-tokens", type=int, default=0, help="its length (default: --max-context - 16)")
    flt.add_argument("--disconnect-after", type=float, default=0.5, help="seconds to wait for its first chunk")
    flt.add_argument("--kill-sidecar-every", type=float, default=0.0, metavar="SECONDS",
                     help="SIGKILL one MosaicKV sidecar process every SECONDS during the load")  # fmt: skip
    flt.add_argument("--sidecar-respawn-wait", type=float, default=10.0, help="seconds to watch for a new sidecar")
    flt.add_argument("--restart", action="store_true", help="after the soak, stop the started server cleanly, start "
                     "it again with the same flags and check it (needs --launch)")  # fmt: skip
    out = ap.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True, help="the JSON report")
    out.add_argument("--progress-every", type=float, default=10.0, help="seconds between progress lines")
    out.add_argument("--idle-timeout", type=float, default=300.0, help="seconds to wait for the server to go idle")
    out.add_argument("--idle-settle", type=float, default=5.0, help="seconds idle before the log is scanned")
    return ap


def spec_from_args(args: argparse.Namespace) -> WorkloadSpec:
    id_high = args.id_high if args.id_high is not None else args.vocab_size - 1000
    if id_high > args.vocab_size:
        raise ValueError(f"--id-high: expected at most --vocab-size ({args.vocab_size}), got {id_high}")
    return WorkloadSpec(
        requests=args.requests, seed=args.seed, max_context=args.max_context, id_low=args.id_low, id_high=id_high,
        num_prefixes=args.num_prefixes, prefix_len=args.prefix_len, suffix_len=tuple(args.suffix_len),
        min_input=args.min_input, output_len=tuple(args.output_len), shared_fraction=args.shared_fraction,
        long_fraction=args.long_fraction, stream_fraction=args.stream_fraction, cancel_fraction=args.cancel_fraction,
        n_fraction=args.n_fraction, max_n=args.max_n, alone_subset=args.alone_subset,
        alone_max_tokens=args.alone_max_tokens, temperature=args.temperature,
    )  # fmt: skip


def _check_args(args: argparse.Namespace) -> None:
    if args.concurrency < 1:
        raise ValueError(f"--concurrency: expected at least 1, got {args.concurrency}")
    if args.restart and not args.launch:
        raise ValueError("--restart: expected --launch (only a server this script started is restarted), got --url")
    if args.flush_during_load < 0:
        raise ValueError(f"--flush-during-load: expected N >= 0, got {args.flush_during_load}")
    if args.send_deadline < 0:
        raise ValueError(f"--send-deadline: expected seconds >= 0, got {args.send_deadline}")
    if args.kill_sidecar_every < 0:
        raise ValueError(f"--kill-sidecar-every: expected seconds >= 0, got {args.kill_sidecar_every}")


def verdict(report: Dict[str, Any]) -> List[str]:
    """Why the soak failed (empty when it passed) (pure)."""
    why = []
    load = report["load"]
    if load["failed"]:
        why.append(f"{load['failed']} requests failed")
    if report.get("fault_checks_failed"):
        why.append(f"{report['fault_checks_failed']} fault checks failed")
    if report["log"].get("leak_reports") or report["log"].get("kv_tokens_leaked"):
        why.append(f"leak reported ({report['log']['kv_tokens_leaked']} KV tokens unaccounted)")
    if report["server_restarts"]:
        why.append(f"{report['server_restarts']} unplanned server restarts: {report['restart_reasons']}")
    return why


def run(args: argparse.Namespace) -> Tuple[Dict[str, Any], int]:
    spec = spec_from_args(args)
    requests = make_workload(spec)
    log = args.server_log
    if args.launch and log is None:
        log = args.out.with_suffix(".server.log")
    server = ServerHandle(args.url, shlex.split(args.launch) if args.launch else None, log, args.server_pid,
                          args.ready_timeout, args.launch_module)  # fmt: skip
    report: Dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "url": server.url,
        "launch": args.launch, "server_log": str(server.log) if server.log else None,
        "argv": sys.argv[1:], "workload": asdict(spec), "concurrency": args.concurrency,
    }  # fmt: skip
    try:
        report["server_context_len"] = ctx = server_context_len(server.url)
        if ctx is not None and spec.max_context > ctx:
            raise ValueError(f"--max-context: expected at most the server's context length ({ctx}), got "
                             f"{spec.max_context}")  # fmt: skip
        report["warmup"] = warm = sampling_warmup(server.url, spec, args.timeout)
        print(f"[soak] sampled warmup request: {warm['status']} in {warm['seconds']} s", flush=True)
        before = _identity(server)
        report["state_before"] = server_state(server.url)
        print(f"[soak] {len(requests)} requests, concurrency {args.concurrency}, server {server.url}", flush=True)
        soak = Soak(args, spec, requests, server)
        t0 = time.monotonic()
        outcomes = soak.run()
        report["load_seconds"] = round(time.monotonic() - t0, 1)
        report["send_deadline_hit"] = soak.past_send_deadline()
        report["load"] = summarize(requests, outcomes)
        report["load_samples"] = soak.load_samples
        report["max_token_usage"] = max((s["token_usage"] for s in soak.load_samples), default=None)
        report["idle"] = wait_idle(server.url, args.idle_timeout, args.idle_settle)
        report["state_after"] = server_state(server.url)
        report["alone"] = alone_replay(server.url, requests, {o.index: o for o in outcomes}, args.timeout)
        after = _identity(server)
        reasons = restarts_seen(before, after, server.exited())
        report["server_restarts"], report["restart_reasons"] = (1 if reasons else 0), reasons
        report["log"] = scan_log(read_log(server.log, server.log_offset)) if server.log else {
            "skipped": "no server log (give --server-log with --url)", "leak_reports": 0, "kv_tokens_leaked": 0}
        report["kv_tokens_leaked"] = report["log"]["kv_tokens_leaked"]
        report["faults"] = soak.faults
        report["fault_checks_failed"] = soak.fault_failures
        report["planned_restarts"] = 0
        if args.restart and not reasons:
            report["restart"] = _planned_restart(server, spec, args, log)
            report["planned_restarts"] = 1
            report["fault_checks_failed"] += not report["restart"]["ok"]
    finally:
        if server.server is not None:
            report["final_stop_returncode"] = server.stop()
    why = verdict(report)
    report["passed"], report["why_failed"] = not why, why
    return report, (1 if why else 0)


def _planned_restart(server: ServerHandle, spec: WorkloadSpec, args: argparse.Namespace, log: Path) -> Dict[str, Any]:
    before = greedy_probe(server.url, spec, args.timeout)
    res: Dict[str, Any] = {"t": time.strftime("%H:%M:%S")}
    t0 = time.monotonic()
    res["stop_returncode"] = server.stop()
    restart_log = log.with_suffix(".restart.log")
    try:
        server.restart(restart_log)
    except RuntimeError as err:
        return {**res, "ok": False, "error": str(err), "log": str(restart_log)}
    res["ready_after_s"] = round(time.monotonic() - t0, 1)
    after = greedy_probe(server.url, spec, args.timeout)
    res.update(before=before, after=after, same_greedy_output=before["output_ids"] == after["output_ids"],
               log=str(restart_log), log_scan=scan_log(read_log(restart_log, 0)))  # fmt: skip
    res["ok"] = bool(after["ok"])
    return res


def main(argv: Optional[List[str]] = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        _check_args(args)
        spec_from_args(args)
    except ValueError as err:
        ap.error(str(err))
    try:
        report, code = run(args)
    except RuntimeError as err:  # a started server that never became ready
        print(f"error: --launch: {err} (log: {args.server_log or args.out.with_suffix('.server.log')})",
              file=sys.stderr)  # fmt: skip
        return 1
    except ValueError as err:  # an argument the server contradicts
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    load = report["load"]
    print(f"[soak] sent {load['sent']}  completed {load['completed']}  failed {load['failed']}  cancelled "
          f"{load['cancelled']}  kv_tokens_leaked {report['kv_tokens_leaked']}  server_restarts "
          f"{report['server_restarts']}  alone equal {report['alone']['equal']}/{report['alone']['compared']}  "
          f"retractions {report['log'].get('retractions', '-')}  "
          f"-> {'PASS' if code == 0 else 'FAIL: ' + '; '.join(report['why_failed'])}", flush=True)  # fmt: skip
    return code


if __name__ == "__main__":
    sys.exit(main())
