# SPDX-License-Identifier: Apache-2.0
"""The figures of ``bench/RESULTS.md``, regenerated from the JSON results by one command (PNG, matplotlib).

``python -m bench.figures`` scans ``--results`` (default ``bench/results``, recursively) for result files, tells
their kind from their content, and writes to ``--out`` (default ``bench/figures``):

``accuracy_vs_ratio.png``
    One row per :mod:`bench.quality` result (``summary.rows``): answer score (left; RULER string match, ``score``,
    dense's as a dashed line) and teacher-forced top-1 agreement with dense (right; ``agree_tf``) against the achieved
    compression ratio of the compressed region, one line per method (2-D planners, token-only, channel-only, ThinK,
    fp8 casts).
``served_accuracy_vs_ratio.png``
    Accuracy-suite results (:mod:`bench.accuracy`, schema ``mosaickv.accuracy/1``), one panel per folder (the
    configurations of one served run side by side): average accuracy against the ratio read from each run's label
    (``dense`` 1, ``fp8`` 2, ``mosaic-r3`` / ``mosaic-3x`` / ``token-only-r3`` 3) or given with ``--ratio LABEL=X``, a
    line per family (2-D mosaic, token-only, channel-only), fp8 a star, dense a dashed line, error bars of one
    binomial standard error.
``throughput_vs_concurrency.png``
    Output tokens/s against requests in flight, one line per configuration, one panel per result and workload:
    results of :mod:`bench.serving_throughput`, both the sweep schema ``mosaickv.serving_throughput/2`` (its
    ``kind: concurrency`` points, x = ``max_concurrency``; failed and skipped points left out) and the older
    one-run-per-configuration files (``{config: {output_throughput, bench_args, ...}}``), and raw
    ``sglang.bench_serving`` ``--output-file`` lines (``*.jsonl``). For the older files and raw lines concurrency is
    ``max_concurrency``, else ``--max-concurrency`` of the bench arguments, else ``--num-prompts`` (all requests
    sent at once, rate inf).
``tpot_vs_context.png``
    TPOT against context length, from two sources, one panel each: (1) the time of one decode attention step of
    one layer (the part of TPOT that the KV cache decides), MosaicKV's sparse decode against FlashInfer dense
    decode, one line per batch size, one panel per :mod:`bench.decode_speed` result and shape (``rows``; skipped
    cases left out); (2) served TPOT (median, ms per output token) measured through the server by
    :mod:`bench.serving_throughput` ``--context-lengths`` (its ``kind: context`` points), one line per
    configuration, one panel per result and batch size. Either source alone draws the figure.
``kv_capacity.png``
    KV capacity in tokens (SGLang's ``max_total_num_tokens``) per configuration, one panel per result of
    :mod:`bench.serve_check` (``summary.<config>.capacity_tokens``) or :mod:`bench.serving_throughput`
    (``configs.<config>.max_total_num_tokens``, or ``<config>.max_total_num_tokens`` in the older files), with the
    ratio to the dense configuration of the same tensor parallelism; and one panel per served run's folder of
    ``sglang.bench_serving`` lines (``bench-<config>.jsonl``: each line's ``server_info.max_total_num_tokens``) that
    has a dense server and another among them.

A figure whose inputs are missing is skipped with a message. ``--only`` picks figures (``accuracy``, ``suite``,
``throughput``, ``tpot``, ``capacity``), and ``--quality``, ``--accuracy``, ``--throughput``, ``--decode``,
``--capacity`` replace the discovered files of one kind (the served TPOT panels come from the ``--throughput``
files).
matplotlib comes with the project's ``bench`` extra and is imported only when a figure is drawn.

Run ``python -m bench.figures --help``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from bench.textio import plain_name, read_text

logger = logging.getLogger("bench.figures")

__all__ = ["FIGURES", "classify", "discover", "label_ratio", "main", "plot_accuracy", "plot_capacity", "plot_suite",
           "plot_throughput", "plot_tpot", "served_tpot_points", "suite_points", "throughput_points"]  # fmt: skip

FIGURES = ("accuracy", "suite", "throughput", "tpot", "capacity")
FILE_NAMES = {"accuracy": "accuracy_vs_ratio.png", "suite": "served_accuracy_vs_ratio.png",
              "throughput": "throughput_vs_concurrency.png",
              "tpot": "tpot_vs_context.png", "capacity": "kv_capacity.png"}  # fmt: skip
ACCURACY_SCHEMA = "mosaickv.accuracy/1"
THROUGHPUT_SCHEMA = "mosaickv.serving_throughput/2"
DPI = 80
# method -> (colour, marker, line style); one colour per family (2-D, token, channel, cast)
STYLES: Dict[str, Tuple[str, str, str]] = {
    "mosaic-exact": ("tab:blue", "o", "-"), "mosaic-fast": ("tab:blue", "s", "--"),
    "mosaic-2d": ("tab:blue", "^", ":"), "mosaic": ("tab:blue", "o", "-"),
    "token-only": ("tab:orange", "v", "-"), "channel-only": ("tab:green", "D", "-"),
    "think": ("tab:green", "x", ":"), "fp8": ("tab:red", "*", ""), "fp8-token": ("tab:red", "P", ""),
    "bf16": ("tab:gray", "h", ""), "dense": ("black", "o", ""),
}  # fmt: skip
PathLike = Union[str, "os.PathLike[str]"]


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or a RuntimeError that says how to install it."""
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError(f"matplotlib: expected the package (the project's bench extra: uv sync --extra bench), "
                           f"got ImportError: {e}") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path) -> Path:
    """Write ``fig`` as a PNG with an adaptive 256-colour palette (plots stay sharp, files stay small)."""
    import io

    from PIL import Image

    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format="png")
    _pyplot().close(fig)
    with Image.open(buf) as im:
        im.convert("RGB").quantize(colors=256).save(out, format="PNG", optimize=True)
    logger.info("wrote %s (%.0f KB)", out, out.stat().st_size / 1024)
    return out


def _grid(plt: Any, n: int, width: float, height: float, max_cols: int = 3) -> Tuple[Any, List[Any]]:
    """A figure of ``n`` panels, at most ``max_cols`` a row; unused cells hidden."""
    cols = min(n, max_cols)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows + 0.6), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def _skip(figure: str, why: str) -> None:
    logger.info("skipped %s: %s", figure, why)


# =====================================================================================================================
# discovery
# =====================================================================================================================
RESULT_PATTERNS = ("*.json", "*.jsonl", "*.json.gz", "*.jsonl.gz")  # what discover reads, gzipped as archived


def _read(path: Path) -> Any:
    """JSON of a file; a ``.jsonl`` file gives the list of its JSON lines; either gzipped (``.gz``) as well."""
    text = read_text(path)
    if plain_name(path).endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def classify(data: Any) -> Optional[str]:
    """Kind of a result: ``quality``, ``accuracy``, ``decode``, ``serve_check``, ``throughput``, ``bench_serving``
    (a list of sglang.bench_serving lines) or ``None``."""
    if isinstance(data, list):
        ok = data and all(isinstance(x, dict) and "output_throughput" in x for x in data)
        return "bench_serving" if ok else None
    if not isinstance(data, dict):
        return None
    if data.get("schema") == ACCURACY_SCHEMA:
        return "accuracy"
    if data.get("schema") == THROUGHPUT_SCHEMA and isinstance(data.get("configs"), dict):
        return "throughput"
    summary = data.get("summary")
    if isinstance(summary, dict) and isinstance(summary.get("rows"), list) and "records" in data:
        return "quality"
    if isinstance(data.get("rows"), list) and any(isinstance(r, dict) and "flashinfer_ms" in r for r in data["rows"]):
        return "decode"
    if isinstance(summary, dict) and summary and all(isinstance(v, dict) and "capacity_tokens" in v
                                                     for v in summary.values()):
        return "serve_check"
    if data and all(isinstance(v, dict) and "config" in v and ("output_throughput" in v or "error" in v)
                    for v in data.values()):
        return "throughput"
    return None


def discover(results: PathLike) -> Dict[str, List[Path]]:
    """Result files under ``results`` (``*.json``, ``*.jsonl``, recursively, gzipped or not) by kind (see
    :func:`classify`)."""
    found: Dict[str, List[Path]] = {}
    root = Path(results)
    for path in [p for pattern in RESULT_PATTERNS for p in sorted(root.rglob(pattern))]:
        try:
            kind = classify(_read(path))
        except (OSError, ValueError) as e:
            logger.debug("not read: %s (%s)", path, e)
            continue
        if kind is not None:
            found.setdefault(kind, []).append(path)
    return found


def _name(path: Path, root: Optional[Path] = None) -> str:
    """A short source name: the path relative to ``root`` (or parent/name)."""
    if root is not None:
        try:
            return str(path.relative_to(root))
        except ValueError:
            pass
    return f"{path.parent.name}/{path.name}"


# =====================================================================================================================
# (a) accuracy vs compression ratio
# =====================================================================================================================
def label_ratio(label: str, overrides: Optional[Dict[str, float]] = None) -> Optional[float]:
    """Compression ratio of an accuracy-suite run from its label: ``overrides`` first, then ``dense*`` 1, ``fp8*`` 2,
    ``...-r3...`` or ``...3x...`` 3; ``None`` when the label says nothing."""
    if overrides and label in overrides:
        return float(overrides[label])
    low = label.lower()
    if low.startswith("dense") or low.startswith("stock"):
        return 1.0
    m = re.search(r"(?:^|[-_])r(\d+(?:\.\d+)?)(?=$|[-_])", low) or re.search(r"(\d+(?:\.\d+)?)x(?=$|[-_])", low)
    if m:
        return float(m.group(1))
    if low.startswith("fp8"):
        return 2.0
    return None


def _family(label: str) -> str:
    low = label.lower()
    for key in ("dense", "fp8", "token-only", "channel-only", "think", "mosaic"):
        if low.startswith(key) or key in low:
            return key
    return "mosaic"


def _quality_panel(ax_score: Any, ax_agree: Any, data: Dict[str, Any], title: str) -> None:
    rows = [r for r in data["summary"]["rows"] if r.get("samples") and r.get("ratio") is not None]
    by_method: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    for method, rs in by_method.items():
        rs.sort(key=lambda r: r["ratio"])
        color, marker, style = STYLES.get(method, ("tab:purple", ".", "-"))
        xs = [r["ratio"] for r in rs]
        kw = dict(color=color, marker=marker, linestyle=style or "none", label=method, markersize=6)
        ax_score.plot(xs, [r["score"] for r in rs], **kw)
        ax_agree.plot(xs, [r["agree_tf"] for r in rs], **kw)
    n = data["summary"].get("samples")
    if n:
        ax_score.axhline(data["summary"]["dense_em"] / n, color="black", linestyle="--", linewidth=1,
                         label="dense")
    ax_agree.axhline(1.0, color="black", linestyle="--", linewidth=1)
    cfg = data.get("config", {})
    sub = f"{n} samples, {cfg.get('lengths')} tok, {cfg.get('haystack')}, observe={cfg.get('observe')}"
    ax_score.set_title(f"{title}: answers ({sub})", fontsize=7.5)
    ax_agree.set_title(f"{title}: teacher-forced agreement", fontsize=8)
    ax_score.set_ylabel("answer score (RULER match)")
    ax_agree.set_ylabel("top-1 agreement with dense")
    for ax in (ax_score, ax_agree):
        ax.set_xlabel("compression ratio (compressed region)")
        ax.set_xlim(0.5, max(6.5, max((r["ratio"] for r in rows), default=0) + 0.5))
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)


def plot_accuracy(quality: Sequence[PathLike], out: PathLike, root: Optional[PathLike] = None) -> Optional[Path]:
    """Accuracy of :mod:`bench.quality` results against compression ratio (see the module docstring); ``None``
    (skipped) without inputs."""
    qs = [(Path(p), _read(Path(p))) for p in quality]
    if not qs:
        _skip("accuracy_vs_ratio", "no bench.quality results")
        return None
    plt = _pyplot()
    height = 2.9 * len(qs) + 0.9
    fig, axes = plt.subplots(len(qs), 2, figsize=(10.0, height), squeeze=False)
    rootp = Path(root) if root is not None else None
    for k, (path, data) in enumerate(qs):
        _quality_panel(axes[k][0], axes[k][1], data, _name(path, rootp))
    _figure_legend(fig, [a for row in axes for a in row], height)
    fig.suptitle("Accuracy vs KV compression ratio (SmolLM2-135M-Instruct, RULER-style, CPU)", fontsize=10,
                 y=1 - 0.08 / height)
    fig.tight_layout(rect=(0, 0, 1, 1 - 1.0 / height))
    return _save(fig, Path(out))


def _figure_legend(fig: Any, axes: Sequence[Any], height: float) -> None:
    """One legend above the panels: every label once."""
    handles: Dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="upper center", ncol=min(len(handles), 6), fontsize=8,
               bbox_to_anchor=(0.5, 1 - 0.4 / height))


def suite_points(suites: Sequence[PathLike], ratios: Optional[Dict[str, float]] = None,
                 root: Optional[PathLike] = None) -> Dict[str, List[Dict[str, Any]]]:
    """Accuracy-suite runs grouped by their folder (one served run's configurations side by side): per folder, one
    point per run with ``label``, ``family``, ``ratio`` (from the label or ``ratios``), ``average``, ``correct``,
    ``total``, ``samples`` and ``lengths``; runs without a ratio are skipped with the flag that fixes it."""
    rootp = Path(root) if root is not None else None
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for p in suites:
        path = Path(p)
        data = _read(path)
        label = str(data.get("label"))
        ratio = label_ratio(label, ratios)
        if ratio is None:
            _skip("an accuracy-suite run", f"{p}: no ratio for label {label!r}; pass --ratio {label}=X")
            continue
        summ, cfg = data["summary"], data.get("config", {})
        folder = _name(path.parent, rootp) if rootp is not None else path.parent.name
        if folder in (".", ""):
            folder = path.name
        groups.setdefault(folder, []).append({
            "label": label, "family": _family(label), "ratio": ratio, "average": float(summ["average"]),
            "correct": summ.get("correct"), "total": summ.get("total"), "samples": cfg.get("samples"),
            "lengths": cfg.get("lengths"),
        })  # fmt: skip
    return groups


def _stderr(point: Dict[str, Any]) -> float:
    n, p = point.get("total"), point["average"]
    return (p * (1 - p) / n) ** 0.5 if isinstance(n, int) and n > 0 else 0.0


def plot_suite(suites: Sequence[PathLike], out: PathLike, ratios: Optional[Dict[str, float]] = None,
               root: Optional[PathLike] = None) -> Optional[Path]:
    """Accuracy-suite average against compression ratio, one panel per folder of runs: a line per family
    (2-D mosaic, token-only, channel-only) over the ratios, fp8 as a star, dense as a dashed line; error bars are
    one binomial standard error (``sqrt(p (1 - p) / prompts)``). ``None`` (skipped) without inputs."""
    groups = suite_points(suites, ratios, root)
    if not groups:
        _skip("served_accuracy_vs_ratio", "no bench.accuracy results with a ratio")
        return None
    plt = _pyplot()
    fig, axes = _grid(plt, len(groups), 5.2, 3.6, max_cols=2)
    # the runs with the most configurations first; families side by side at a shared ratio (x nudged apart)
    nudge = {"mosaic": 0.0, "token-only": -0.06, "channel-only": 0.06, "think": 0.12}
    for ax, (folder, pts) in zip(axes, sorted(groups.items(), key=lambda g: (-len(g[1]), g[0]))):
        by_family: Dict[str, List[Dict[str, Any]]] = {}
        for pt in pts:
            by_family.setdefault(pt["family"], []).append(pt)
        for family, fpts in sorted(by_family.items()):
            fpts.sort(key=lambda x: x["ratio"])
            color, marker, style = STYLES.get(family, ("tab:purple", ".", "-"))
            if family == "dense":
                for pt in fpts:
                    ax.axhline(pt["average"], color=color, linestyle="--", linewidth=1, label="dense")
                continue
            xs = [x["ratio"] + nudge.get(family, 0.0) for x in fpts]
            ax.errorbar(xs, [x["average"] for x in fpts], yerr=[_stderr(x) for x in fpts],
                        color=color, marker=marker, linestyle=style if len(fpts) > 1 and style else "none",
                        label=family, markersize=7, capsize=3)
        first = pts[0]
        lengths = first.get("lengths")
        sub = f"{first.get('samples')} samples a task and length, lengths {lengths}, {first.get('total')} prompts"
        ax.set_title(f"{folder}\n{sub}", fontsize=7.5)
        ax.set_xlabel("compression ratio (from the run label)")
        ax.set_ylabel("average accuracy (exact match)")
        ax.set_xlim(0.5, max(6.5, max(x["ratio"] for x in pts) + 0.5))
        ax.grid(alpha=0.3)
    height = 3.6 * ((len(groups) + 1) // 2) + 0.6
    _figure_legend(fig, axes, height + 0.6)
    fig.suptitle("Accuracy suite vs KV compression ratio (bench.accuracy, RULER-style), one panel per run", fontsize=10,
                 y=1 - 0.05 / (height + 0.6))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.9 / (height + 0.6)))
    return _save(fig, Path(out))


# =====================================================================================================================
# (b) output throughput vs concurrency
# =====================================================================================================================
def _flag(args: str, flag: str) -> Optional[str]:
    m = re.search(rf"{re.escape(flag)}[ =](\S+)", args or "")
    return m.group(1) if m else None


def _model_of(command: str) -> str:
    m = _flag(command or "", "--model-path")
    return Path(m).name if m else "model"


def _workload_text(args: str) -> str:
    """A short description of a bench_serving workload from its flags (bench_serving 0.5.17's defaults)."""
    if _flag(args, "--dataset-name") == "generated-shared-prefix":
        return (f"shared prefix, {_flag(args, '--gsp-num-groups') or 64} groups x "
                f"{_flag(args, '--gsp-prompts-per-group') or 16}, in {_flag(args, '--gsp-system-prompt-len') or 2048}"
                f" + {_flag(args, '--gsp-question-len') or 128} / out {_flag(args, '--gsp-output-len') or 256}")
    return (f"{_flag(args, '--dataset-name')} in {_flag(args, '--random-input-len')} / out "
            f"{_flag(args, '--random-output-len')}")


def _sweep_points(data: Dict[str, Any], kind: str, key: str, where: str) -> List[Tuple[str, Dict[str, Any]]]:
    """``[(config, point)]`` of a sweep result's points of one kind with a number at ``key`` (others logged)."""
    out = []
    for name, res in data["configs"].items():
        for p in res.get("points", []):
            if p.get("kind") != kind:
                continue
            if p.get("error") or p.get("skipped") or not isinstance(p.get(key), (int, float)):
                what = f"{p.get('workload')} c={p.get('max_concurrency')}" if kind == "concurrency" else (
                    f"context {p.get('context_length')} batch {p.get('max_concurrency')}")
                _skip(f"{kind} point {name} {what}", f"{where}: {p.get('error') or p.get('skipped') or 'no ' + key}")
                continue
            out.append((name, p))
    return out


def throughput_points(path: PathLike, root: Optional[PathLike] = None) -> List[Dict[str, Any]]:
    """``[{panel, config, concurrency, output_throughput}]`` of one serving_throughput or bench_serving result."""
    path = Path(path)
    data = _read(path)
    kind = classify(data)
    rootp = Path(root) if root is not None else None
    points = []
    if kind == "throughput" and data.get("schema") == THROUGHPUT_SCHEMA:
        model = Path(str(data.get("model") or "model")).name
        for name, p in _sweep_points(data, "concurrency", "output_throughput", str(path)):
            conc = p.get("max_concurrency") or p.get("num_prompts")
            panel = f"{_name(path, rootp)}\n{model}, {p['workload']}: {_workload_text(p.get('bench_args', ''))}"
            points.append({"panel": panel, "config": name, "concurrency": int(conc),
                           "output_throughput": float(p["output_throughput"])})
    elif kind == "throughput":
        for name, res in data.items():
            if "error" in res or res.get("output_throughput") is None:
                _skip(f"throughput point {name}", f"{path}: {res.get('error', 'no output_throughput')}")
                continue
            args = res.get("bench_args", "")
            conc = res.get("max_concurrency") or _flag(args, "--max-concurrency") or _flag(args, "--num-prompts")
            if conc is None:
                _skip(f"throughput point {name}", f"{path}: no concurrency in the result or its bench arguments")
                continue
            panel = (f"{_name(path, rootp)}\n{_model_of(res.get('server_command', ''))}, "
                     f"{_flag(args, '--dataset-name')} in {_flag(args, '--random-input-len')} / out "
                     f"{_flag(args, '--random-output-len')}")
            points.append({"panel": panel, "config": name, "concurrency": int(conc),
                           "output_throughput": float(res["output_throughput"])})
    elif kind == "bench_serving":
        for k, line in enumerate(data):
            conc = line.get("max_concurrency")
            if conc is None and str(line.get("request_rate")) in ("inf", "Infinity"):
                conc = line.get("completed")
            if conc is None:
                _skip(f"bench_serving line {k}", f"{path}: no max_concurrency at a finite request rate")
                continue
            info = line.get("server_info") or {}
            config = line.get("tag") or _config_of_stem(path.stem) or info.get("kv_compressor") or path.stem
            # one panel per folder and workload: bench-dense.jsonl and bench-mosaic-r3.jsonl of one run side by side
            panel = (f"{_name(path.parent, rootp)}/*.jsonl\n{line.get('dataset_name')} in "
                     f"{line.get('random_input_len')} / out {line.get('random_output_len')}")
            points.append({"panel": panel, "config": str(config), "concurrency": int(conc),
                           "output_throughput": float(line["output_throughput"])})
    else:
        raise ValueError(f"{path}: expected a bench.serving_throughput or sglang.bench_serving result, got {kind}")
    return points


def _config_of_stem(stem: str) -> Optional[str]:
    """``bench-mosaic-r3`` -> ``mosaic-r3`` (the file names of ``bench/device_served.sh``); None for other names."""
    for prefix in ("bench-", "bench_"):
        if stem.startswith(prefix) and len(stem) > len(prefix):
            return stem[len(prefix):]
    return None


def _config_color(name: str) -> str:
    if name.startswith("dense") or name.startswith("stock"):
        return "black"
    if name.startswith("fp8"):
        return "tab:red"
    return "tab:blue"


def plot_throughput(files: Sequence[PathLike], out: PathLike, root: Optional[PathLike] = None) -> Optional[Path]:
    """Output throughput against concurrency (see the module docstring); ``None`` (skipped) without data."""
    points = [p for f in files for p in throughput_points(f, root)]
    if not points:
        _skip("throughput_vs_concurrency", "no serving-throughput results")
        return None
    plt = _pyplot()
    panels = list(dict.fromkeys(p["panel"] for p in points))
    fig, axes = _grid(plt, len(panels), 4.6, 3.8)
    for ax, panel in zip(axes, panels):
        mine = [p for p in points if p["panel"] == panel]
        configs = list(dict.fromkeys(p["config"] for p in mine))
        for k, cfg in enumerate(configs):
            ps = sorted((p for p in mine if p["config"] == cfg), key=lambda p: p["concurrency"])
            style = "--" if "tp" in cfg else "-"
            ax.plot([p["concurrency"] for p in ps], [p["output_throughput"] for p in ps], marker="os^Dv"[k % 5],
                    linestyle=style, color=_config_color(cfg), label=cfg, markersize=7,
                    markerfacecolor="none" if "tp" in cfg else None)
            for p in ps:
                ax.annotate(f"{p['output_throughput']:.0f}", (p["concurrency"], p["output_throughput"]),
                            textcoords="offset points", xytext=(7, 0) if k % 2 == 0 else (-7, 0), fontsize=7,
                            va="center", ha="left" if k % 2 == 0 else "right")
        concs = sorted({p["concurrency"] for p in mine})
        if len(concs) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(concs, [str(c) for c in concs])
        ax.set_ylim(bottom=0)
        ax.set_title(panel, fontsize=8)
        ax.set_xlabel("requests in flight")
        ax.set_ylabel("output tokens/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Serving output throughput vs concurrency (sglang.bench_serving)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    return _save(fig, Path(out))


# =====================================================================================================================
# (c) decode step time vs context length
# =====================================================================================================================
def _k(tokens: int) -> str:
    return f"{tokens // 1024}k" if tokens >= 1024 and tokens % 1024 == 0 else str(tokens)


def served_tpot_points(path: PathLike, root: Optional[PathLike] = None) -> List[Dict[str, Any]]:
    """``[{panel, config, batch, context, tpot_ms, p99_tpot_ms}]`` of the context sweep of one
    serving_throughput result; none for an older serving_throughput result or bench_serving lines. The TPOT is the
    server's mean where the point has it (the config's label says when it is bench_serving's median instead)."""
    path = Path(path)
    data = _read(path)
    kind = classify(data)
    if kind not in ("throughput", "bench_serving"):
        raise ValueError(f"{path}: expected a bench.serving_throughput or sglang.bench_serving result, got {kind}")
    if kind != "throughput" or data.get("schema") != THROUGHPUT_SCHEMA:
        return []
    rootp = Path(root) if root is not None else None
    model = Path(str(data.get("model") or "model")).name
    from bench.serving_throughput import point_tpot

    points = []
    for name, p in _sweep_points(data, "context", "context_length", str(path)):
        tpot = point_tpot(p)
        if tpot is None:
            _skip(f"context point {name} context {p['context_length']} batch {p.get('max_concurrency')}",
                  f"{path}: no TPOT (no server mean, and bench_serving saw no first token)")  # fmt: skip
            continue
        panel = f"{_name(path, rootp)}\n{model}, batch {p['max_concurrency']}, {p.get('output_len')} output tokens"
        label = name if tpot[1] == "server_mean_tpot_ms" else f"{name} (bench_serving median)"
        points.append({"panel": panel, "config": label, "batch": int(p["max_concurrency"]),
                       "context": int(p["context_length"]), "tpot_ms": tpot[0],
                       "p99_tpot_ms": p.get("p99_tpot_ms")})
    return points


def _has_context_sweep(path: PathLike) -> bool:
    data = _read(Path(path))
    return (isinstance(data, dict) and data.get("schema") == THROUGHPUT_SCHEMA
            and any(p.get("kind") == "context" for r in data.get("configs", {}).values() for p in r.get("points", [])))


def _served_tpot_panel(ax: Any, panel: str, points: List[Dict[str, Any]]) -> None:
    for k, cfg in enumerate(dict.fromkeys(p["config"] for p in points)):
        ps = sorted((p for p in points if p["config"] == cfg), key=lambda p: p["context"])
        ax.plot([p["context"] for p in ps], [p["tpot_ms"] for p in ps], marker="os^Dv"[k % 5],
                linestyle="--" if "tp" in cfg else "-", color=_config_color(cfg), label=cfg, markersize=6)
    ctxs = sorted({p["context"] for p in points})
    if len(ctxs) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ctxs, [_k(c) for c in ctxs])
    ax.set_ylim(bottom=0)
    ax.set_title(f"{panel} (served)", fontsize=8)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("TPOT (ms)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_tpot(files: Sequence[PathLike], out: PathLike, root: Optional[PathLike] = None,
              served: Sequence[PathLike] = ()) -> Optional[Path]:  # fmt: skip
    """Decode attention time per layer against context, mosaic vs FlashInfer (``files``: bench.decode_speed), and
    served TPOT against context per configuration (``served``: bench.serving_throughput results; those without a
    context sweep add nothing); ``None`` (skipped) without data."""
    rootp = Path(root) if root is not None else None
    spoints = [p for f in served for p in served_tpot_points(f, root)]
    spanels = list(dict.fromkeys(p["panel"] for p in spoints))
    panels = []
    for f in files:
        data = _read(Path(f))
        meta = data.get("meta", {})
        rows = [r for r in data.get("rows", []) if r.get("flashinfer_ms") is not None and r.get("mosaic_ms")]
        for shape in dict.fromkeys(r["shape"] for r in rows):
            panels.append((Path(f), meta, shape, [r for r in rows if r["shape"] == shape]))
    if not panels and not spanels:
        _skip("tpot_vs_context", "no bench.decode_speed results with timed rows and no bench.serving_throughput "
              "context sweeps")
        return None
    plt = _pyplot()
    fig, all_axes = _grid(plt, len(panels) + len(spanels), 4.4, 3.6)
    axes, served_axes = all_axes[: len(panels)], all_axes[len(panels) :]
    for ax, panel in zip(served_axes, spanels):
        _served_tpot_panel(ax, panel, [p for p in spoints if p["panel"] == panel])
    # one colour per batch size across panels: the figure has one legend
    all_batches = sorted({r["batch"] for _, _, _, rows in panels for r in rows})
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray"]
    colors = {b: palette[i % len(palette)] for i, b in enumerate(all_batches)}
    for ax, (path, meta, shape, rows) in zip(axes, panels):
        batches = sorted({r["batch"] for r in rows})
        for b in batches:
            rs = sorted((r for r in rows if r["batch"] == b), key=lambda r: r["context"])
            xs = [r["context"] for r in rs]
            ax.plot(xs, [r["flashinfer_ms"] for r in rs], color=colors[b], linestyle="--", marker="s",
                    markerfacecolor="none", label=f"FlashInfer dense, batch {b}")
            ax.plot(xs, [r["mosaic_ms"] for r in rs], color=colors[b], linestyle="-", marker="o",
                    label=f"MosaicKV {rs[0].get('ratio_achieved', 3):.0f}x, batch {b}")
        ctxs = sorted({r["context"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ctxs, [f"{c // 1024}k" for c in ctxs])
        graph = rows[0].get("cuda_graph")
        ax.set_title(f"{_name(path, rootp)}\n{shape}, {'CUDA graph' if graph else 'eager'}, "
                     f"{meta.get('device', '?')}", fontsize=8)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("decode attention, one layer (ms)")
        ax.grid(alpha=0.3, which="both")
    handles: Dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 6), fontsize=8)
    kernel = "Decode step attention time vs context: MosaicKV sparse decode (solid) vs FlashInfer dense (dashed)"
    serving = "Served TPOT vs context (sglang.bench_serving, all requests of a batch at once, median)"
    title = "\n".join(t for t, on in ((kernel, panels), (serving, spanels)) if on)
    top = (0.4 if title.count("\n") == 0 else 0.6) / fig.get_figheight()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, (0.6 if handles else 0) / fig.get_figheight(), 1, 1 - top))
    return _save(fig, Path(out))


# =====================================================================================================================
# (d) KV capacity per configuration
# =====================================================================================================================
def _tp(name: str) -> str:
    m = re.search(r"-tp(\d+)$", name)
    return m.group(1) if m else "1"


def capacity_rows(path: PathLike) -> Tuple[str, List[Tuple[str, int, Optional[float]]]]:
    """``(model, [(config, tokens, ratio to dense of the same TP)])`` of a serve_check or serving_throughput result."""
    data = _read(Path(path))
    kind = classify(data)
    caps: Dict[str, int] = {}
    given: Dict[str, float] = {}
    model = "model"
    if kind == "serve_check":
        for name, s in data["summary"].items():
            if s.get("capacity_tokens"):
                caps[name] = int(s["capacity_tokens"])
            if s.get("capacity_vs_dense"):
                given[name] = float(s["capacity_vs_dense"])
        cmds = [r.get("command", "") for r in data.get("results", {}).values()]
        model = _model_of(cmds[0]) if cmds else model
    elif kind == "throughput" and data.get("schema") == THROUGHPUT_SCHEMA:
        model = Path(str(data.get("model") or "model")).name
        for name, res in data["configs"].items():
            if res.get("max_total_num_tokens"):
                caps[name] = int(res["max_total_num_tokens"])
    elif kind == "throughput":
        for name, res in data.items():
            if res.get("max_total_num_tokens"):
                caps[name] = int(res["max_total_num_tokens"])
            if res.get("server_command"):
                model = _model_of(res["server_command"])
    else:
        raise ValueError(f"{path}: expected a bench.serve_check or bench.serving_throughput result, got {kind}")
    dense = {_tp(n): c for n, c in caps.items() if n.startswith("dense") or n.startswith("stock")}
    rows = []
    for name, cap in caps.items():
        base = dense.get(_tp(name))
        rows.append((name, cap, round(cap / base, 3) if base else given.get(name)))
    return model, rows


def served_capacity_rows(paths: Sequence[PathLike]) -> Tuple[str, List[Tuple[str, int, Optional[float]]]]:
    """``(model, rows)`` as :func:`capacity_rows` from the ``sglang.bench_serving`` lines of one served run's folder,
    one file per server (``bench-<config>.jsonl``, the ``server_info.max_total_num_tokens`` each line carries); no
    rows unless a ``dense`` (or ``stock``) server and another one are among them."""
    caps: Dict[str, int] = {}
    model = "model"
    for path in paths:
        lines = _read(Path(path))
        info = (lines[0].get("server_info") or {}) if lines else {}
        if info.get("max_total_num_tokens"):
            name = Path(path).stem.removeprefix("bench-")
            caps[f"{name}-tp{info['tp_size']}" if int(info.get("tp_size") or 1) > 1 else name] = int(
                info["max_total_num_tokens"]
            )
            model = Path(str(info.get("model_path") or model)).name
    dense = {_tp(n): c for n, c in caps.items() if n.startswith("dense") or n.startswith("stock")}
    if not dense or len(caps) == len(dense):
        return model, []
    return model, [(n, c, round(c / dense[_tp(n)], 3) if _tp(n) in dense else None) for n, c in caps.items()]


def plot_capacity(files: Sequence[PathLike], out: PathLike, root: Optional[PathLike] = None) -> Optional[Path]:
    """KV capacity per configuration, one panel per result (served runs' ``bench_serving`` lines: one panel per
    folder); ``None`` (skipped) without data."""
    rootp = Path(root) if root is not None else None
    served: Dict[Path, List[Path]] = {}
    panels = []
    for f in map(Path, files):
        if f.suffix == ".jsonl":
            served.setdefault(f.parent, []).append(f)
        else:
            panels.append((f, *capacity_rows(f)))
    panels += [(folder / "bench-*.jsonl", *served_capacity_rows(group)) for folder, group in served.items()]
    panels = [p for p in panels if p[2]]
    if not panels:
        _skip("kv_capacity", "no bench.serve_check or bench.serving_throughput results with a capacity")
        return None
    plt = _pyplot()
    fig, axes = _grid(plt, len(panels), 4.4, 2.9)
    for ax, (path, model, rows) in zip(axes, panels):
        rows = sorted(rows, key=lambda r: (_tp(r[0]), r[1]))
        ys = range(len(rows))
        ax.barh(list(ys), [r[1] / 1e6 for r in rows], color=[_config_color(r[0]) for r in rows], alpha=0.8)
        ax.set_yticks(list(ys), [r[0] for r in rows], fontsize=8)
        top = max(r[1] for r in rows) / 1e6
        for y, (_, cap, ratio) in zip(ys, rows):
            text = f"{cap / 1e6:.2f}M" + (f" ({ratio:.2f}x)" if ratio is not None else "")
            ax.text(cap / 1e6 + top * 0.02, y, text, va="center", fontsize=7)
        ax.set_xlim(0, top * 1.45)
        ax.set_xlabel("KV capacity (million tokens, max_total_num_tokens)")
        ax.set_title(f"{_name(path, rootp)}\n{model}", fontsize=8)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("KV-cache capacity per configuration (ratio: vs dense at the same TP)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    return _save(fig, Path(out))


# =====================================================================================================================
# CLI
# =====================================================================================================================
def _parse_ratio(text: str) -> Tuple[str, float]:
    label, sep, value = text.rpartition("=")
    try:
        ratio = float(value)
    except ValueError:
        ratio = -1.0
    if not sep or not label or ratio < 1:
        raise argparse.ArgumentTypeError(f"--ratio: expected LABEL=X with X >= 1, got {text!r}")
    return label, ratio


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.figures",
        description="Regenerate the PNG figures of bench/RESULTS.md from the JSON results: accuracy vs compression "
        "ratio (the CPU quality study; the served accuracy suite), output throughput vs concurrency, decode time vs "
        "context, KV capacity per configuration.",
    )
    p.add_argument("--results", default="bench/results", help="folder searched for results (default bench/results)")
    p.add_argument("--out", default="bench/figures", help="folder of the PNGs (default bench/figures)")
    p.add_argument("--only", nargs="+", choices=FIGURES, default=list(FIGURES), help="figures to draw (default all)")
    p.add_argument("--quality", nargs="+", default=None, help="bench.quality JSONs (default: found in --results)")
    p.add_argument("--accuracy", nargs="+", default=None, help="bench.accuracy JSONs (default: found)")
    p.add_argument("--ratio", action="append", type=_parse_ratio, default=[], metavar="LABEL=X",
                   help="compression ratio of an accuracy-suite label (repeatable)")
    p.add_argument("--throughput", nargs="+", default=None,
                   help="bench.serving_throughput JSONs or sglang.bench_serving JSONL (default: found)")
    p.add_argument("--decode", nargs="+", default=None, help="bench.decode_speed JSONs (default: found)")
    p.add_argument("--capacity", nargs="+", default=None,
                   help="bench.serve_check / serving_throughput JSONs (default: found)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s",
                        stream=sys.stdout)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    root = Path(args.results)
    found = discover(root) if root.is_dir() else {}
    if not root.is_dir():
        logger.info("no results folder %s", root)

    def pick(given: Optional[List[str]], *kinds: str) -> List[Path]:
        return [Path(x) for x in given] if given is not None else [f for k in kinds for f in found.get(k, [])]

    out = Path(args.out)
    sources = {
        "accuracy": (pick(args.quality, "quality"),),
        "suite": (pick(args.accuracy, "accuracy"),),
        "throughput": (pick(args.throughput, "throughput", "bench_serving"),),
        "tpot": (pick(args.decode, "decode"), pick(args.throughput, "throughput")),
        "capacity": (pick(args.capacity, "serve_check", "throughput", "bench_serving"),),
    }
    written = []
    for fig in args.only:
        target = out / FILE_NAMES[fig]
        if fig == "suite":
            used = sources["suite"][0]
            res = plot_suite(used, target, dict(args.ratio), root=root)
        elif fig == "tpot":
            d, t = sources["tpot"]
            res = plot_tpot(d, target, root=root, served=t)
            used = d + [f for f in t if _has_context_sweep(f)]
        else:
            used = sources[fig][0]
            plotter = {"accuracy": plot_accuracy, "throughput": plot_throughput, "capacity": plot_capacity}[fig]
            res = plotter(used, target, root=root)
        if res is not None:
            written.append(res)
            logger.info("  from: %s", ", ".join(str(u) for u in used))
    logger.info("%d figure(s) written to %s", len(written), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
