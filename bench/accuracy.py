# SPDX-License-Identifier: Apache-2.0
"""Accuracy suite: RULER-style long-context tasks scored by exact match, against a server or a local model.

The tasks come from :mod:`bench.ruler` (generated locally, seeded, no download): needle retrieval with one key
(``niah_single``), distractor keys (``niah_multikey``), several values (``niah_multivalue``) and several keys asked
at once (``niah_multiquery``); variable tracking (``vt``); common-word (``cwe``) and frequent-word (``fwe``)
extraction. Each prompt is completion-style (``"...\\n\\nQuestion: ...\\nAnswer: The special magic number for X
... is"``), so base and instruction models answer without a chat template.

Lengths are in tokens of the served model's tokenizer. A length ``L`` bounds prompt *and* answer: the prompt is
filled to at most ``L - max_tokens(task) - RESERVE`` tokens, so ``L = 8192`` fits a model with an 8,192-token context
(``RESERVE`` covers a BOS token and similar). Generation is greedy and stops at ``max_tokens(task)``
(:data:`MAX_TOKENS`) or end of sequence.

Scoring (:func:`score_output`) reads the *answer*: the output without leading white space, cut at its first blank line
(small models go on with a new "Question: ..."). A sample is correct when *every* expected value appears in the
answer (case-insensitive substring, RULER's ``string_match_all`` taken as all-or-nothing): the one number asked for
(``niah_single``, ``niah_multikey``), all values or all asked keys' values (``niah_multivalue``,
``niah_multiquery``), every variable of the chain (``vt``), all common words (``cwe``), the three most frequent coded
words (``fwe``). Stricter than RULER for the needle tasks: the first ``k`` distinct numbers of the answer's length
in the answer must be exactly the ``k`` expected values, so that listing every number of the haystack (distractor
keys' values first) does not pass; what follows them (small models repeat themselves) is not read.

Backends (same samples and scoring for both):

``http``          any OpenAI-compatible server, SGLang's above all: ``POST {url}/v1/completions`` with
                  ``temperature 0``, ``--concurrency`` requests in flight, timeouts and retries. Token counts come
                  from the server's ``/v1/tokenize`` (default) or a local tokenizer (``--tokenizer PATH``).
``transformers``  SmolLM2-135M-Instruct on the CPU (:mod:`bench.smollm2`, fp32), one sample at a time: the smoke
                  path, and a reference for what the dense model answers.

Each run writes one JSON file (``--out``): the configuration (with ``--label``, and the server's
``/get_server_info`` and ``/v1/models`` when it answers them), one record per sample (task, length, prompt tokens,
expected, output, correct) and accuracies per task and length, per task, per length and on average (the mean over
task and length cells). ``python -m bench.accuracy_report`` compares several such files. ``python -m
bench.shared_context`` asks several questions about one context in turn (prefix reuse), with the same scoring.

Run ``python -m bench.accuracy --help``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import http.client
import json
import logging
import os
import platform
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from bench.ruler import TASKS, RulerSample, generate

logger = logging.getLogger("bench.accuracy")

__all__ = [
    "DEFAULT_LENGTHS",
    "MAX_TOKENS",
    "RESERVE",
    "Completion",
    "HttpBackend",
    "HttpError",
    "served_context_length",
    "TransformersBackend",
    "build_samples",
    "main",
    "run_samples",
    "score_output",
    "summarize",
]

SCHEMA = "mosaickv.accuracy/1"
DEFAULT_LENGTHS: Tuple[int, ...] = (2048, 4096, 6144, 8192)
MAX_TOKENS: Dict[str, int] = {
    "niah_single": 32,
    "niah_multikey": 32,
    "niah_multivalue": 64,
    "niah_multiquery": 64,
    "vt": 64,
    "cwe": 64,
    "fwe": 48,
}
"""Greedy tokens generated per task: room for the expected answer (7-digit numbers, 5-letter variable names, words)
with some slack, and little more, so that listing every number of the haystack cannot pass by accident."""
RESERVE = 8
"""Tokens kept free below a length ``L`` besides the answer (BOS and other special tokens a server adds)."""
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Completion:
    """One generated answer.

    Attributes
    ----------
    text : str
        The generated text (the prompt excluded).
    prompt_tokens, completion_tokens : int or None
        Token counts as the backend reports them (``usage`` of an OpenAI response); ``None`` if not reported.
    finish_reason : str or None
        ``"stop"`` (end of sequence or stop string), ``"length"`` (``max_tokens`` reached), ...
    cached_tokens : int or None
        Prompt tokens the server took from its prefix cache (``usage.prompt_tokens_details.cached_tokens``; SGLang
        reports it when launched with ``--enable-cache-report``); ``None`` if not reported.
    """

    text: str
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    finish_reason: Optional[str] = None
    cached_tokens: Optional[int] = None


# =====================================================================================================================
# HTTP backend
# =====================================================================================================================
class HttpError(RuntimeError):
    """A request to the server failed for good (after retries, or with a status that retrying cannot fix)."""


def served_context_length(get: Callable[[str], Any]) -> Optional[int]:
    """The model's context length as an SGLang server serves it: ``/v1/models`` (``max_model_len``), else
    ``/get_model_info`` (``context_length``); ``None`` if neither gives it. ``get(path)``: the JSON body of a GET, or
    ``None`` when the server did not answer with one. (``/server_info``'s ``context_length`` is the flag, ``None``
    unless it was given.)"""
    models = get("/v1/models")
    if isinstance(models, dict) and models.get("data") and models["data"][0].get("max_model_len"):
        return int(models["data"][0]["max_model_len"])
    info = get("/get_model_info")
    return int(info["context_length"]) if isinstance(info, dict) and info.get("context_length") else None


class HttpBackend:
    """Client of an OpenAI-compatible ``/v1/completions`` endpoint (SGLang, vLLM, ...), stdlib only.

    Parameters
    ----------
    url : str
        Server root, e.g. ``http://127.0.0.1:30000`` (a trailing ``/v1`` or ``/`` is dropped).
    model : str, optional
        ``model`` field of the requests; default: the first id of ``GET /v1/models``, else ``"default"``.
    timeout : float
        Seconds per HTTP request (a long prompt's prefill included).
    retries : int
        Further attempts after a connection error, a timeout or HTTP 408/429/5xx; other HTTP errors fail at once.
    backoff : float
        Seconds before the first retry; doubled each time.
    tokenizer : str
        ``"server"``: count tokens with the server's ``POST /v1/tokenize``; otherwise a local tokenizer directory
        or name for ``transformers.AutoTokenizer``.
    """

    name = "http"

    def __init__(
        self,
        url: str,
        *,
        model: Optional[str] = None,
        timeout: float = 600.0,
        retries: int = 3,
        backoff: float = 1.0,
        tokenizer: str = "server",
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"url: expected http://host:port or https://..., got {url!r}")
        if timeout <= 0:
            raise ValueError(f"timeout: expected > 0 seconds, got {timeout!r}")
        if retries < 0:
            raise ValueError(f"retries: expected >= 0, got {retries!r}")
        if backoff < 0:
            raise ValueError(f"backoff: expected >= 0 seconds, got {backoff!r}")
        url = url.rstrip("/")
        if url.endswith("/v1"):
            url = url[: -len("/v1")]
        self.url = url
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.tokenizer = tokenizer
        self._local_tok: Any = None
        if tokenizer != "server":
            from transformers import AutoTokenizer

            self._local_tok = AutoTokenizer.from_pretrained(tokenizer)
        self.model = model or self._default_model()

    # --- transport ---------------------------------------------------------------------------------------------------
    def request(
        self, method: str, path: str, payload: Optional[Dict[str, Any]] = None, *, retries: Optional[int] = None
    ) -> Any:
        """``method`` ``path`` with a JSON body; the decoded JSON answer. ``retries`` overrides the client's.

        Raises
        ------
        HttpError
            Names the method, URL, attempts and the server's status and message (or the network error).
        """
        url = self.url + path
        data = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        retries = self.retries if retries is None else retries
        attempts = retries + 1
        last = ""
        for attempt in range(1, attempts + 1):
            req = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    body = resp.read()
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:500].strip()
                last = f"HTTP {e.code} {e.reason}: {detail}"
                if e.code not in RETRY_STATUS:
                    raise HttpError(f"{method} {url}: {last}") from None
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout,
                    OSError) as e:
                reason = getattr(e, "reason", e)
                kind = "timed out" if isinstance(reason, (TimeoutError, socket.timeout)) else "connection failed"
                last = f"{kind} ({type(reason).__name__}: {reason}; timeout {self.timeout:g}s)"
            else:
                try:
                    return json.loads(body)
                except json.JSONDecodeError:
                    raise HttpError(f"{method} {url}: expected a JSON answer, got {body[:200]!r}") from None
            if attempt < attempts:
                delay = self.backoff * 2 ** (attempt - 1)
                logger.warning("%s %s: %s; retry %d/%d in %.1fs", method, url, last, attempt, retries, delay)
                time.sleep(delay)
        raise HttpError(f"{method} {url}: failed after {attempts} attempt(s): {last}")

    def _get_optional(self, path: str) -> Optional[Any]:
        """``GET path`` or ``None`` when the server does not offer it (no retries)."""
        try:
            return self.request("GET", path, retries=0)
        except HttpError as e:
            logger.debug("GET %s not available: %s", path, e)
            return None

    def _default_model(self) -> str:
        models = self._get_optional("/v1/models")
        try:
            return str(models["data"][0]["id"])  # type: ignore[index]
        except (TypeError, KeyError, IndexError):
            return "default"

    # --- backend interface -------------------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` without special tokens (server ``/v1/tokenize`` or the local tokenizer)."""
        if self._local_tok is not None:
            return len(self._local_tok(text, add_special_tokens=False).input_ids)
        out = self.request("POST", "/v1/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False})
        try:
            return int(out["count"])
        except (TypeError, KeyError, ValueError):
            raise HttpError(f"POST {self.url}/v1/tokenize: expected {{'count': int, ...}}, got {str(out)[:200]}")

    def complete(self, prompt: str, max_tokens: int) -> Completion:
        """Greedy completion of ``prompt`` (``temperature 0``, at most ``max_tokens`` tokens)."""
        payload = {"model": self.model, "prompt": prompt, "max_tokens": int(max_tokens), "temperature": 0.0}
        out = self.request("POST", "/v1/completions", payload)
        try:
            choice = out["choices"][0]
            text = choice["text"]
            if not isinstance(text, str):
                raise TypeError(type(text).__name__)
        except (TypeError, KeyError, IndexError) as e:
            raise HttpError(
                f"POST {self.url}/v1/completions: expected choices[0].text (str), got {str(out)[:300]} ({e})"
            ) from None
        usage = out.get("usage") or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        return Completion(text, usage.get("prompt_tokens"), usage.get("completion_tokens"), choice.get("finish_reason"),
                          cached)

    def describe(self) -> Dict[str, Any]:
        """What the server says about itself: ``/get_server_info`` (SGLang) and ``/v1/models``, where offered."""
        return {
            "url": self.url,
            "model": self.model,
            "tokenizer": self.tokenizer,
            "server_info": self._get_optional("/get_server_info"),
            "models": self._get_optional("/v1/models"),
        }


# =====================================================================================================================
# transformers backend (CPU smoke path)
# =====================================================================================================================
class TransformersBackend:
    """SmolLM2-135M-Instruct run locally with transformers (fp32, CPU), greedy, one sample at a time.

    Parameters
    ----------
    cache_dir : path, optional
        Model cache of :mod:`bench.smollm2` (fetched and converted on first use).
    threads : int
        ``torch.set_num_threads`` (0: torch's choice).
    """

    name = "transformers"

    def __init__(self, cache_dir: Optional[str] = None, threads: int = 0) -> None:
        from bench.smollm2 import load_cpu_model

        self.model, self.tok = load_cpu_model(cache_dir, threads)
        self._lock = threading.Lock()

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` without special tokens."""
        return len(self.tok(text, add_special_tokens=False).input_ids)

    def complete(self, prompt: str, max_tokens: int) -> Completion:
        """Greedy completion: the new tokens decoded, stopping at end of sequence or after ``max_tokens``."""
        import torch
        from transformers import GenerationConfig

        enc = self.tok(prompt, return_tensors="pt")
        n = int(enc.input_ids.shape[1])
        eos = self.tok.eos_token_id
        cfg = GenerationConfig(
            do_sample=False, max_new_tokens=int(max_tokens), eos_token_id=eos, pad_token_id=eos
        )
        with self._lock, torch.inference_mode():
            out = self.model.generate(**enc, generation_config=cfg)
        new = out[0, n:].tolist()
        stopped = bool(new) and new[-1] == eos
        text = self.tok.decode(new, skip_special_tokens=True)
        return Completion(text, n, len(new), "stop" if stopped or len(new) < max_tokens else "length")

    def describe(self) -> Dict[str, Any]:
        import torch

        from bench.smollm2 import cpu_model_info

        return {**cpu_model_info(), "torch_threads": torch.get_num_threads()}


# =====================================================================================================================
# suite
# =====================================================================================================================
NUMBER_TASKS = frozenset({"niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"})


def answer_part(output: str) -> str:
    """The part of ``output`` that is scored: leading white space dropped, cut at the first blank line."""
    return output.lstrip().split("\n\n", 1)[0]


def score_output(sample: RulerSample, output: str) -> Dict[str, Any]:
    """Score one output (see the module docstring).

    Returns
    -------
    dict
        ``answer`` (the scored part), ``score`` (fraction of expected values found in it), ``numbers`` (needle tasks:
        the first ``k`` distinct numbers of the expected length in the answer, ``k`` = number of expected values;
        else ``None``) and ``correct``.
    """
    answer = answer_part(output)
    score = sample.score(answer)
    numbers: Optional[List[str]] = None
    if sample.task in NUMBER_TASKS:
        k, digits = len(sample.answers), len(sample.answers[0])
        found = re.findall(rf"(?<!\d)\d{{{digits}}}(?!\d)", answer)
        numbers = list(dict.fromkeys(found))[:k]
        correct = sorted(numbers) == sorted(sample.answers)
    else:
        correct = score == 1.0
    return {"answer": answer, "score": score, "numbers": numbers, "correct": correct}


@dataclass(frozen=True)
class Item:
    """A generated sample with the length bucket it belongs to and its answer budget."""

    length: int
    max_tokens: int
    sample: RulerSample


def build_samples(
    tasks: Sequence[str],
    lengths: Sequence[int],
    num_samples: int,
    seed: int,
    count_tokens: Callable[[str], int],
    *,
    max_tokens: Optional[Dict[str, int]] = None,
    workers: int = 1,
    **generate_kwargs: Any,
) -> List[Item]:
    """Every (length, task, index) sample, in that order.

    Parameters
    ----------
    tasks, lengths : sequence
        Tasks of :data:`bench.ruler.TASKS`; lengths ``L`` in tokens (prompt + answer budget, see the module doc).
    num_samples, seed : int
        Samples per task and length, and the suite's seed (sample ``i`` of a task and length is the same for every
        backend and configuration with the same tokenizer).
    count_tokens : callable
        ``str -> int`` of the model's tokenizer (without special tokens).
    max_tokens : dict, optional
        Answer budget per task (default :data:`MAX_TOKENS`).
    workers : int
        Samples generated in parallel (useful when ``count_tokens`` is a server round trip).
    **generate_kwargs
        Passed to :func:`bench.ruler.generate` (``haystack``, ``digits``, ...).
    """
    budget = dict(MAX_TOKENS if max_tokens is None else max_tokens)
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"tasks: expected names from {TASKS}, got {t!r}")
        if budget.get(t, 0) < 1:
            raise ValueError(f"max_tokens[{t!r}]: expected >= 1, got {budget.get(t)!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples: expected >= 1, got {num_samples!r}")
    specs = [(L, t, i) for L in lengths for t in tasks for i in range(num_samples)]
    for L, t, _ in specs:
        if L - budget[t] - RESERVE < 64:
            raise ValueError(f"lengths: expected >= {budget[t] + RESERVE + 64} for task {t!r}, got {L}")

    def one(spec: Tuple[int, str, int]) -> Item:
        L, t, i = spec
        target = L - budget[t] - RESERVE
        s = generate(t, target_tokens=target, seed=seed, index=i, count_tokens=count_tokens, **generate_kwargs)
        return Item(L, budget[t], s)

    if workers <= 1:
        return [one(s) for s in specs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, specs))


def _fmt_eta(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def run_samples(
    backend: Any,
    items: Sequence[Item],
    *,
    concurrency: int = 1,
    progress: Optional[Callable[[str], None]] = None,
) -> List[Dict[str, Any]]:
    """Query ``backend.complete`` for every item (``concurrency`` at a time) and score the answers.

    Returns one record per item, in the order of ``items``. ``progress`` receives one line per finished sample:
    ``[done/total] ok|MISS task length #index, tokens, seconds | correct so far | ETA``.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency: expected >= 1, got {concurrency!r}")
    records: List[Optional[Dict[str, Any]]] = [None] * len(items)
    t0 = time.perf_counter()
    done = correct = 0

    def one(k: int) -> Dict[str, Any]:
        it = items[k]
        s = it.sample
        t = time.perf_counter()
        c = backend.complete(s.prompt, it.max_tokens)
        scored = score_output(s, c.text)
        return {
            "task": s.task,
            "length": it.length,
            "index": s.index,
            "seed": s.seed,
            "target_tokens": s.target_tokens,
            "prompt_tokens": s.num_tokens,
            "server_prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "finish_reason": c.finish_reason,
            "max_tokens": it.max_tokens,
            "expected": list(s.answers),
            "output": c.text,
            "answer": scored["answer"],
            "score": scored["score"],
            "numbers": scored["numbers"],
            "correct": scored["correct"],
            "seconds": round(time.perf_counter() - t, 3),
        }

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = {pool.submit(one, k): k for k in range(len(items))}
        try:
            for fut in as_completed(futures):
                k = futures[fut]
                rec = fut.result()
                records[k] = rec
                done += 1
                correct += int(rec["correct"])
                if progress is not None:
                    el = time.perf_counter() - t0
                    eta = el / done * (len(items) - done)
                    progress(
                        f"[{done:>{len(str(len(items)))}}/{len(items)}] {'ok  ' if rec['correct'] else 'MISS'} "
                        f"{rec['task']:<15} {rec['length']:>6} #{rec['index']:<3} {rec['prompt_tokens']:>6} tok "
                        f"{rec['seconds']:6.1f}s | {correct}/{done} correct | ETA {_fmt_eta(eta)} | "
                        f"{rec['answer'][:60]!r}"
                    )
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return [r for r in records if r is not None]


def summarize(records: Sequence[Dict[str, Any]], tasks: Sequence[str], lengths: Sequence[int]) -> Dict[str, Any]:
    """Accuracies (fractions in ``[0, 1]``) per task and length, per task, per length, and on average.

    ``average`` is the mean over the (task, length) cells that have samples, so every task and length weighs the
    same however many samples each has; ``correct`` and ``total`` count samples.
    """
    cells: Dict[str, Dict[str, List[bool]]] = {t: {str(L): [] for L in lengths} for t in tasks}
    for r in records:
        cells.setdefault(r["task"], {}).setdefault(str(r["length"]), []).append(bool(r["correct"]))

    def mean(xs: Sequence[float]) -> Optional[float]:
        return sum(xs) / len(xs) if xs else None

    by_cell = {t: {L: mean(v) for L, v in per.items()} for t, per in cells.items()}
    by_task = {t: mean([a for a in per.values() if a is not None]) for t, per in by_cell.items()}
    by_length = {
        str(L): mean([by_cell[t][str(L)] for t in by_cell if by_cell[t].get(str(L)) is not None])  # type: ignore[misc]
        for L in lengths
    }
    flat = [a for per in by_cell.values() for a in per.values() if a is not None]
    return {
        "accuracy": by_cell,
        "task_average": by_task,
        "length_average": by_length,
        "average": mean(flat),
        "correct": sum(int(r["correct"]) for r in records),
        "total": len(records),
    }


def markdown_table(summary: Dict[str, Any], label: str) -> str:
    """Per-task rows, per-length columns, in percent."""
    lengths = list(summary["length_average"])
    lines = [
        f"| {label} | " + " | ".join(lengths) + " | task avg |",
        "|---|" + "---:|" * (len(lengths) + 1),
    ]

    def pct(x: Optional[float]) -> str:
        return "" if x is None else f"{100 * x:.1f}"

    for t, per in summary["accuracy"].items():
        row = " | ".join(pct(per.get(L)) for L in lengths)
        lines.append(f"| {t} | {row} | {pct(summary['task_average'][t])} |")
    lines.append(
        "| **average** | " + " | ".join(pct(summary["length_average"][L]) for L in lengths)
        + f" | **{pct(summary['average'])}** |"
    )
    return "\n".join(lines)


def environment() -> Dict[str, Any]:
    """Python, platform and CPU count of the machine that ran the client."""
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "host": platform.node()}


def setup_logging(verbose: bool) -> None:
    """Timestamped progress lines on stdout (DEBUG with ``verbose``), the HTTP and model libraries' own quieted."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout)
    for noisy in ("transformers", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def check_label(parser: argparse.ArgumentParser, label: Optional[str]) -> None:
    """``--label`` names result files: refuse an empty one or one with slashes or newlines (exits via ``parser``)."""
    if not label or any(c in label for c in "/\\\n"):
        parser.error(f"--label: expected a non-empty name without slashes or newlines, got {label!r}")


def write_result(out: Dict[str, Any], path: "str | Path", table: str) -> Path:
    """Write the JSON result ``out`` to ``path`` (folders made), then print ``table`` (markdown); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    sys.stdout.write("\n" + table + "\n\n")
    return path


# =====================================================================================================================
# CLI
# =====================================================================================================================
def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.accuracy",
        description="RULER-style accuracy (exact match) of a served model (OpenAI-compatible /v1/completions, e.g. "
        "SGLang with or without MosaicKV) or of SmolLM2-135M-Instruct on the CPU (--backend transformers).",
    )
    p.add_argument("--backend", choices=["http", "transformers"], default="http",
                   help="http: query --url (default); transformers: SmolLM2 locally on the CPU")
    p.add_argument("--url", default="http://127.0.0.1:30000", help="server root (default http://127.0.0.1:30000)")
    p.add_argument("--model", default=None, help="model name sent to the server (default: first of /v1/models)")
    p.add_argument("--label", default=None,
                   help="name of the configuration (dense, fp8, mosaic-3x, ...), used by bench.accuracy_report "
                   "(default: the backend name)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="tasks (default: all)")
    p.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS),
                   help="lengths in tokens, prompt + answer budget (default 2048 4096 6144 8192)")
    p.add_argument("--samples", type=int, default=10, help="samples per task and length (default 10)")
    p.add_argument("--seed", type=int, default=0, help="suite seed (default 0)")
    p.add_argument("--haystack", choices=["noise", "words"], default="noise",
                   help="filler of the needle and vt tasks (default noise, RULER's repeated sentences)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="answer budget for every task (default per task: "
                   + ", ".join(f"{k} {v}" for k, v in MAX_TOKENS.items()) + ")")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight (http; default 8)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per HTTP request (default 600)")
    p.add_argument("--retries", type=int, default=3,
                   help="retries after connection errors, timeouts and HTTP 408/429/5xx (default 3)")
    p.add_argument("--tokenizer", default="server",
                   help="http: 'server' counts tokens with the server's /v1/tokenize (default), or a local tokenizer "
                   "directory for transformers.AutoTokenizer")
    p.add_argument("--threads", type=int, default=0, help="torch threads (transformers; default: torch's choice)")
    p.add_argument("--cache-dir", default=None, help="SmolLM2 cache (default $MOSAICKV_CACHE or ~/.cache/mosaickv)")
    p.add_argument("--out", default=None, help="JSON results (default bench/results/accuracy-<label>.json)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-sample lines, only a summary")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.samples < 1:
        p.error(f"--samples: expected >= 1, got {args.samples}")
    if args.concurrency < 1:
        p.error(f"--concurrency: expected >= 1, got {args.concurrency}")
    if args.max_tokens is not None and args.max_tokens < 1:
        p.error(f"--max-tokens: expected >= 1, got {args.max_tokens}")
    if args.label is None:
        args.label = args.backend
    check_label(p, args.label)
    if args.out is None:
        args.out = f"bench/results/accuracy-{args.label}.json"
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    setup_logging(args.verbose)
    t_start = time.perf_counter()
    backend: Any
    if args.backend == "http":
        backend = HttpBackend(args.url, model=args.model, timeout=args.timeout, retries=args.retries,
                              tokenizer=args.tokenizer)
        concurrency = args.concurrency
    else:
        backend = TransformersBackend(args.cache_dir, args.threads)
        concurrency = 1
    info = backend.describe()
    budget = {t: args.max_tokens or MAX_TOKENS[t] for t in args.tasks}
    t_gen = time.perf_counter()
    items = build_samples(args.tasks, args.lengths, args.samples, args.seed, backend.count_tokens,
                          max_tokens=budget, workers=concurrency, haystack=args.haystack)
    logger.info("%s: %d samples (%d tasks x %d lengths x %d) generated in %.1fs; %d in flight", args.label,
                len(items), len(args.tasks), len(args.lengths), args.samples, time.perf_counter() - t_gen, concurrency)
    records = run_samples(backend, items, concurrency=concurrency, progress=None if args.quiet else logger.info)
    summary = summarize(records, args.tasks, args.lengths)
    out = {
        "schema": SCHEMA,
        "label": args.label,
        "command": "python -m bench.accuracy " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "backend": args.backend,
            "url": args.url if args.backend == "http" else None,
            "model": getattr(backend, "model", None) if args.backend == "http" else "SmolLM2-135M-Instruct",
            "tasks": list(args.tasks),
            "lengths": list(args.lengths),
            "samples": args.samples,
            "seed": args.seed,
            "haystack": args.haystack,
            "max_tokens": budget,
            "reserve": RESERVE,
            "concurrency": concurrency,
            "tokenizer": args.tokenizer if args.backend == "http" else "model",
        },
        "backend_info": info,
        "environment": environment(),
        "seconds": round(time.perf_counter() - t_start, 1),
        "summary": summary,
        "records": records,
    }
    path = write_result(out, args.out, markdown_table(summary, args.label))
    sys.stdout.write(f"{args.label}: {summary['correct']}/{summary['total']} correct, average "
                     f"{100 * (summary['average'] or 0):.1f}%; wrote {path} in {out['seconds']:.0f}s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
