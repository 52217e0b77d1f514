# SPDX-License-Identifier: Apache-2.0
"""Rank the functions of a scheduler's sampled stacks (``MOSAICKV_STACK_SAMPLES``, ``mosaickv_sglang.stack_sampler``).

``python -m bench.stack_summary PATH``: the samples' total, then the functions seen in most samples (inclusive: once
per sample whatever the depth) and the leaves (where the thread was: the Python line that waited or computed), each as
a share of all samples (a leaf names the line the thread was on, ``function (file:first line) @line``, as the
sampler writes it; inclusive counts are per function). ``--under TEXT`` keeps the samples with a frame containing
``TEXT`` (``run_batch``, ``process_batch_result``, ``init_forward_metadata``...), shares still of all samples;
``--minus EARLIER`` subtracts an earlier copy of the same file (the file holds the counts since the server started: a
copy taken before a load and one after it give the load's samples); ``--json`` prints one object.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from bench.textio import read_text
from mosaickv_sglang.stack_sampler import collapsed_text


def read_collapsed(text: str) -> Counter:
    """``{stack: count}`` from collapsed-stack lines (``frame;...;leaf count``; blank lines skipped)."""
    counts: Counter = Counter()
    for n, line in enumerate(text.splitlines(), 1):
        line = line.rstrip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            value = int(count)
        except ValueError:
            value = -1
        if not stack or value < 0:
            raise ValueError(f"line {n}: expected 'frame;...;frame count', got {line[:120]!r}")
        counts[stack] += value
    return counts


def subtract(later: Counter, earlier: Counter) -> Counter:
    """The samples counted after ``earlier`` was written: ``later - earlier`` stack by stack."""
    if any(later.get(stack, 0) < n for stack, n in earlier.items()):
        raise ValueError("--minus: expected an earlier copy of the same file, got a stack with more samples")
    return Counter({stack: n - earlier.get(stack, 0) for stack, n in later.items() if n > earlier.get(stack, 0)})


def _function(frame: str) -> str:
    """A frame's function label, without the line the sampler adds to a leaf (``f (a/b.py:10) @12``)."""
    head, sep, line = frame.rpartition(" @")
    return head if sep and line.isdigit() else frame


def summarize(counts: Counter, top: int = 25, under: Optional[str] = None) -> Dict[str, object]:
    """Total samples, the samples kept by ``under`` and the ``top`` functions by inclusive and by leaf samples, as
    ``[label, samples, share of all samples]``."""
    total = sum(counts.values())
    inclusive: Counter = Counter()
    leaves: Counter = Counter()
    kept = 0
    for stack, n in counts.items():
        frames = stack.split(";")
        if under is not None and not any(under in f for f in frames):
            continue
        kept += n
        leaves[frames[-1]] += n
        for f in {_function(f) for f in frames}:
            inclusive[f] += n

    def rows(c: Counter) -> List[Tuple[str, int, float]]:
        return [(label, n, n / total if total else 0.0) for label, n in c.most_common(top)]

    return {"samples": total, "under": under, "kept": kept, "inclusive": rows(inclusive), "leaves": rows(leaves)}


def _table(title: str, rows: Sequence[Tuple[str, int, float]]) -> str:
    out = [title]
    out += [f"  {share * 100:6.2f}%  {n:8d}  {label}" for label, n, share in rows]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.stack_summary", description=__doc__.split("\n\n")[0])
    ap.add_argument("path", type=Path, help="collapsed stacks written by a server run with MOSAICKV_STACK_SAMPLES")
    ap.add_argument("--top", type=int, default=25, help="functions listed per table (default 25)")
    ap.add_argument("--under", default=None, help="keep only the samples with a frame containing this text")
    ap.add_argument("--minus", type=Path, default=None, help="an earlier copy of the file: count only what came after")
    ap.add_argument("--write", type=Path, default=None, metavar="OUT",
                    help="also write the samples counted (after --minus) to OUT, collapsed, most frequent first")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = ap.parse_args(argv)
    if args.top < 1:
        ap.error(f"--top: expected an integer >= 1, got {args.top}")
    try:
        counts = read_collapsed(read_text(args.path))
        if args.minus is not None:
            counts = subtract(counts, read_collapsed(read_text(args.minus)))
    except (OSError, ValueError) as err:
        print(f"stack_summary: {args.path}: {err}", file=sys.stderr)
        return 2
    if args.write is not None:
        try:
            args.write.write_text(collapsed_text(counts))
        except OSError as err:
            print(f"stack_summary: {args.write}: {err}", file=sys.stderr)
            return 2
    got = summarize(counts, args.top, args.under)
    if args.json:
        print(json.dumps(got))
        return 0
    head = f"{got['samples']} samples"
    if args.under is not None:
        share = got["kept"] / got["samples"] if got["samples"] else 0.0
        head += f", {got['kept']} ({share * 100:.1f}%) under {args.under!r}"
    print(head)
    print(_table("inclusive (share of all samples):", got["inclusive"]))
    print(_table("leaves (share of all samples):", got["leaves"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
