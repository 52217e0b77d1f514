# SPDX-License-Identifier: Apache-2.0
"""bench.soak on the CPU: the seeded workload, the driver's counts and exit status against a fake SGLang server
(tests/soak_fake_sglang.py), the equal-alone comparison, the server-log leak scan against SGLang 0.5.17's own message
format, and the sidecar finder on a real spawned process tree. How a real server holds up is what the soak itself
measures (GPU machine)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.serve_check import Server
from bench.soak import (
    WorkloadSpec,
    _proc_table_from_procfs,
    compare_outputs,
    descendants,
    find_sidecars,
    kill_one_sidecar,
    main,
    make_workload,
    merge_stream_ids,
    process_table,
    restarts_seen,
    scan_log,
    summarize,
)

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:  # --import-mode=importlib puts no test folder on sys.path
    sys.path.insert(0, str(TESTS))

from soak_fake_sglang import FakeSGLang, fake_output  # noqa: E402

SMALL = ["--requests", "48", "--concurrency", "8", "--max-context", "400", "--vocab-size", "6000", "--prefix-len",
         "96", "--suffix-len", "4", "32", "--min-input", "8", "--output-len", "4", "20", "--alone-subset", "6",
         "--alone-max-tokens", "8", "--progress-every", "0.05", "--idle-settle", "0", "--timeout", "20"]  # fmt: skip


def _run(fake: FakeSGLang, tmp_path: Path, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "soak.json"
    code = main(["--url", fake.url, *SMALL, "--out", str(out), *extra])
    return code, json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------------------------
# Workload


def test_workload_is_seeded_and_has_the_mix():
    """Same seed, same requests; another seed, other requests. 1,000 requests carry the asked shares of shared
    prefixes, streams, cancellations and n > 1 (within a few points), every prompt + max_new_tokens fits the context,
    ids stay in [id_low, id_high), and the alone subset is exactly K greedy, uncancelled, n = 1 requests."""
    spec = WorkloadSpec(requests=1000, seed=3, max_context=4096, id_low=500, id_high=20000, num_prefixes=4,
                        prefix_len=1024, alone_subset=20, alone_max_tokens=24)  # fmt: skip
    reqs = make_workload(spec)
    assert reqs == make_workload(spec)
    assert [r.input_ids for r in make_workload(WorkloadSpec(requests=1000, seed=4, max_context=4096))] != \
        [r.input_ids for r in reqs]  # fmt: skip
    assert len(reqs) == 1000 and [r.index for r in reqs] == list(range(1000))
    for r in reqs:
        assert len(r.input_ids) + r.max_new_tokens <= spec.max_context, r.index
        assert all(spec.id_low <= t < spec.id_high for t in r.input_ids), r.index
        assert r.body()["sampling_params"]["max_new_tokens"] == r.max_new_tokens
    share = lambda pred: sum(map(pred, reqs)) / len(reqs)  # noqa: E731
    assert abs(share(lambda r: r.prompt == "shared-prefix") - spec.shared_fraction) < 0.06
    assert abs(share(lambda r: r.stream) - spec.stream_fraction) < 0.06
    assert abs(share(lambda r: r.cancel_after is not None) - spec.cancel_fraction) < 0.04
    assert abs(share(lambda r: r.n > 1) - spec.n_fraction) < 0.04
    assert all(r.stream and 1 <= r.cancel_after <= 4 and r.max_new_tokens >= 64 for r in reqs if r.cancel_after)
    assert all(2 <= r.n <= spec.max_n and r.body()["sampling_params"]["n"] == r.n for r in reqs if r.n > 1)
    alone = [r for r in reqs if r.alone]
    assert len(alone) == 20
    assert all(r.temperature == 0.0 and r.n == 1 and r.cancel_after is None and r.max_new_tokens == 24 for r in alone)
    # shared prompts: one of num_prefixes prefixes of prefix_len tokens, then a distinct suffix
    shared = [r for r in reqs if r.prompt == "shared-prefix"]
    assert len({r.input_ids[: spec.prefix_len] for r in shared}) == 4
    assert {r.prefix for r in shared} == {0, 1, 2, 3}
    assert len({r.input_ids for r in shared}) == len(shared)
    # random prompts: mixed lengths, some near the context limit, some short
    rand = [len(r.input_ids) + r.max_new_tokens for r in reqs if r.prompt == "random"]
    assert max(rand) > 0.9 * spec.max_context and min(rand) < 0.1 * spec.max_context
    assert len({len(r.input_ids) for r in reqs if r.prompt == "random"}) > 100


@pytest.mark.parametrize("kwargs, match", [
    ({"requests": 0}, r"--requests: expected at least 1, got 0"),
    ({"cancel_fraction": 0.5, "stream_fraction": 0.2}, r"--cancel-fraction: expected at most --stream-fraction"),
    ({"max_context": 100}, r"--max-context: expected at least --min-input \+ the longest output"),
    ({"id_low": 10, "id_high": 10}, r"--id-low/--id-high: expected 0 <= low < high"),
    ({"alone_subset": 5, "requests": 4}, r"--alone-subset: expected 0..4"),
])  # fmt: skip
def test_workload_spec_refuses_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WorkloadSpec(**kwargs)


def test_cli_refuses_restart_without_launch(tmp_path, capsys):
    """--restart restarts only a server the script started: with --url it is an argument error (status 2)."""
    with pytest.raises(SystemExit) as exc:
        main(["--url", "http://127.0.0.1:1", "--restart", "--out", str(tmp_path / "x.json")])
    assert exc.value.code == 2
    assert "--restart: expected --launch" in capsys.readouterr().err


def test_server_from_args_parses_the_launch_string(tmp_path):
    """--launch passes one argument list: model and port are picked out (both spellings), the rest kept in order."""
    with pytest.raises(ValueError, match=r"--model-path: expected it among the server arguments"):
        Server.from_args(["--port", "3"], tmp_path / "log")
    with pytest.raises(ValueError, match=r"--port: expected a port number, got 'x'"):
        Server.from_args(["--model-path", "M", "--port=x"], tmp_path / "log")


# ---------------------------------------------------------------------------------------------------------------
# Client pieces


def test_merge_stream_ids_handles_cumulative_and_incremental_chunks():
    """SGLang streams cumulative output_ids by default and deltas with --incremental-streaming-output."""
    have: list = []
    for k in range(1, 5):  # cumulative: the whole list each time
        have = merge_stream_ids(have, list(range(k)), k)
    assert have == [0, 1, 2, 3]
    have = []
    for k in range(1, 5):  # incremental: one new id each time
        have = merge_stream_ids(have, [k - 1], k)
    assert have == [0, 1, 2, 3]


def test_compare_outputs_reports_the_first_difference():
    assert compare_outputs([1, 2, 3], [1, 2, 3])["equal"] is True
    assert compare_outputs([1, 2, 3], [1, 9, 3]) == {"equal": False, "first_diff": 1, "len_under_load": 3,
                                                     "len_alone": 3}  # fmt: skip
    assert compare_outputs([1, 2], [1, 2, 3])["first_diff"] == 2
    assert compare_outputs(None, [1])["equal"] is None


def test_restarts_seen():
    a = {"startup_time": 1.0, "schedulers": [10, 11]}
    assert restarts_seen(a, dict(a), None) == []
    assert restarts_seen(a, {"startup_time": 2.0, "schedulers": [10, 11]}, None)[0].startswith("startup_time changed")
    assert restarts_seen(a, {"startup_time": 1.0, "schedulers": [12, 11]}, None)[0].startswith("scheduler pids")
    assert restarts_seen(a, {"startup_time": None, "schedulers": None}, -9)[0] == "server process exited with -9"


# ---------------------------------------------------------------------------------------------------------------
# The driver against the fake server


def test_driver_counts_a_clean_soak(tmp_path, capsys):
    """Every request is sent; cancelled streams count as cancelled (not failed) and really close the connection;
    n > 1 requests return n samples; streamed and not streamed outputs are the fake's; alone outputs equal; exit 0."""
    with FakeSGLang(token_delay=0.002) as fake:
        code, rep = _run(fake, tmp_path)
        disconnects = fake.disconnects
    reqs = make_workload(WorkloadSpec(requests=48, max_context=400, id_low=1000, id_high=5000, prefix_len=96,
                                      suffix_len=(4, 32), min_input=8, output_len=(4, 20), alone_subset=6,
                                      alone_max_tokens=8))  # fmt: skip
    assert rep["workload"]["requests"] == 48 and tuple(rep["workload"]["suffix_len"]) == (4, 32)
    load = rep["load"]
    n_cancel = sum(r.cancel_after is not None for r in reqs)
    assert n_cancel > 0 and any(r.n > 1 for r in reqs) and any(r.stream and not r.cancel_after for r in reqs)
    assert (load["sent"], load["failed"], load["cancelled"], load["not_sent"]) == (48, 0, n_cancel, 0)
    assert load["completed"] == 48 - n_cancel
    assert load["by_kind"]["cancel-mid-stream"] == {"sent": n_cancel, "completed": 0, "failed": 0,
                                                    "cancelled": n_cancel}  # fmt: skip
    assert load["by_kind"]["n>1"]["completed"] == sum(r.n > 1 for r in reqs)
    assert load["output_tokens"] == sum(r.n * r.max_new_tokens for r in reqs if r.cancel_after is None)
    assert load["finish_reasons"] == {"length": sum(r.n for r in reqs if r.cancel_after is None)}
    assert load["latency_s"]["count"] == 48 - n_cancel and load["ttft_s"]["count"] > 0
    assert disconnects >= n_cancel  # the fake saw each cancelled client go away
    assert rep["alone"]["compared"] == 6 and rep["alone"]["equal"] == 6 and "ratio 1" in rep["alone"]["note"]
    assert rep["idle"]["idle"] is True and rep["server_restarts"] == 0 and rep["kv_tokens_leaked"] == 0
    assert rep["max_token_usage"] == 0.9 and rep["server_context_len"] == 1_000_000
    assert rep["warmup"]["status"] == "completed"  # one sampled request before the load (first-use compilers)
    assert rep["passed"] is True and code == 0
    printed = capsys.readouterr().out
    assert "in flight" in printed and "token_usage 0.90" in printed and printed.rstrip().endswith("-> PASS")


def test_injected_500_is_a_failure_and_fails_the_run(tmp_path):
    """One HTTP 500 is one failed request (class http-500, its message kept), and the exit status is 1."""
    with FakeSGLang(fail=[None, 500]) as fake:  # the first /generate is the sampled warmup, before the load
        code, rep = _run(fake, tmp_path, "--cancel-fraction", "0", "--stream-fraction", "0.3")
    load = rep["load"]
    assert (load["sent"], load["completed"], load["failed"], load["cancelled"]) == (48, 47, 1, 0)
    assert load["errors"]["http-500"]["count"] == 1
    assert load["errors"]["http-500"]["first"][0]["message"] == "injected 500"
    assert code == 1 and rep["passed"] is False and rep["why_failed"] == ["1 requests failed"]


def test_alone_subset_detects_outputs_that_change_under_load(tmp_path):
    """When the server answers differently while other requests run, the replay alone finds the first differing
    position; it is reported, not a failure."""
    with FakeSGLang(differ_under_load=True, token_delay=0.005) as fake:
        code, rep = _run(fake, tmp_path)
    alone = rep["alone"]
    assert alone["compared"] == 6 and alone["differ"] >= 1
    assert all(r["first_diff"] == 2 for r in alone["requests"] if r["equal"] is False)
    assert alone["equal"] + alone["differ"] == 6 and code == 0


def test_leak_in_the_server_log_fails_the_run(tmp_path):
    """A leak report the server writes during the soak fails it, with the tokens leaked; an older report already in
    the log before the soak began is not this soak's."""
    log = tmp_path / "server.log"
    old = "[2026-01-01 10:00:00 TP0] pool memory leak detected! [full] total=100, available=1, evictable=0, " \
          "protected=0, session_held=0, uncached=0"  # fmt: skip
    log.write_text(old + "\n")
    with FakeSGLang() as fake:
        code, rep = _run(fake, tmp_path, "--server-log", str(log))
    assert code == 0 and rep["log"]["leak_reports"] == 0
    new = "[2026-01-01 11:00:00 TP0] pool memory leak detected! [full] total=1000, available=900, evictable=60, " \
          "protected=0, session_held=0, uncached=0"  # fmt: skip
    with FakeSGLang(log_path=log, log_after=10, log_lines=[new]) as fake:
        code, rep = _run(fake, tmp_path, "--server-log", str(log))
    assert rep["log"]["leak_reports"] == 1 and rep["kv_tokens_leaked"] == 40
    assert code == 1 and rep["why_failed"] == ["leak reported (40 KV tokens unaccounted)"]


def test_faults_are_recorded(tmp_path):
    """--flush-during-load posts /flush_cache while requests run (SGLang refuses with 400 then: recorded, not a
    failure); --disconnect-long-prefill closes a long prompt's stream before its first chunk, and the server still
    answers; --kill-sidecar-every with no sidecar around records that none was found."""
    lone = subprocess.Popen(["sleep", "60"])  # a "server" pid with no children: nothing of anyone else gets killed
    with FakeSGLang(token_delay=0.004, long_prompt=300, prefill_delay=1.5) as fake:
        code, rep = _run(fake, tmp_path, "--flush-during-load", "2", "--disconnect-long-prefill",
                         "--long-prefill-tokens", "350", "--disconnect-after", "0.3", "--kill-sidecar-every", "0.1",
                         "--sidecar-respawn-wait", "0.1", "--server-pid", str(lone.pid))  # fmt: skip
        time.sleep(1.5)  # the fake's long request notices the closed socket once its "prefill" ends
        flushes, disconnects = list(fake.flushes), fake.disconnects
    lone.kill()
    lone.wait()
    faults = rep["faults"]
    flush = [f for f in faults if f["fault"] == "flush_cache"]
    assert len(flush) == 2 and [f["status"] for f in flush] == flushes[:2] and all(f["t"] >= 0 for f in flush)
    [disc] = [f for f in faults if f["fault"] == "disconnect_long_prefill"]
    assert disc["closed"].startswith("during prefill") and disc["prompt_tokens"] == 350
    assert disc["after"]["ok"] is True and disc["after"]["health"] == 200
    assert disconnects >= 1 + rep["load"]["cancelled"]
    kills = [f for f in faults if f["fault"] == "kill_sidecar"]
    assert kills and all(f["outcome"] == "no sidecar process found" for f in kills)
    assert rep["fault_checks_failed"] == 0 and code == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path, monkeypatch, server_args: str, *extra: str) -> tuple[int, dict]:
    """bench.soak --launch with the fake as the server module (a real process, started and stopped by the driver)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "soak.json"
    code = main(["--launch", f"--model-path none --port {_free_port()} {server_args}", "--launch-module",
                 "soak_fake_sglang", *SMALL, "--out", str(out), *extra])  # fmt: skip
    return code, json.loads(out.read_text())


def test_launch_and_planned_restart(tmp_path, monkeypatch):
    """--launch starts the server with a log beside --out; --restart stops it with SIGTERM, starts it again with the
    same flags and checks it: one planned restart, no unplanned one, the same greedy output; stopped at the end."""
    code, rep = _launch(tmp_path, monkeypatch, "", "--restart")
    assert rep["load"]["completed"] + rep["load"]["cancelled"] == 48
    restart = rep["restart"]
    assert restart["ok"] and restart["same_greedy_output"] and restart["stop_returncode"] == -signal.SIGTERM
    assert restart["after"]["health"] == 200 and restart["log_scan"]["leak_reports"] == 0
    assert (rep["planned_restarts"], rep["server_restarts"], rep["final_stop_returncode"]) == (1, 0, -signal.SIGTERM)
    assert (tmp_path / "soak.server.log").read_text().startswith("fake SGLang serving at")
    assert (tmp_path / "soak.server.restart.log").read_text().startswith("fake SGLang serving at")
    assert code == 0


def test_server_exit_during_load_is_an_unplanned_restart(tmp_path, monkeypatch):
    """The started server dies mid-load: recorded when it happens, requests fail, one unplanned restart, exit 1."""
    code, rep = _launch(tmp_path, monkeypatch, "--exit-after 10")
    assert rep["server_restarts"] == 1 and rep["restart_reasons"] == ["server process exited with 3"]
    assert any(f["fault"] == "server_exited" and f["returncode"] == 3 for f in rep["faults"])
    assert rep["load"]["failed"] >= 1 and rep["idle"]["idle"] is False
    assert code == 1 and any("unplanned server restarts" in w for w in rep["why_failed"])


def test_max_context_above_the_servers_is_refused(tmp_path, capsys):
    """A --max-context the server cannot serve would turn long prompts into 400s: refused up front (status 2)."""
    with FakeSGLang(context_len=300) as fake:
        code = main(["--url", fake.url, *SMALL, "--out", str(tmp_path / "x.json")])
        assert fake.generated == 0
    assert code == 2 and not (tmp_path / "x.json").exists()
    assert "--max-context: expected at most the server's context length (300), got 400" in capsys.readouterr().err


def test_summarize_counts_requests_never_sent():
    reqs = make_workload(WorkloadSpec(requests=5, alone_subset=0))
    s = summarize(reqs, [])
    assert (s["sent"], s["not_sent"], s["completed"]) == (0, 5, 0)


# ---------------------------------------------------------------------------------------------------------------
# Server log


def _sglang_source(relpath: str) -> str:
    """Source text of an installed SGLang module (read, not imported: importing the scheduler takes many seconds)."""
    spec = importlib.util.find_spec("sglang")
    assert spec is not None and spec.origin is not None
    return (Path(spec.origin).parent / relpath).read_text()


def test_leak_message_formats_are_sglang_0517s():
    """The lines below copy SGLang 0.5.17's format strings (SchedulerInvariantChecker); if an upgrade changes them,
    this fails and scan_log must follow."""
    src = _sglang_source("srt/managers/scheduler_components/invariant_checker.py")
    assert 'msg = f"{pool_name} memory leak detected! {token_msg}"' in src
    assert 'f"[{pool_name}] {total=}, {available=}, {evictable=}, "' in src
    assert 'f"{protected=}, {session_held=}, {uncached=}"' in src
    assert '"req_to_token_pool memory leak detected!"' in src and 'f"available_size=' in src
    assert 'assert not full_leak, f"Full Pool Mem Leak Detected! {full_msg}"' in src
    assert 'self.invariant_checker._report_leak("pool", "\\n".join(messages))' in _sglang_source(
        "srt/managers/scheduler.py")  # on_idle reports through _report_leak


# Shaped by SGLang 0.5.17: logging format "[%(asctime)s TP0] %(message)s"; _report_leak's message
# f"{pool_name} memory leak detected! {token_msg}" with token_msg the "\n"-joined
# f"[{pool_name}] {total=}, {available=}, {evictable=}, {protected=}, {session_held=}, {uncached=}" lines.
WARN_LEAK = ("[2026-03-01 10:00:00 TP0] pool memory leak detected! [full] total=5000, available=4800, evictable=128, "
             "protected=0, session_held=0, uncached=0")  # fmt: skip
STRICT_LEAK = """[2026-03-01 10:00:00 TP0] Scheduler hit an exception: Traceback (most recent call last):
  File "/x/sglang/srt/managers/scheduler.py", line 3946, in on_idle
    self.invariant_checker._report_leak("pool", "\\n".join(messages))
ValueError: pool memory leak detected! [full] total=5000, available=4700, evictable=0, protected=64, session_held=0, \
uncached=0
[swa] total=100, available=100, evictable=0, protected=0, session_held=0, uncached=0
"""  # fmt: skip
REQ_LEAK = ("[2026-03-01 10:00:01 TP0] req_to_token_pool memory leak detected!available_size=30, session_held=0, "
            "total_size=32")  # fmt: skip
BUSY_LINE = ("[2026-03-01 10:00:00 TP0] [Mem Check (BUSY)] [full] total=5000, available=10, evictable=0, protected=0, "
             "session_held=0, uncached=4000")  # fmt: skip


def test_scan_log_finds_sglang_leak_reports():
    """The warning form and the strict form (a ValueError in the scheduler's traceback) both count, with the tokens
    the pool line leaves unaccounted; the req-pool report too; busy-check lines and a clean log count nothing."""
    warn = scan_log("startup\n" + WARN_LEAK + "\nmore\n")
    assert warn["leak_reports"] == 1 and warn["kv_tokens_leaked"] == 72 and warn["tracebacks"] == 0
    assert warn["first_leak_reports"][0]["line"] == 2
    assert warn["first_leak_reports"][0]["pools"] == [{"pool": "full", "total": 5000, "unaccounted": 72}]
    strict = scan_log(STRICT_LEAK)
    assert strict["leak_reports"] == 1  # the ValueError line (the traceback's source line is not a report)
    assert strict["kv_tokens_leaked"] == 236 and strict["tracebacks"] == 1 and strict["crashed_components"] == [
        "Scheduler"]  # fmt: skip
    req = scan_log(REQ_LEAK)
    assert req["leak_reports"] == 1 and req["first_leak_reports"][0]["req_slots_unaccounted"] == 2
    clean = scan_log(BUSY_LINE + "\n[2026-03-01 10:00:00 TP0] Prefill batch. #new-seq: 1\n")
    assert clean == {"leak_reports": 0, "first_leak_reports": [], "kv_tokens_leaked": 0, "tracebacks": 0,
                     "first_traceback_lines": [], "crashed_components": [], "retractions": 0, "retracted_reqs": 0,
                     "arena_full_warnings": 0}  # fmt: skip


def test_retraction_message_format_is_sglang_0517s():
    """RETRACT below copies the scheduler's message; if an upgrade changes it, this fails and scan_log must follow."""
    src = _sglang_source("srt/managers/scheduler.py")
    assert '"KV cache pool is full. Retract requests. "' in src
    assert 'msg_details = f"#retracted_reqs: {len(retracted_reqs)}, #new_tokens_gained: {new_token_gained}"' in src


def test_arena_full_line_is_the_sealers_warning():
    """ARENA_FULL below copies the sealer's warning; if its wording changes, this fails and scan_log must follow."""
    from mosaickv_sglang import sealer

    assert '"MosaicKV: compressed arena full (%d of %d granules reserved); %d pages stay dense"' in (
        Path(sealer.__file__).read_text())


RETRACT = ("[2026-03-01 10:00:02 TP0] KV cache pool is full. Retract requests. #retracted_reqs: {n}, "
           "#new_tokens_gained: 1280, #new_token_ratio: 0.4000 -> 0.5500")  # fmt: skip
ARENA_FULL = ("[2026-03-01 10:00:03 TP0] MosaicKV: compressed arena full (1000 of 1000 granules reserved); "
              "3 pages stay dense")  # fmt: skip


def test_scan_log_counts_retractions_and_full_arenas():
    log = "\n".join([RETRACT.format(n=3), BUSY_LINE, RETRACT.format(n=1), ARENA_FULL, "decode batch"])
    got = scan_log(log)
    assert (got["retractions"], got["retracted_reqs"], got["arena_full_warnings"]) == (2, 4, 1)
    assert got["leak_reports"] == 0 and got["tracebacks"] == 0


# ---------------------------------------------------------------------------------------------------------------
# Sidecar processes


@pytest.fixture
def server_tree():
    """A real tree: root (like launch_server) -> spawned scheduler -> spawned sidecar; yields (root, title)."""
    procs = []

    def start(title: str) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
        code = f"import soak_fake_sglang as m; m.tree_root({title!r})"
        p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, env=env, start_new_session=True)
        procs.append(p)
        return p

    yield start
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def _wait_sidecars(root, timeout=30.0, table=process_table):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        found = find_sidecars(table(), root)
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"no sidecar under {root} after {timeout} s")


def test_finder_picks_the_scheduler_spawn_child_only(server_tree):
    """With the scheduler titled as SGLang titles it: exactly the grandchild is found, under the root and in a scan of
    every process; the scheduler (itself a spawn child of the root) and the resource tracker are not. /proc and
    psutil agree."""
    root = server_tree("sglang::scheduler_TP0")
    [sidecar] = _wait_sidecars(root.pid)
    table = process_table()
    sched = table[sidecar].ppid
    assert table[sched].ppid == root.pid and table[sched].cmdline.startswith("sglang::scheduler_TP0")
    assert "spawn_main" in table[sidecar].cmdline
    assert sidecar in find_sidecars(table) and sched not in find_sidecars(table)
    assert set(descendants(table, root.pid)) >= {sched, sidecar}
    assert find_sidecars(_proc_table_from_procfs(), root.pid) == [sidecar]


def test_finder_without_titles_uses_the_tree_and_kill_sees_the_replacement(server_tree):
    """Untitled scheduler: the spawn grandchild of the root is still the one; SIGKILL it and the scheduler's new one
    is reported as its replacement."""
    root = server_tree("")
    [sidecar] = _wait_sidecars(root.pid)
    res = kill_one_sidecar(root.pid, wait=30.0)
    assert res["outcome"] == "replaced" and res["killed"] == sidecar and res["pids_before"] == [sidecar]
    assert len(res["new"]) == 1 and res["new"][0] != sidecar
    assert find_sidecars(process_table(), root.pid) == res["new"]


def test_fake_output_is_deterministic():
    assert fake_output([1, 2], 3) == fake_output([1, 2], 3) != fake_output([1, 2], 3, sample=1)


def test_send_deadline_stops_sending_and_still_writes_the_report(tmp_path):
    """Past --send-deadline no new request is sent: they count as not sent (not failed), the in-flight ones finish,
    the alone subset compares only requests that ran, and the report is written."""
    with FakeSGLang(token_delay=0.01) as fake:
        code, rep = _run(fake, tmp_path, "--concurrency", "2", "--send-deadline", "0.3")
    load = rep["load"]
    assert rep["send_deadline_hit"] is True
    assert 0 < load["sent"] < 48 and load["not_sent"] == 48 - load["sent"] and load["failed"] == 0
    assert load["completed"] + load["cancelled"] == load["sent"]
    skipped = [r for r in rep["alone"]["requests"] if r["alone_status"] == "not-sent"]
    assert rep["alone"]["compared"] + len(skipped) <= 6 and rep["alone"]["differ"] == 0
    assert code == 0 and rep["passed"] is True


def test_send_deadline_must_not_be_negative(tmp_path):
    with pytest.raises(SystemExit):
        main(["--url", "http://127.0.0.1:1", "--send-deadline", "-1", "--out", str(tmp_path / "x.json")])
