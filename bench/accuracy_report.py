# SPDX-License-Identifier: Apache-2.0
"""Compare accuracy-suite runs (JSON files of :mod:`bench.accuracy`) in one markdown table.

One row per file (its ``--label``), one column per task (the task's accuracy averaged over lengths, in percent),
then the average, the loss against the baseline run in percentage points (``baseline average - row average``;
positive means worse than the baseline) and, sample by sample against the baseline, how many answers were lost
(baseline right, row wrong) and gained. Runs are only comparable on the same samples: a row whose samples (task,
length, index, seed) differ from the baseline's is flagged.

Run ``python -m bench.accuracy_report dense.json fp8.json mosaic-3x.json [--baseline dense] [--by-length]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from bench.textio import read_text

__all__ = ["load", "report", "main"]

Key = Tuple[str, int, int, int]


def load(path: str) -> Dict[str, Any]:
    """One run's JSON, checked for the fields the report reads."""
    data = json.loads(read_text(path))
    missing = [k for k in ("label", "config", "summary", "records") if k not in data]
    if missing:
        raise ValueError(f"{path}: expected an accuracy-suite JSON (bench.accuracy --out), got one without {missing}")
    return data


def _keys(run: Dict[str, Any]) -> Dict[Key, bool]:
    return {(r["task"], int(r["length"]), int(r["index"]), int(r["seed"])): bool(r["correct"]) for r in run["records"]}


def _pct(x: Optional[float]) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def report(runs: Sequence[Dict[str, Any]], baseline: str = "dense", by_length: bool = False) -> str:
    """The markdown table (and, with ``by_length``, a second table of averages per length).

    Parameters
    ----------
    runs : sequence of dict
        Loaded runs (:func:`load`), in row order.
    baseline : str
        Label of the reference run; if no run has it, the loss columns are left empty.
    by_length : bool
        Add a table with one column per length (the average over tasks).
    """
    labels = [r["label"] for r in runs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"labels: expected one run per label, got duplicates {dupes}")
    tasks: List[str] = []
    lengths: List[str] = []
    for r in runs:
        tasks += [t for t in r["summary"]["task_average"] if t not in tasks]
        lengths += [L for L in r["summary"]["length_average"] if L not in lengths]
    base = next((r for r in runs if r["label"] == baseline), None)
    base_keys = _keys(base) if base is not None else {}
    lines = [
        "| config | " + " | ".join(tasks) + f" | average | loss vs {baseline} (points) | lost / gained |",
        "|---|" + "---:|" * (len(tasks) + 3),
    ]
    notes: List[str] = []
    for r in runs:
        s = r["summary"]
        cells = [_pct(s["task_average"].get(t)) for t in tasks]
        loss = lost_gained = ""
        if base is not None and r is not base:
            keys = _keys(r)
            if set(keys) != set(base_keys):
                notes.append(f"`{r['label']}` ran other samples than `{baseline}`: not comparable sample by sample")
                lost_gained = "n/a"
            else:
                lost = sum(base_keys[k] and not keys[k] for k in keys)
                gained = sum(keys[k] and not base_keys[k] for k in keys)
                lost_gained = f"{lost} / {gained}"
            if s["average"] is not None and base["summary"]["average"] is not None:
                loss = f"{100 * (base['summary']['average'] - s['average']):+.1f}"
        elif r is base:
            loss, lost_gained = "0.0", "-"
        lines.append(
            f"| {r['label']} | " + " | ".join(cells) + f" | {_pct(s['average'])} | {loss} | {lost_gained} |"
        )
    n = {(r["config"].get("samples"), r["config"].get("seed")) for r in runs}
    lines.append("")
    runs_desc = "; ".join(f"{s} samples per task and length, seed {d}" for s, d in sorted(n, key=str))
    lines.append(
        "Accuracy in percent (exact match: every expected value in the answer), each task averaged over lengths "
        + ", ".join(lengths) + f"; {runs_desc}."
    )
    if base is None:
        notes.append(f"no run labelled `{baseline}`: loss columns left empty (use --baseline)")
    lines += [f"- {x}" for x in notes]
    if by_length:
        lines += ["", "| config | " + " | ".join(lengths) + " | average |", "|---|" + "---:|" * (len(lengths) + 1)]
        for r in runs:
            s = r["summary"]
            lines.append(f"| {r['label']} | " + " | ".join(_pct(s["length_average"].get(L)) for L in lengths)
                         + f" | {_pct(s['average'])} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.accuracy_report",
        description="Markdown table comparing accuracy-suite JSON files (python -m bench.accuracy --out ...).",
    )
    p.add_argument("files", nargs="+", help="JSON files of bench.accuracy, one per configuration (row order)")
    p.add_argument("--baseline", default="dense", help="label of the reference run (default dense)")
    p.add_argument("--by-length", action="store_true", help="also a table of averages per length")
    args = p.parse_args(argv)
    try:
        runs = [load(f) for f in args.files]
        text = report(runs, args.baseline, args.by_length)
    except (OSError, ValueError) as e:
        p.error(str(e))
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
