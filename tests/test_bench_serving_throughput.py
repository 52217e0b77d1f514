# SPDX-License-Identifier: Apache-2.0
"""bench.serving_throughput: the sweep's points, the time budget, and whole runs of the script against a fake
``launch_server`` and a fake ``bench_serving`` (tests/throughput_fake_sglang.py), one server per configuration, read
back by bench.figures; the flags it passes are bench_serving's own (SGLang 0.5.17)."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shlex
import socket
import sys
import time
from pathlib import Path

import pytest

from bench import figures as F
from bench import serving_throughput as T

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # --import-mode=importlib puts no test folder on sys.path
    sys.path.insert(0, str(TESTS))

from throughput_fake_sglang import capacity, fake_metrics  # noqa: E402

RANDOM = "--dataset-name random-ids --random-input-len 2000 --random-output-len 64 --random-range-ratio 1.0"
SHARED = ("--dataset-name generated-shared-prefix --gsp-num-groups 2 --gsp-prompts-per-group 4 "
          "--gsp-system-prompt-len 4096 --gsp-question-len 128 --gsp-output-len 32")  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# =====================================================================================================================
# points and budget (no processes)
# =====================================================================================================================
def test_concurrency_points_scale_the_requests_unless_the_workload_fixes_them():
    pts = T.workload_points("random", shlex.split(RANDOM), [1, 8, 32], prompts_per_slot=4, min_prompts=16)
    assert [(p.max_concurrency, p.num_prompts) for p in pts] == [(1, 16), (8, 32), (32, 128)]
    assert pts[1].args[-4:] == ["--max-concurrency", "8", "--num-prompts", "32"] and pts[1].slug == "random-c8"
    fixed = T.workload_points("r", shlex.split(RANDOM + " --num-prompts=50"), [1, 8], 4, 16)
    assert [p.num_prompts for p in fixed] == [50, 50] and fixed[1].args[-2:] == ["--max-concurrency", "8"]
    # generated-shared-prefix sends groups x prompts-per-group requests whatever --num-prompts says
    gsp = T.workload_points("shared", shlex.split(SHARED), [2, 64], 4, 16)
    assert [p.num_prompts for p in gsp] == [8, 8] and all("--num-prompts" not in p.args for p in gsp)
    assert T.workload_points("g", ["--dataset-name", "generated-shared-prefix"], [4], 4, 16)[0].num_prompts == 64 * 16
    # without a sweep: the workload once, as given
    (one,) = T.workload_points("w", shlex.split(RANDOM + " --max-concurrency 4 --num-prompts 32"), [], 4, 16)
    assert (one.max_concurrency, one.num_prompts, one.args) == (4, 32, shlex.split(RANDOM) + ["--max-concurrency",
                                                                                              "4", "--num-prompts",
                                                                                              "32"])  # fmt: skip


@pytest.mark.parametrize("args,match", [
    (RANDOM + " --max-concurrency 4", "--workload w: expected no --max-concurrency with --concurrency"),
    (RANDOM + " --port 1", "--workload w: expected no --port"),
    (RANDOM + " --output-file=x.jsonl", "--workload w: expected no --output-file"),
    (RANDOM + " --num-prompts many", "--workload w: --num-prompts: expected an integer, got 'many'"),
])  # fmt: skip
def test_workloads_that_clash_with_the_sweep_are_refused(args, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        T.workload_points("w", shlex.split(args), [2], 4, 16)


def test_context_points_send_a_batch_of_exact_length_prompts_at_once():
    pts = T.context_points([4096, 32768], [1, 16], 128)
    assert [(p.context_length, p.max_concurrency, p.num_prompts) for p in pts] == [
        (4096, 1, 1), (32768, 1, 1), (4096, 16, 16), (32768, 16, 16)]
    a = pts[2].args
    for flag, value in [("--dataset-name", "random-ids"), ("--random-input-len", "4096"),
                        ("--random-output-len", "128"), ("--random-range-ratio", "1.0"), ("--request-rate", "inf"),
                        ("--max-concurrency", "16"), ("--num-prompts", "16")]:  # fmt: skip
        assert T.flag_value(a, flag) == value, flag
    assert "--tokenize-prompt" in a and pts[2].slug == "context-L4096-b16"


def test_context_points_keep_special_tokens_in_the_streamed_text():
    """bench_serving counts a token only when the streamed text grows; dummy weights may emit special tokens only."""
    for p in T.context_points([4096], [1, 16], 64):
        body = json.loads(T.flag_value(p.args, "--extra-request-body"))
        assert body == {"sampling_params": {"temperature": 0.0, "max_new_tokens": 64, "ignore_eos": True,
                                            "skip_special_tokens": False}}  # fmt: skip


def _scrape(e2e: float, count: int, ttft: float, tokens: int, drop: str = "") -> str:
    lines = ["# HELP sglang:e2e_request_latency_seconds Histogram of End-to-end request latency in seconds"]
    for name, v in (("e2e_request_latency_seconds_sum", e2e), ("e2e_request_latency_seconds_count", count),
                    ("time_to_first_token_seconds_sum", ttft), ("generation_tokens_total", tokens),
                    ("time_to_first_token_seconds_count", 99), ("generation_tokens_created", 5.0)):
        if name != drop:  # two label sets, as SGLang splits streamed and not streamed requests
            lines += [f'sglang:{name}{{is_streaming="true",model_name="m"}} {0.75 * v}',
                      f'sglang:{name}{{is_streaming="false",model_name="m"}} {0.25 * v}']
    return "\n".join(lines) + "\n"


def test_server_token_times_are_the_requests_time_after_their_first_token_over_the_later_tokens(monkeypatch):
    pages = {}

    class Resp(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_urlopen(url, timeout):
        if url not in pages:
            raise OSError("connection refused")
        return Resp(pages[url].encode())

    monkeypatch.setattr(T.urllib.request, "urlopen", fake_urlopen)
    pages["http://a/metrics"] = _scrape(e2e=10.0, count=4, ttft=2.0, tokens=400)
    before = T.request_times("http://a")
    assert before == {"sglang:e2e_request_latency_seconds_sum": 10.0, "sglang:e2e_request_latency_seconds_count": 4,
                      "sglang:time_to_first_token_seconds_sum": 2.0, "sglang:generation_tokens_total": 400}
    # 16 more requests of 64 tokens: 12 s to their first tokens, 30 s in all
    pages["http://a/metrics"] = _scrape(e2e=40.0, count=20, ttft=14.0, tokens=400 + 16 * 64)
    got = T.server_token_times(before, T.request_times("http://a"))
    assert got == {"server_requests": 16, "server_mean_ttft_ms": 750.0,
                   "server_mean_tpot_ms": round(1000 * 18.0 / (16 * 63), 3)}  # fmt: skip
    assert T.server_token_times(before, before) == {} and T.server_token_times(None, before) == {}
    pages["http://b/metrics"] = _scrape(1.0, 1, 0.5, 8, drop="time_to_first_token_seconds_sum")
    assert T.request_times("http://b") is None  # no --enable-metrics, or not SGLang's
    assert T.request_times("http://down") is None


def test_tpot_ratios_use_one_measure_on_both_sides_and_never_a_median_that_holds_the_prefill():
    def ctx(n, **kw):
        return {"workload": "context", "kind": "context", "context_length": n, "max_concurrency": 1, **kw}

    dense = {"points": [ctx(1, median_tpot_ms=9.0, median_ttft_ms=100.0, server_mean_tpot_ms=8.0),
                        ctx(2, median_tpot_ms=50.0, median_ttft_ms=0.0, server_mean_tpot_ms=8.0),
                        ctx(3, median_tpot_ms=9.0, median_ttft_ms=100.0)]}
    mosaic = {"points": [ctx(1, median_tpot_ms=4.5, median_ttft_ms=100.0, server_mean_tpot_ms=2.0),
                         ctx(2, median_tpot_ms=40.0, median_ttft_ms=0.0, server_mean_tpot_ms=4.0),
                         ctx(3, median_tpot_ms=3.0, median_ttft_ms=100.0, server_mean_tpot_ms=1.0),
                         ctx(4, median_tpot_ms=3.0, median_ttft_ms=0.0)]}
    rows = {r["context_length"]: r for r in T.summarize({"dense": dense, "mosaic-r4": mosaic})["tpot_vs_dense"]}
    assert rows[1]["median_tpot_vs_dense"] == 0.5 and rows[1]["server_mean_tpot_vs_dense"] == 0.25
    assert rows[2]["server_mean_tpot_vs_dense"] == 0.5 and "median_tpot_ms" not in rows[2]  # no first token seen
    assert rows[3]["median_tpot_vs_dense"] == 0.333 and "server_mean_tpot_ms" not in rows[3]
    assert set(rows) == {1, 2, 3}
    assert T.point_tpot(mosaic["points"][0]) == (2.0, "server_mean_tpot_ms")
    assert T.point_tpot(dense["points"][2]) == (9.0, "median_tpot_ms")
    assert T.point_tpot(mosaic["points"][3]) is None and T.point_tpot({**dense["points"][0], "error": "x"}) is None


def test_parse_workload():
    assert T.parse_workload(f"random={RANDOM}") == ("random", shlex.split(RANDOM))
    for bad in ("random", "=--dataset-name x", "a b=--x", "x=  "):
        with pytest.raises(Exception, match="expected NAME='bench_serving dataset flags'"):
            T.parse_workload(bad)


def test_the_budget_gives_each_configuration_an_equal_share_of_what_is_left():
    now = [100.0]
    b = T.Budget(1000.0, reserve=100.0, min_point=30.0, clock=lambda: now[0])
    d1 = b.share_deadline(3)  # (1000 - 100) / 3
    assert d1 == 400.0 and b.can_start(d1)
    now[0] = 380.0
    assert b.room(d1) == 20.0 and not b.can_start(d1)
    now[0] = 400.0
    assert b.share_deadline(2) == 400.0 + (700.0 - 100.0) / 2  # what the first left unused passes on
    now[0] = 1050.0
    assert b.share_deadline(1) == 1050.0 and b.left() == 50.0  # the reserve is not shared out
    unlimited = T.Budget(None)
    assert unlimited.share_deadline(2) == float("inf") and unlimited.can_start(float("inf"))


def test_the_flags_passed_to_bench_serving_are_its_own():
    """Every flag the script adds, and those of the workloads above, is an option of SGLang 0.5.17's
    sglang/benchmark/serving.py (read as text: importing it takes half a minute)."""
    spec = importlib.util.find_spec("sglang")
    assert spec is not None and spec.origin is not None
    source = (Path(spec.origin).parent / "benchmark" / "serving.py").read_text()
    assert 'if __name__ == "__main__":' in source  # runnable as python -m sglang.benchmark.serving
    points = (T.workload_points("r", shlex.split(RANDOM), [4], 4, 16)
              + T.workload_points("s", shlex.split(SHARED), [4], 4, 16) + T.context_points([1024], [2], 8))
    flags = {a.split("=")[0] for p in points for a in p.args if a.startswith("--")}
    flags |= {"--flush-cache", "--disable-tqdm", "--backend", "--host", "--port", "--model", "--tokenizer",
              "--output-file"}  # fmt: skip
    assert len(flags) > 15
    missing = sorted(f for f in flags if f'"{f}"' not in source)
    assert not missing, missing


# =====================================================================================================================
# whole runs against the fakes
# =====================================================================================================================
def _run(tmp_path: Path, monkeypatch, *extra: str, configs=("dense", "mosaic-r3"), env=None) -> dict:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_BENCH_CALLS", str(tmp_path / "calls.jsonl"))
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "out"
    assert T.main(["--model", "/m/fake-model", "--configs", *configs, "--port", str(_free_port()),
                   "--launch-module", "throughput_fake_sglang", "--bench-module", "throughput_fake_bench",
                   "--ready-timeout", "60", "--out", str(out), *extra]) == 0  # fmt: skip
    return json.loads((out / "throughput.json").read_text())


def test_one_server_per_configuration_runs_the_whole_sweep_and_figures_draw_it(tmp_path, monkeypatch):
    doc = _run(tmp_path, monkeypatch, "--workload", f"random={RANDOM}", "--workload", f"shared={SHARED}",
               "--concurrency", "1", "4", "--min-prompts", "6", "--context-lengths", "1024", "4096",
               "--context-batch", "1", "2", "--context-output-len", "16")  # fmt: skip
    assert doc["schema"] == T.SCHEMA == F.THROUGHPUT_SCHEMA and list(doc["configs"]) == ["dense", "mosaic-r3"]
    assert doc["budget"]["cut"] is False
    calls = [json.loads(x) for x in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 2 * 8  # 2 workloads x 2 concurrencies + 2 lengths x 2 batches, per configuration
    assert all(T.flag_value(c, "--model") == "/m/fake-model" and "--flush-cache" in c for c in calls)
    for name, ratio in [("dense", 1.0), ("mosaic-r3", 3.0)]:
        res = doc["configs"][name]
        assert res["max_total_num_tokens"] == capacity(ratio, False) and res["startup_seconds"] > 0
        flag = "--kv-compressor mosaic" if ratio > 1 else "--attention-backend flashinfer"
        assert flag in res["server_command"] and "-m throughput_fake_sglang --model-path /m/fake-model" in (
            res["server_command"])
        got = [(p["kind"], p["workload"], p["max_concurrency"], p["num_prompts"], p.get("context_length"))
               for p in res["points"]]  # fmt: skip
        assert got == [("concurrency", "random", 1, 6, None), ("concurrency", "random", 4, 16, None),
                       ("concurrency", "shared", 1, 8, None), ("concurrency", "shared", 4, 8, None),
                       ("context", "context", 1, 1, 1024), ("context", "context", 1, 1, 4096),
                       ("context", "context", 2, 2, 1024), ("context", "context", 2, 2, 4096)]  # fmt: skip
        assert not any("error" in p or "skipped" in p for p in res["points"])
        random4, shared4, ctx = res["points"][1], res["points"][3], res["points"][7]
        assert random4["bench_args"].endswith("--max-concurrency 4 --num-prompts 16 --flush-cache --disable-tqdm")
        assert "--num-prompts" not in shared4["bench_args"]
        assert random4["output_throughput"] == pytest.approx(fake_metrics(ratio, 2000, 64, 4)["output_throughput"])
        want = fake_metrics(ratio, 4096, 16, 2)
        for key in ("median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms"):
            assert ctx[key] == pytest.approx(want[key]), key
        assert ctx["mean_concurrency"] == 2.0 and "concurrency" not in ctx
        # the server's own times over the point, from /metrics before and after (concurrency points scrape none)
        assert ctx["server_requests"] == 2 and "tpot_note" not in ctx
        assert ctx["server_mean_tpot_ms"] == pytest.approx(want["median_tpot_ms"], rel=1e-3)
        assert ctx["server_mean_ttft_ms"] == pytest.approx(want["mean_ttft_ms"], rel=1e-3)
        assert "server_requests" not in random4
    s = doc["summary"]
    assert s["capacity_vs_dense"] == {"mosaic-r3": 3.0}
    rows = {(r["workload"], r["max_concurrency"]): r for r in s["throughput_vs_dense"]}
    assert set(rows) == {("random", 1), ("random", 4), ("shared", 1), ("shared", 4)}
    r = rows[("random", 4)]
    assert r["output_throughput_vs_dense"] == round(r["output_throughput"] / r["dense_output_throughput"], 3) > 1
    assert {(r["context_length"], r["batch"]) for r in s["tpot_vs_dense"]} == {(1024, 1), (1024, 2), (4096, 1),
                                                                                (4096, 2)}  # fmt: skip
    for r in s["tpot_vs_dense"]:
        assert r["server_mean_tpot_vs_dense"] == round(r["server_mean_tpot_ms"] / r["dense_server_mean_tpot_ms"], 3)
        assert r["median_tpot_vs_dense"] < 1  # the fake's compressed cache decodes faster

    # bench.figures reads it: only throughput.json is a result (the per-point files are not picked up twice)
    out = tmp_path / "out"
    assert {k: [p.name for p in v] for k, v in F.discover(out).items()} == {"throughput": ["throughput.json"]}
    pts = F.throughput_points(out / "throughput.json")
    assert len(pts) == 8 and len({p["panel"] for p in pts}) == 2  # one panel per workload
    assert {(p["config"], p["concurrency"]) for p in pts} == {(c, n) for c in ("dense", "mosaic-r3") for n in (1, 4)}
    served = F.served_tpot_points(out / "throughput.json")
    assert len(served) == 8 and len({p["panel"] for p in served}) == 2  # one panel per batch
    model, caps = F.capacity_rows(out / "throughput.json")
    assert model == "fake-model" and {n: r for n, _, r in caps} == {"dense": 1.0, "mosaic-r3": 3.0}
    figs = tmp_path / "figs"
    assert F.main(["--results", str(out), "--out", str(figs)]) == 0
    assert sorted(p.name for p in figs.iterdir()) == ["kv_capacity.png", "throughput_vs_concurrency.png",
                                                      "tpot_vs_context.png"]  # fmt: skip


def test_a_time_budget_stops_starting_points_and_shares_out_between_configurations(tmp_path, monkeypatch):
    t0 = time.monotonic()
    doc = _run(tmp_path, monkeypatch, "--workload", f"random={RANDOM}", "--concurrency", *map(str, range(1, 11)),
               "--budget-seconds", "12", "--budget-reserve", "0.5", "--min-point-seconds", "0.7",
               env={"FAKE_BENCH_SLEEP": "0.5"})  # fmt: skip
    elapsed = time.monotonic() - t0
    assert elapsed < 12 + 15, elapsed  # the budget plus at most one server stop and one bench start
    assert doc["budget"]["cut"] is True and doc["budget"]["seconds"] == 12
    for name in ("dense", "mosaic-r3"):
        pts = doc["configs"][name]["points"]
        assert len(pts) == 10  # every planned point is listed, measured or skipped
        measured = [p for p in pts if "output_throughput" in p]
        skipped = [p for p in pts if p.get("skipped") == "budget"]
        assert measured and skipped, (name, pts)
        assert len(measured) + len(skipped) + sum("error" in p for p in pts) == 10
        first_skip = pts.index(skipped[0])
        assert all(p.get("skipped") == "budget" for p in pts[first_skip:])  # no point starts after the cut
    # the JSON on disk is the full record
    assert json.loads((tmp_path / "out" / "throughput.json").read_text()) == doc


def test_a_point_past_its_timeout_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    doc = _run(tmp_path, monkeypatch, "--workload", f"random={RANDOM}", "--concurrency", "1", "4", "8",
               "--point-timeout", "2", configs=("dense",), env={"FAKE_BENCH_SLOW": "4:30"})  # fmt: skip
    p1, p4, p8 = doc["configs"]["dense"]["points"]
    assert "output_throughput" in p1 and "output_throughput" in p8
    assert "expected to finish within 2 s, got it still running (killed" in p4["error"] and p4["seconds"] < 10
    assert "output_throughput" not in p4
    assert [r["concurrency"] for r in F.throughput_points(tmp_path / "out" / "throughput.json")] == [1, 8]


def test_a_server_that_exits_mid_sweep_ends_its_configuration_only(tmp_path, monkeypatch):
    # the fake exits after its 3rd /get_server_info: the script's own, then one per bench run
    doc = _run(tmp_path, monkeypatch, "--workload", f"random={RANDOM}", "--concurrency", "1", "2", "3", "4", "5",
               "--server-args", "--fake-exit-after-info 3")  # fmt: skip
    for name in ("dense", "mosaic-r3"):
        res = doc["configs"][name]
        pts = res["points"]
        assert len(pts) == 5 and "output_throughput" in pts[0]
        assert "bench_serving exited with" in pts[1]["error"]
        assert pts[-1]["skipped"] == "server exited" and "server exited with 3 during the sweep" in res["error"]


def test_a_server_that_never_gets_ready_skips_its_points(tmp_path, monkeypatch):
    doc = _run(tmp_path, monkeypatch, "--workload", f"random={RANDOM}", "--concurrency", "1", "2",
               "--server-args", "--port not-a-number", configs=("dense",))  # fmt: skip
    res = doc["configs"]["dense"]
    assert "server exited with 2 before it was ready" in res["error"]
    assert [p["skipped"] for p in res["points"]] == ["server not ready"] * 2


def test_context_points_over_the_servers_input_limit_are_skipped_and_runs_made_apart_merge(tmp_path, monkeypatch):
    common = ["--workload", f"random={RANDOM}", "--concurrency", "2", "--context-lengths", "1024", "4096",
              "--context-batch", "1", "--server-args", "--context-length 2048"]  # fmt: skip
    for name in ("dense", "mosaic-r3"):
        doc = _run(tmp_path / name, monkeypatch, *common, configs=(name,))
        pts = doc["configs"][name]["points"]
        assert [p.get("skipped") for p in pts] == [None, None, "longer than the server's max_req_input_len 2047"]
        assert doc["summary"]["throughput_vs_dense"] == []  # dense ran apart
    calls = (tmp_path / "dense" / "calls.jsonl").read_text().splitlines()
    assert len(calls) == 2  # the skipped point never ran
    assert T.main(["--merge", str(tmp_path / "dense" / "out"), str(tmp_path / "mosaic-r3" / "out" / "throughput.json"),
                   "--out", str(tmp_path / "all")]) == 0  # fmt: skip
    merged = json.loads((tmp_path / "all" / "throughput.json").read_text())
    assert merged["schema"] == T.SCHEMA and list(merged["configs"]) == ["dense", "mosaic-r3"]
    assert [(r["config"], r["max_concurrency"]) for r in merged["summary"]["throughput_vs_dense"]] == [("mosaic-r3", 2)]
    assert [r["context_length"] for r in merged["summary"]["tpot_vs_dense"]] == [1024]
    assert merged["summary"]["capacity_vs_dense"] == {"mosaic-r3": 3.0}
    assert F.classify(merged) == "throughput" and len(F.throughput_points(tmp_path / "all" / "throughput.json")) == 2
    with pytest.raises(FileNotFoundError, match="--merge: expected .*throughput.json, found none"):
        T.main(["--merge", str(tmp_path), "--out", str(tmp_path / "x")])
    (tmp_path / "old.json").write_text(json.dumps({"dense": {"config": "dense", "output_throughput": 1.0}}))
    with pytest.raises(ValueError, match="--merge: expected schema mosaickv.serving_throughput/2 in .*, got None"):
        T.main(["--merge", str(tmp_path / "old.json"), "--out", str(tmp_path / "x")])


@pytest.mark.parametrize("argv,match", [
    (["--concurrency", "0"], "argument --concurrency: expected a positive integer, got '0'"),
    (["--context-lengths", "1k"], "argument --context-lengths: expected a positive integer, got '1k'"),
    (["--budget-seconds", "-1"], "argument --budget-seconds: expected a number of seconds >= 0, got '-1'"),
    (["--workload", "r=--x", "--workload", "r=--y"], "expected distinct names"),
    (["--workload", "context=--x"], "expected distinct names other than 'context'"),
    ([], "expected at least one workload"),
    (["--model", "", "--context-lengths", "8"], "--model: expected a model path (required unless --merge), got none"),
    (["--configs", "sparse", "--context-lengths", "8"], "config: expected dense, fp8 or mosaic-r<ratio>"),
])  # fmt: skip
def test_bad_arguments_are_refused_before_any_server_starts(argv, match, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        T.main(["--model", "m", "--out", str(tmp_path / "out"), *argv])
    assert e.value.code == 2 and match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_the_real_bench_serving_accepts_the_sweep_and_its_result_lines_are_read(tmp_path, monkeypatch, llama_shape):
    """SGLang 0.5.17's own sglang.benchmark.serving against the fake server's /generate (about 40 s a run)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "out"
    small_shared = ("--dataset-name generated-shared-prefix --gsp-num-groups 2 --gsp-prompts-per-group 2 "
                    "--gsp-system-prompt-len 64 --gsp-question-len 16 --gsp-output-len 8")  # fmt: skip
    assert T.main(["--model", str(llama_shape), "--configs", "mosaic-r3", "--port", str(_free_port()),
                   "--launch-module", "throughput_fake_sglang", "--workload",
                   "random=--dataset-name random-ids --random-input-len 64 --random-output-len 8 "
                   "--random-range-ratio 1.0", "--workload", f"shared={small_shared}", "--concurrency", "2",
                   "--min-prompts", "4", "--context-lengths", "128", "--context-batch", "2", "--context-output-len",
                   "8", "--point-timeout", "300", "--out", str(out)]) == 0  # fmt: skip
    pts = json.loads((out / "throughput.json").read_text())["configs"]["mosaic-r3"]["points"]
    assert [p.get("error") for p in pts] == [None] * 3, [p.get("error") for p in pts]
    assert [p["completed"] for p in pts] == [8, 4, 2]
    assert pts[2]["total_input_tokens"] == 2 * 128  # --tokenize-prompt: exactly the context length
    for p in pts:
        assert p["output_throughput"] > 0 and p["median_tpot_ms"] > 0 and p["p99_itl_ms"] > 0
