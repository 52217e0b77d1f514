# SPDX-License-Identifier: Apache-2.0
"""Shared-prefix accuracy: several questions about one long context, asked one after another over HTTP.

The workload for "accuracy with and without re-segmentation at equal bytes" (issue #5). MosaicKV re-plans
(re-segments) the compressed KV pages that a *second* request reads through the radix cache, on idle scheduler ticks.
So each context here is read by several requests in turn: a ``niah_multikey`` sample of :mod:`bench.ruler` (four
needles ``"One of the special magic numbers for K is: V."`` with four keys) and one question per key
(:func:`bench.ruler.multikey_questions`, each built as the suite's own query but for its key). The questions of a
context are sent **sequentially**: question ``k + 1`` leaves after the answer to question ``k`` and ``--reader-pause``
seconds of idle time (default 1.0), so that the server's idle ticks can re-plan the shared pages between readers.
Contexts run one at a time by default (``--concurrency`` lets a few run side by side, each still sequential).

The first question is the suite's own ``niah_multikey`` sample (same seed, length and tokenizer give the same
prompt) unless a longer key's question would not fit: then the context is regenerated shorter by the excess, so that
every question's prompt stays within ``L - max_tokens - RESERVE`` tokens, as in :mod:`bench.accuracy`.

Generation is greedy (``temperature 0``, :data:`bench.accuracy.MAX_TOKENS` ``["niah_multikey"]`` tokens) and every
answer is scored by :func:`bench.accuracy.score_output` (exact match of the key's value). The report gives accuracy
per reader (1st, 2nd, ... question of a context), per length and overall, and the mean ``cached_tokens`` per reader:
the prompt tokens the server took from its prefix cache, read from ``usage.prompt_tokens_details.cached_tokens`` of
``/v1/completions`` (SGLang reports it when launched with ``--enable-cache-report``; ``None`` otherwise). On a fresh
server the later readers show about the context length (the prefix was reused) and the first reader only the start
that contexts have in common: the instruction and, with the default ``--haystack noise``, the filler up to the first
needle (RULER's repeated sentences are the same in every context); ``--haystack words`` makes contexts disjoint
after the instruction.

The JSON (``--out``, schema :data:`SCHEMA`) holds the label, command, configuration, server information, a summary
and one record per question (length, sample index, reader, key, needle depth, prompt tokens, cached tokens, expected,
output, correct, send time).

Run against a server (``$M`` the model's tokenizer directory; or leave ``--tokenizer`` out to count tokens with the
server's ``/v1/tokenize``)::

    python -m bench.shared_context --url http://127.0.0.1:30000 --label mosaic-reseg --lengths 2048 4096 \\
        --samples 4 --tokenizer $M --out bench/results/shared-mosaic-reseg.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from bench.accuracy import (DEFAULT_LENGTHS, MAX_TOKENS, RESERVE, HttpBackend, _fmt_eta, check_label, environment,
                            score_output, setup_logging, write_result)
from bench.ruler import RulerSample, generate, multikey_questions

logger = logging.getLogger("bench.shared_context")

__all__ = ["SCHEMA", "TASK", "Context", "build_contexts", "ask_context", "run_contexts", "summarize", "main"]

SCHEMA = "mosaickv.shared_context/1"
TASK = "niah_multikey"


@dataclass(frozen=True)
class Context:
    """One shared context and its questions.

    ``questions[k]`` is the sample with the ``k``-th key's query and answers (same ``context``); ``prompt_tokens[k]``
    its prompt length in tokens of the run's tokenizer.
    """

    length: int
    max_tokens: int
    sample: RulerSample
    questions: Tuple[RulerSample, ...]
    prompt_tokens: Tuple[int, ...]


def build_contexts(
    lengths: Sequence[int],
    num_samples: int,
    seed: int,
    count_tokens: Callable[[str], int],
    *,
    max_tokens: int = MAX_TOKENS[TASK],
    workers: int = 1,
    **generate_kwargs: Any,
) -> List[Context]:
    """Every (length, index) context with its questions, in that order (see the module doc for the lengths)."""
    if num_samples < 1:
        raise ValueError(f"num_samples: expected >= 1, got {num_samples!r}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens: expected >= 1, got {max_tokens!r}")
    for L in lengths:
        if L - max_tokens - RESERVE < 128:
            raise ValueError(f"lengths: expected >= {max_tokens + RESERVE + 128}, got {L}")

    def one(spec: Tuple[int, int]) -> Context:
        L, i = spec
        bound = target = L - max_tokens - RESERVE
        while True:
            s = generate(TASK, target_tokens=target, seed=seed, index=i, count_tokens=count_tokens, **generate_kwargs)
            qs = tuple(dataclasses.replace(s, query=q, answers=a) for q, a in multikey_questions(s))
            tokens = tuple(count_tokens(q.prompt) for q in qs)
            if max(tokens) <= bound:
                return Context(L, max_tokens, s, qs, tokens)
            target -= max(tokens) - bound

    specs = [(L, i) for L in lengths for i in range(num_samples)]
    if workers <= 1:
        return [one(s) for s in specs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, specs))


def _depth(sample: RulerSample, k: int) -> float:
    """Relative depth in the haystack of the needle of ``meta["keys"][k]``."""
    order: List[int] = sample.meta["needle_order"]  # type: ignore[assignment]
    return round(sample.meta["depths"][order.index(k)], 4)  # type: ignore[index]


def ask_context(backend: Any, ctx: Context, *, pause: float = 1.0, t0: Optional[float] = None) -> List[Dict[str, Any]]:
    """Ask ``ctx``'s questions one after another, ``pause`` seconds apart (after each answer); one record each.

    ``sent`` in a record is the send time in seconds since ``t0`` (``time.perf_counter()`` value; default: now).
    """
    if pause < 0:
        raise ValueError(f"pause: expected >= 0 seconds, got {pause!r}")
    t0 = time.perf_counter() if t0 is None else t0
    records = []
    for k, (q, tokens) in enumerate(zip(ctx.questions, ctx.prompt_tokens)):
        if k:
            time.sleep(pause)
        t = time.perf_counter()
        c = backend.complete(q.prompt, ctx.max_tokens)
        scored = score_output(q, c.text)
        records.append({
            "length": ctx.length, "index": q.index, "seed": q.seed, "reader": k + 1, "key": q.meta["keys"][k],
            "depth": _depth(q, k), "prompt_tokens": tokens, "server_prompt_tokens": c.prompt_tokens,
            "cached_tokens": c.cached_tokens, "completion_tokens": c.completion_tokens,
            "finish_reason": c.finish_reason, "max_tokens": ctx.max_tokens, "expected": list(q.answers),
            "output": c.text, "answer": scored["answer"], "numbers": scored["numbers"], "correct": scored["correct"],
            "sent": round(t - t0, 3), "seconds": round(time.perf_counter() - t, 3),
        })
    return records


def run_contexts(
    backend: Any,
    contexts: Sequence[Context],
    *,
    pause: float = 1.0,
    concurrency: int = 1,
    progress: Optional[Callable[[str], None]] = None,
) -> List[Dict[str, Any]]:
    """:func:`ask_context` for every context, ``concurrency`` contexts at a time; records in context order.

    ``progress`` receives one line per finished context: ``[done/total] length #index, tokens, ok/MISS per reader,
    cached tokens per reader, seconds | correct so far | ETA``.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency: expected >= 1, got {concurrency!r}")
    if pause < 0:
        raise ValueError(f"pause: expected >= 0 seconds, got {pause!r}")
    t0 = time.perf_counter()
    done = correct = asked = 0
    results: List[List[Dict[str, Any]]] = []
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(ask_context, backend, c, pause=pause, t0=t0) for c in contexts]
        try:
            for fut in futures:  # in order: a context's line waits for those before it
                recs = fut.result()
                results.append(recs)
                done += 1
                correct += sum(r["correct"] for r in recs)
                asked += len(recs)
                if progress is not None:
                    el = time.perf_counter() - t0
                    marks = " ".join("ok" if r["correct"] else "MISS" for r in recs)
                    cached = " ".join("-" if r["cached_tokens"] is None else str(r["cached_tokens"]) for r in recs)
                    progress(
                        f"[{done:>{len(str(len(contexts)))}}/{len(contexts)}] {recs[0]['length']:>6} "
                        f"#{recs[0]['index']:<3} {max(r['prompt_tokens'] for r in recs):>6} tok | {marks} | cached "
                        f"{cached} | {sum(r['seconds'] for r in recs):6.1f}s | {correct}/{asked} correct | "
                        f"ETA {_fmt_eta(el / done * (len(contexts) - done))}"
                    )
        except BaseException:
            for f in futures:
                f.cancel()
            raise
    return [r for recs in results for r in recs]


def summarize(records: Sequence[Dict[str, Any]], lengths: Sequence[int]) -> Dict[str, Any]:
    """Accuracy per reader (``"1"``, ``"2"``, ...), per length and reader, overall; mean cached tokens per reader.

    ``cached_tokens`` per reader is the mean over the responses that reported it (``None`` if none did);
    ``cache_reported`` counts those responses.
    """

    def mean(xs: Sequence[float]) -> Optional[float]:
        return sum(xs) / len(xs) if xs else None

    readers = sorted({r["reader"] for r in records})
    by_length: Dict[str, Dict[str, Optional[float]]] = {}
    for L in lengths:
        recs = [r for r in records if r["length"] == L]
        by_length[str(L)] = {str(k): mean([r["correct"] for r in recs if r["reader"] == k]) for k in readers}
        by_length[str(L)]["all"] = mean([r["correct"] for r in recs])
    cached = [r for r in records if r["cached_tokens"] is not None]
    return {
        "accuracy": mean([r["correct"] for r in records]),
        "by_reader": {str(k): mean([r["correct"] for r in records if r["reader"] == k]) for k in readers},
        "by_length": by_length,
        "cached_tokens": {str(k): mean([r["cached_tokens"] for r in cached if r["reader"] == k]) for k in readers},
        "cache_reported": len(cached),
        "correct": sum(int(r["correct"]) for r in records),
        "total": len(records),
    }


def markdown_table(summary: Dict[str, Any], label: str) -> str:
    """Rows: readers and all; columns: lengths, all, mean cached tokens (percent accuracies)."""
    lengths = list(summary["by_length"])

    def pct(x: Optional[float]) -> str:
        return "" if x is None else f"{100 * x:.1f}"

    lines = [f"| {label}: reader | " + " | ".join(lengths) + " | all | cached tokens |",
             "|---|" + "---:|" * (len(lengths) + 2)]
    for k, acc in summary["by_reader"].items():
        c = summary["cached_tokens"][k]
        row = " | ".join(pct(summary["by_length"][L][k]) for L in lengths)
        lines.append(f"| {k} | {row} | {pct(acc)} | {'' if c is None else f'{c:.0f}'} |")
    row = " | ".join(pct(summary["by_length"][L]["all"]) for L in lengths)
    lines.append(f"| **all** | {row} | **{pct(summary['accuracy'])}** | |")
    return "\n".join(lines)


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.shared_context",
        description="Shared-prefix accuracy: per niah_multikey context, one question per key, sent one after another "
        "(with --reader-pause seconds between them) to an OpenAI-compatible server, so later questions reuse the "
        "cached context; exact match per reader and the server's cached_tokens.",
    )
    p.add_argument("--url", default="http://127.0.0.1:30000", help="server root (default http://127.0.0.1:30000)")
    p.add_argument("--model", default=None, help="model name sent to the server (default: first of /v1/models)")
    p.add_argument("--label", default="shared", help="name of the configuration (default shared)")
    p.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS),
                   help="lengths in tokens, prompt + answer budget (default 2048 4096 6144 8192)")
    p.add_argument("--samples", type=int, default=4, help="contexts per length (default 4)")
    p.add_argument("--seed", type=int, default=0, help="suite seed (default 0)")
    p.add_argument("--haystack", choices=["noise", "words"], default="noise", help="filler (default noise)")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS[TASK],
                   help=f"answer budget per question (default {MAX_TOKENS[TASK]})")
    p.add_argument("--reader-pause", type=float, default=1.0,
                   help="idle seconds between one question's answer and the next question (default 1.0)")
    p.add_argument("--concurrency", type=int, default=1, help="contexts in flight, each sequential (default 1)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per HTTP request (default 600)")
    p.add_argument("--retries", type=int, default=3,
                   help="retries after connection errors, timeouts and HTTP 408/429/5xx (default 3)")
    p.add_argument("--tokenizer", default="server",
                   help="'server' counts tokens with the server's /v1/tokenize (default), or a local tokenizer "
                   "directory for transformers.AutoTokenizer")
    p.add_argument("--out", default=None, help="JSON results (default bench/results/shared-context-<label>.json)")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-context lines, only a summary")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    for name, value, low in (("--samples", args.samples, 1), ("--concurrency", args.concurrency, 1),
                             ("--max-tokens", args.max_tokens, 1), ("--reader-pause", args.reader_pause, 0)):
        if value < low:
            p.error(f"{name}: expected >= {low}, got {value}")
    check_label(p, args.label)
    if args.out is None:
        args.out = f"bench/results/shared-context-{args.label}.json"
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse_args(argv)
    setup_logging(args.verbose)
    t_start = time.perf_counter()
    backend = HttpBackend(args.url, model=args.model, timeout=args.timeout, retries=args.retries,
                          tokenizer=args.tokenizer)
    info = backend.describe()
    contexts = build_contexts(args.lengths, args.samples, args.seed, backend.count_tokens, max_tokens=args.max_tokens,
                              workers=4, haystack=args.haystack)
    logger.info("%s: %d contexts x %d questions, %.1fs apart; %d context(s) in flight", args.label, len(contexts),
                len(contexts[0].questions), args.reader_pause, args.concurrency)
    records = run_contexts(backend, contexts, pause=args.reader_pause, concurrency=args.concurrency,
                           progress=None if args.quiet else logger.info)
    summary = summarize(records, args.lengths)
    out = {
        "schema": SCHEMA,
        "label": args.label,
        "command": "python -m bench.shared_context " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "url": args.url, "model": backend.model, "task": TASK, "lengths": list(args.lengths),
            "samples": args.samples, "seed": args.seed, "haystack": args.haystack, "max_tokens": args.max_tokens,
            "reserve": RESERVE, "reader_pause": args.reader_pause, "concurrency": args.concurrency,
            "tokenizer": args.tokenizer, "temperature": 0.0,
        },
        "backend_info": info,
        "environment": environment(),
        "seconds": round(time.perf_counter() - t_start, 1),
        "summary": summary,
        "records": records,
    }
    path = write_result(out, args.out, markdown_table(summary, args.label))
    sys.stdout.write(f"{args.label}: {summary['correct']}/{summary['total']} correct "
                     f"({100 * (summary['accuracy'] or 0):.1f}%), {summary['cache_reported']} responses with "
                     f"cached_tokens; wrote {path} in {out['seconds']:.0f}s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
