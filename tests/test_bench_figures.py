# SPDX-License-Identifier: Apache-2.0
"""bench.figures: result files told apart by content, each figure drawn from small results in the real schemas,
skipped cleanly without inputs; the committed PNGs stay small."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

from bench import figures as F

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_PNG_BYTES = 200 * 1024


def _quality(methods_ratios):
    rows = [{"variant": f"{m}@{r:g}", "method": m, "target_ratio": r, "samples": 4, "ratio": r * 1.001,
             "ratio_all": r * 0.8, "attn_err": 0.01 * r, "agree_tf": 1 - 0.05 * r, "agree_free": 1.0, "dnll": 0.0,
             "em": 3, "score": 1 - 0.1 * r, "plan_seconds": 1.0} for m, r in methods_ratios]
    rows.append({"variant": "channel-only@6", "method": "channel-only", "target_ratio": 6.0, "samples": 0,
                 "unreachable": "ratio/budget_bytes: expected ..."})
    return {"command": "python -m bench.quality", "config": {"lengths": [2048], "haystack": "noise",
                                                             "observe": "context", "samples": 2},
            "environment": {}, "seconds": 1.0,
            "summary": {"rows": rows, "em_by_task": {}, "task_samples": {}, "dense_em": 3, "samples": 4,
                        "verdicts": []},
            "records": []}


def _throughput():
    def res(name, tput, cap, extra=""):
        return {"config": name, "server_command": f"python -m sglang.launch_server --model-path /m/llama-shape {extra}",
                "bench_args": "--dataset-name random-ids --num-prompts 32 --random-input-len 8000 "
                              "--random-output-len 256 --random-range-ratio 1.0",
                "max_total_num_tokens": cap, "completed": 32, "output_throughput": tput, "median_tpot_ms": 10.0,
                "max_concurrency": None}
    return {"dense": res("dense", 438.0, 788363), "mosaic-r3": res("mosaic-r3", 86.3, 2016192),
            "dense-tp2": res("dense-tp2", 421.0, 1687492, "--tp-size 2"),
            "mosaic-r3-tp2": res("mosaic-r3-tp2", 73.0, 4468800, "--tp-size 2"),
            "broken": {"config": "broken", "error": "RuntimeError('bench_serving exited with 1')"}}


def _sweep():
    """A bench.serving_throughput result in the sweep schema: two workloads over concurrency, a context sweep; one
    point failed, one cut by the time budget."""
    rand = "--dataset-name random-ids --random-input-len 8000 --random-output-len 256 --random-range-ratio 1.0"
    gsp = ("--dataset-name generated-shared-prefix --gsp-num-groups 8 --gsp-prompts-per-group 8 "
           "--gsp-system-prompt-len 4096 --gsp-question-len 128 --gsp-output-len 128")

    def conc(workload, args, c, tput, **extra):
        return {"workload": workload, "kind": "concurrency", "max_concurrency": c, "num_prompts": max(4 * c, 16),
                "bench_args": f"{args} --max-concurrency {c}", "output_throughput": tput, "median_tpot_ms": 20.0,
                **extra}

    def ctx(n, b, tpot):
        return {"workload": "context", "kind": "context", "max_concurrency": b, "num_prompts": b,
                "context_length": n, "output_len": 128, "bench_args": "--dataset-name random-ids",
                "output_throughput": b * 1000 / tpot, "median_tpot_ms": tpot, "p99_tpot_ms": 1.5 * tpot,
                "median_ttft_ms": n / 100, "server_mean_tpot_ms": tpot}

    def config(name, cap, scale, last):
        points = [conc("random", rand, c, scale * 40.0 * c) for c in (1, 8)] + [last]
        points += [conc("shared", gsp, c, scale * 50.0 * c) for c in (1, 8)]
        points += [ctx(n, b, (10 + n / 4096 * b) / scale) for n in (4096, 16384) for b in (1, 16)]
        return {"config": name, "server_command": "python -m sglang.launch_server --model-path /m/llama-8b-shape",
                "startup_seconds": 60.0, "max_total_num_tokens": cap, "points": points}

    dense_last = {**conc("random", rand, 32, 0.0), "error": "bench_serving exited with 1"}
    dense_last.pop("output_throughput")
    mosaic_last = {**conc("random", rand, 32, 0.0), "skipped": "budget"}
    mosaic_last.pop("output_throughput")
    return {"schema": F.THROUGHPUT_SCHEMA, "model": "/m/llama-8b-shape", "settings": {},
            "budget": {"seconds": 3600, "cut": True},
            "configs": {"dense": config("dense", 800000, 1.0, dense_last),
                        "mosaic-r3": config("mosaic-r3", 2000000, 0.5, mosaic_last)},
            "summary": {}}


def _bench_serving_lines():
    return [{"tag": "mosaic-r3", "backend": "sglang", "dataset_name": "random-ids", "request_rate": "inf",
             "max_concurrency": c, "random_input_len": 4096, "random_output_len": 128, "server_info": None,
             "completed": 64, "output_throughput": 50.0 * c, "median_tpot_ms": 20.0} for c in (1, 4, 16)]


def _decode():
    rows = [{"shape": "llama-3.1-8b", "context": c, "batch": b, "cuda_graph": True, "ratio_target": 3.0,
             "ratio_achieved": 3.0, "flashinfer_ms": 1e-5 * c * b, "mosaic_ms": 0.05 * b}
            for c in (32768, 131072) for b in (1, 8)]
    rows.append({"shape": "llama-3.1-8b", "context": 524288, "batch": 32, "skipped": "dense cache 64 GiB"})
    return {"meta": {"date": "2026-11-23", "device": "NVIDIA H100 80GB HBM3"}, "rows": rows, "pack": []}


def _serve_check():
    return {"summary": {"dense": {"needle_correct": 11, "needles": 12, "errors": 0, "capacity_tokens": 1813831},
                        "mosaic-r3": {"needle_correct": 6, "needles": 12, "errors": 0, "capacity_tokens": 4800640,
                                      "capacity_vs_dense": 2.647}},
            "results": {"dense": {"config": "dense", "command": "python -m sglang.launch_server --model-path "
                                  "/c/smollm2-135m-instruct-fp32 --port 30000"}}}


def _accuracy(label, average, total=28):
    return {"schema": F.ACCURACY_SCHEMA, "label": label, "config": {"samples": 1, "lengths": [2048, 4096]},
            "summary": {"average": average, "correct": round(average * total), "total": total}, "records": []}


@pytest.fixture()
def results(tmp_path):
    root = tmp_path / "results"
    (root / "serve").mkdir(parents=True)
    files = {
        "quality_a.json": _quality([(m, r) for m in ("mosaic-exact", "token-only", "channel-only") for r in (2, 4)]
                                   + [("fp8", 2.0), ("bf16", 1.0)]),
        "acc-dense.json": _accuracy("dense", 0.8),
        "acc-mosaic.json": _accuracy("mosaic-r3", 0.7),
        "decode_speed_graph.json": _decode(),
        "serve/throughput.json": _throughput(),
        "serve/sweep.json": _sweep(),
        "serve/serve_check.json": _serve_check(),
        "notes.json": {"anything": 1},
    }
    for name, data in files.items():
        (root / name).write_text(json.dumps(data))
    (root / "serve" / "bench_mosaic.jsonl").write_text("\n".join(json.dumps(x) for x in _bench_serving_lines()))
    (root / "serve" / "server.log").write_text("not json")
    return root


def _is_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and 2000 < len(data) < MAX_PNG_BYTES, (path, len(data))


def test_discover_tells_every_result_kind_from_its_content(results):
    found = F.discover(results)
    names = {k: sorted(p.name for p in v) for k, v in found.items()}
    assert names == {"quality": ["quality_a.json"], "accuracy": ["acc-dense.json", "acc-mosaic.json"],
                     "decode": ["decode_speed_graph.json"], "throughput": ["sweep.json", "throughput.json"],
                     "serve_check": ["serve_check.json"], "bench_serving": ["bench_mosaic.jsonl"]}


def test_discover_reads_gzipped_results_as_archived(results):
    from bench.compact_results import compact

    for path in [*results.rglob("*.json"), *results.rglob("*.jsonl")]:
        compact(path)
    found = F.discover(results)
    names = {k: sorted(p.name for p in v) for k, v in found.items()}
    assert names == {"quality": ["quality_a.json.gz"], "accuracy": ["acc-dense.json.gz", "acc-mosaic.json.gz"],
                     "decode": ["decode_speed_graph.json.gz"], "throughput": ["sweep.json.gz", "throughput.json.gz"],
                     "serve_check": ["serve_check.json.gz"], "bench_serving": ["bench_mosaic.jsonl.gz"]}
    assert F._read(found["bench_serving"][0]) == _bench_serving_lines()


def test_label_ratio_reads_labels_and_prefers_overrides():
    assert F.label_ratio("dense") == 1.0 and F.label_ratio("dense-cpu") == 1.0
    assert F.label_ratio("fp8") == 2.0
    assert F.label_ratio("mosaic-r3") == 3.0 and F.label_ratio("mosaic-r2.5-tp2") == 2.5
    assert F.label_ratio("mosaic-4x") == 4.0
    assert F.label_ratio("mosaic") is None and F.label_ratio("token-only") is None
    assert F.label_ratio("token-only", {"token-only": 3.0}) == 3.0


def test_throughput_points_take_concurrency_from_the_run(results):
    pts = F.throughput_points(results / "serve" / "throughput.json")
    assert {p["config"]: p["concurrency"] for p in pts} == {"dense": 32, "mosaic-r3": 32, "dense-tp2": 32,
                                                           "mosaic-r3-tp2": 32}  # broken left out
    assert {p["config"]: p["output_throughput"] for p in pts}["mosaic-r3"] == 86.3
    raw = F.throughput_points(results / "serve" / "bench_mosaic.jsonl")
    assert [(p["config"], p["concurrency"], p["output_throughput"]) for p in raw] == [
        ("mosaic-r3", 1, 50.0), ("mosaic-r3", 4, 200.0), ("mosaic-r3", 16, 800.0)]
    with pytest.raises(ValueError, match="expected a bench.serving_throughput or sglang.bench_serving result"):
        F.throughput_points(results / "decode_speed_graph.json")


def test_sweep_points_give_one_throughput_panel_per_workload_and_one_tpot_panel_per_batch(results, caplog):
    path = results / "serve" / "sweep.json"
    with caplog.at_level(logging.INFO, logger="bench.figures"):
        pts = F.throughput_points(path)
    # the failed and the budget-cut points are left out, with their reason
    assert sorted((p["config"], p["concurrency"]) for p in pts if "random" in p["panel"]) == [
        ("dense", 1), ("dense", 8), ("mosaic-r3", 1), ("mosaic-r3", 8)]
    assert any("bench_serving exited with 1" in r.message for r in caplog.records)
    assert any("c=32" in r.message and "budget" in r.message for r in caplog.records)
    panels = sorted({p["panel"] for p in pts})
    assert len(panels) == 2 and "llama-8b-shape, random: random-ids in 8000 / out 256" in panels[0]
    assert "shared: shared prefix, 8 groups x 8, in 4096 + 128 / out 128" in panels[1]
    assert {p["output_throughput"] for p in pts if p["config"] == "mosaic-r3" and "shared" in p["panel"]} == {
        25.0, 200.0}
    served = F.served_tpot_points(path)
    assert len(served) == 8 and len({p["panel"] for p in served}) == 2
    one = [p for p in served if p["batch"] == 16 and p["config"] == "dense"]
    assert sorted((p["context"], p["tpot_ms"]) for p in one) == [(4096, 26.0), (16384, 74.0)]
    # older results have no context sweep; other kinds are refused
    assert F.served_tpot_points(results / "serve" / "throughput.json") == []
    assert F.served_tpot_points(results / "serve" / "bench_mosaic.jsonl") == []
    with pytest.raises(ValueError, match="expected a bench.serving_throughput or sglang.bench_serving result"):
        F.served_tpot_points(results / "decode_speed_graph.json")
    model, rows = F.capacity_rows(path)
    assert model == "llama-8b-shape" and {n: r for n, _, r in rows} == {"dense": 1.0, "mosaic-r3": 2.5}


def test_capacity_ratios_are_against_dense_of_the_same_tensor_parallelism(results):
    model, rows = F.capacity_rows(results / "serve" / "throughput.json")
    assert model == "llama-shape"
    got = {name: ratio for name, _, ratio in rows}
    assert got["dense"] == 1.0 and got["dense-tp2"] == 1.0
    assert got["mosaic-r3"] == round(2016192 / 788363, 3) and got["mosaic-r3-tp2"] == round(4468800 / 1687492, 3)
    model, rows = F.capacity_rows(results / "serve" / "serve_check.json")
    assert model == "smollm2-135m-instruct-fp32" and dict((n, c) for n, c, _ in rows)["mosaic-r3"] == 4800640


def test_served_runs_give_capacity_panels_from_their_bench_serving_lines(tmp_path):
    """One panel per served run's folder: each ``bench-<config>.jsonl``'s ``server_info.max_total_num_tokens``, the
    ratio against the dense server of the same TP; a folder with the dense server alone gives no rows."""
    run = tmp_path / "served" / "8b"
    run.mkdir(parents=True)
    for name, cap, backend in (("dense", 332253, "flashinfer"), ("mosaic-r4", 1060288, "mosaic")):
        line = {"output_throughput": 1.0, "server_info": {"max_total_num_tokens": cap, "tp_size": 1,
                                                          "attention_backend": backend, "model_path": "/m/llama-8b"}}
        (run / f"bench-{name}.jsonl").write_text(json.dumps(line) + "\n")
    model, rows = F.served_capacity_rows(sorted(run.glob("*.jsonl")))
    assert model == "llama-8b" and sorted(rows) == [("dense", 332253, 1.0), ("mosaic-r4", 1060288, 3.191)]
    assert F.served_capacity_rows([run / "bench-dense.jsonl"]) == ("llama-8b", [])
    _is_png(F.plot_capacity(sorted(run.glob("*.jsonl")), tmp_path / "cap.png"))


def test_each_plot_writes_a_small_png(results, tmp_path):
    out = tmp_path / "figs"
    q = [results / "quality_a.json"]
    acc = [results / "acc-dense.json", results / "acc-mosaic.json"]
    _is_png(F.plot_accuracy(q, out / "a.png"))
    _is_png(F.plot_suite(acc, out / "s.png"))
    _is_png(F.plot_throughput([results / "serve" / "throughput.json", results / "serve" / "bench_mosaic.jsonl"],
                              out / "b.png"))
    _is_png(F.plot_tpot([results / "decode_speed_graph.json"], out / "c.png"))
    sweep = results / "serve" / "sweep.json"
    _is_png(F.plot_tpot([results / "decode_speed_graph.json"], out / "c_both.png", served=[sweep]))
    _is_png(F.plot_tpot([], out / "c_served.png", served=[sweep, results / "serve" / "throughput.json"]))
    assert F.plot_tpot([], out / "c_none.png", served=[results / "serve" / "throughput.json"]) is None
    _is_png(F.plot_throughput([sweep], out / "b_sweep.png"))
    _is_png(F.plot_capacity([sweep], out / "d_sweep.png"))
    _is_png(F.plot_capacity([results / "serve" / "serve_check.json", results / "serve" / "throughput.json"],
                            out / "d.png"))


def test_plots_skip_cleanly_without_inputs(tmp_path, caplog):
    out = tmp_path / "figs"
    with caplog.at_level(logging.INFO, logger="bench.figures"):
        assert F.plot_accuracy([], out / "a.png") is None
        assert F.plot_suite([], out / "s.png") is None
        assert F.plot_throughput([], out / "b.png") is None
        assert F.plot_tpot([], out / "c.png") is None
        assert F.plot_tpot([], out / "c.png", served=[]) is None
        assert F.plot_capacity([], out / "d.png") is None
    assert not out.exists()
    assert sum("skipped" in r.message for r in caplog.records) == 6
    # an accuracy-suite run whose label gives no ratio is skipped with the flag that fixes it
    (tmp_path / "x.json").write_text(json.dumps(_accuracy("sparse", 0.5)))
    with caplog.at_level(logging.INFO, logger="bench.figures"):
        assert F.plot_suite([tmp_path / "x.json"], out / "s.png") is None
    assert any("pass --ratio sparse=X" in r.message for r in caplog.records)


def test_main_draws_every_figure_found_and_nothing_from_an_empty_folder(results, tmp_path):
    out = tmp_path / "figs"
    assert F.main(["--results", str(results), "--out", str(out), "--ratio", "mosaic-r3=2.65"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(F.FILE_NAMES.values())
    for p in out.iterdir():
        _is_png(p)
    empty, out2 = tmp_path / "empty", tmp_path / "figs2"
    empty.mkdir()
    assert F.main(["--results", str(empty), "--out", str(out2)]) == 0
    assert not out2.exists()
    with pytest.raises(SystemExit):
        F.main(["--ratio", "mosaic=abc"])


def test_a_missing_matplotlib_is_named_with_its_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(RuntimeError, match="matplotlib: expected the package .*uv sync --extra bench"):
        F._pyplot()


def test_committed_figures_are_small_pngs():
    pngs = sorted((REPO / "bench" / "figures").glob("*.png"))
    assert {p.name for p in pngs} >= set(F.FILE_NAMES.values())
    for p in pngs:
        _is_png(p)


def test_raw_bench_serving_files_of_one_folder_share_a_panel(tmp_path):
    """bench-dense.jsonl and bench-mosaic-r3.jsonl of one run (no tag) are two lines of one panel, named by file."""
    run = tmp_path / "8b"
    run.mkdir()
    for name, tput in (("dense", 360.0), ("mosaic-r3", 90.0)):
        line = {"tag": None, "dataset_name": "random-ids", "request_rate": "inf", "max_concurrency": None,
                "completed": 32, "random_input_len": 8000, "random_output_len": 256, "server_info": {},
                "output_throughput": tput}
        (run / f"bench-{name}.jsonl").write_text(json.dumps(line))
    pts = [p for f in sorted(run.glob("*.jsonl")) for p in F.throughput_points(f, tmp_path)]
    assert [(p["config"], p["concurrency"], p["output_throughput"]) for p in pts] == [
        ("dense", 32, 360.0), ("mosaic-r3", 32, 90.0)]
    assert len({p["panel"] for p in pts}) == 1 and pts[0]["panel"].startswith("8b/*.jsonl")


def test_suite_points_group_runs_by_folder_with_family_ratio_and_counts(tmp_path):
    runs = {"a/acc-dense.json": ("dense", 0.5), "a/acc-fp8.json": ("fp8", 0.5), "a/acc-m3.json": ("mosaic-r3", 0.6),
            "a/acc-t3.json": ("token-only-r3", 0.25), "a/acc-c4.json": ("channel-only-r4", 0.75),
            "b/acc-dense.json": ("dense", 0.4)}
    for name, (label, avg) in runs.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(json.dumps(_accuracy(label, avg, total=8)))
    groups = F.suite_points(sorted(tmp_path.glob("*/*.json")), root=tmp_path)
    assert sorted(groups) == ["a", "b"]
    got = {(p["label"], p["family"], p["ratio"], p["correct"], p["total"]) for p in groups["a"]}
    assert got == {("dense", "dense", 1.0, 4, 8), ("fp8", "fp8", 2.0, 4, 8), ("mosaic-r3", "mosaic", 3.0, 5, 8),
                   ("token-only-r3", "token-only", 3.0, 2, 8), ("channel-only-r4", "channel-only", 4.0, 6, 8)}
    assert [p["label"] for p in groups["b"]] == ["dense"]
    # one binomial standard error: sqrt(p (1 - p) / n)
    by_label = {p["label"]: p for p in groups["a"]}
    assert F._stderr(by_label["channel-only-r4"]) == pytest.approx((0.75 * 0.25 / 8) ** 0.5)
    _is_png(F.plot_suite(sorted(tmp_path.glob("*/*.json")), tmp_path / "s.png", root=tmp_path))
