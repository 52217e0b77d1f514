# SPDX-License-Identifier: Apache-2.0
"""The accuracy suite's HTTP client and CLI, against a local fake OpenAI server (client code only, no model)."""

from __future__ import annotations

import json
import re
import socket

import pytest
from mkv_fake_openai import MODEL, FakeOpenAI

from bench import accuracy as A
from bench import accuracy_report as R


def needle_oracle(prompt: str) -> str:
    """Fake "model": answers niah_single by looking the asked key up in the prompt, anything else wrongly."""
    m = re.search(r"special magic number for (\S+) mentioned", prompt)
    if m is None:
        return " I do not know."
    v = re.search(rf"special magic numbers for {re.escape(m.group(1))} is: (\d+)\.", prompt)
    return f" {v.group(1)}." if v else " none."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_completion_request_is_greedy_and_reads_text_and_usage():
    """POST /v1/completions carries model, prompt, max_tokens and temperature 0; text and usage come back."""
    with FakeOpenAI(answer=lambda p: " 42.") as fake:
        client = A.HttpBackend(fake.url + "/v1/")
        assert client.url == fake.url and client.model == MODEL  # from GET /v1/models
        c = client.complete("one two three", 17)
        assert c == A.Completion(" 42.", 3, 1, "stop")
        assert fake.completions() == [{"model": MODEL, "prompt": "one two three", "max_tokens": 17, "temperature": 0.0}]
        assert client.count_tokens("a b c d") == 4
        tok_req = [r["body"] for r in fake.requests if r["path"] == "/v1/tokenize"]
        assert tok_req == [{"model": MODEL, "prompt": "a b c d", "add_special_tokens": False}]
        info = client.describe()
        assert info["server_info"]["version"] == "fake" and info["models"]["data"][0]["id"] == MODEL


def test_retries_transient_errors_then_succeeds():
    """HTTP 503 and 429 are retried (with backoff); the answer after them is returned."""
    with FakeOpenAI(fail=[503, 429]) as fake:
        client = A.HttpBackend(fake.url, model="m", retries=2, backoff=0.0)
        assert client.complete("x", 4).text == " 0000000."
        assert len(fake.completions()) == 3


def test_gives_up_after_the_retries_with_the_servers_message():
    with FakeOpenAI(fail=[500, 500, 500]) as fake:
        client = A.HttpBackend(fake.url, model="m", retries=1, backoff=0.0)
        with pytest.raises(A.HttpError, match=r"POST .*/v1/completions: failed after 2 attempt\(s\): HTTP 500 .*"
                           r"injected 500"):
            client.complete("x", 4)
        assert len(fake.completions()) == 2


def test_client_errors_are_not_retried():
    """HTTP 400 (for example a prompt longer than the context) fails at once, with the server's message."""
    with FakeOpenAI(fail=[400]) as fake:
        client = A.HttpBackend(fake.url, model="m", retries=3, backoff=0.0)
        with pytest.raises(A.HttpError, match=r"POST .*/v1/completions: HTTP 400 .*injected 400"):
            client.complete("x", 4)
        assert len(fake.completions()) == 1


def test_timeouts_are_retried_and_reported():
    with FakeOpenAI(fail=["sleep", "sleep"], stall=1.0) as fake:
        client = A.HttpBackend(fake.url, model="m", timeout=0.2, retries=1, backoff=0.0)
        with pytest.raises(A.HttpError, match=r"failed after 2 attempt\(s\): timed out .*timeout 0.2s"):
            client.complete("x", 4)


def test_connection_refused_is_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(A.HttpError, match=r"POST .*/v1/completions: failed after 1 attempt\(s\): connection failed"):
        A.HttpBackend(url, model="m", retries=0).complete("x", 4)


def test_malformed_answers_are_refused():
    with FakeOpenAI(completion_body=lambda body: {"choices": []}) as fake:
        with pytest.raises(A.HttpError, match=r"expected choices\[0\]\.text \(str\), got"):
            A.HttpBackend(fake.url, model="m").complete("x", 4)
    with FakeOpenAI(completion_body=lambda body: {"choices": [{"text": None}]}) as fake:
        with pytest.raises(A.HttpError, match=r"expected choices\[0\]\.text \(str\)"):
            A.HttpBackend(fake.url, model="m").complete("x", 4)


def test_argument_checks():
    with pytest.raises(ValueError, match="url: expected http://host:port or https://..., got 'localhost:30000'"):
        A.HttpBackend("localhost:30000", model="m")
    with pytest.raises(ValueError, match="timeout: expected > 0 seconds, got 0"):
        A.HttpBackend("http://127.0.0.1:1", model="m", timeout=0)
    with pytest.raises(ValueError, match="retries: expected >= 0, got -1"):
        A.HttpBackend("http://127.0.0.1:1", model="m", retries=-1)


def test_requests_run_concurrently_and_records_keep_sample_order():
    """With concurrency 4, four completions are in flight at once; records come back in item order."""
    count = lambda s: len(s.split())  # noqa: E731
    items = A.build_samples(["niah_single", "vt"], [600], 4, 0, count)
    lines = []
    with FakeOpenAI(answer=needle_oracle, delay=0.3) as fake:
        recs = A.run_samples(A.HttpBackend(fake.url, model="m"), items, concurrency=4, progress=lines.append)
        assert fake.max_in_flight == 4
    assert [(r["task"], r["index"]) for r in recs] == [(i.sample.task, i.sample.index) for i in items]
    assert [r["correct"] for r in recs] == [True] * 4 + [False] * 4
    assert len(lines) == 8 and lines[-1].startswith("[8/8] ") and "4/8 correct" in lines[-1] and "ETA" in lines[-1]


def test_cli_writes_the_result_json_and_the_report_compares_runs(tmp_path, capsys):
    """End to end over HTTP: the JSON holds config, server info, per-sample records and accuracies."""
    out_a, out_b = tmp_path / "dense.json", tmp_path / "broken.json"
    common = ["--tasks", "niah_single", "vt", "--lengths", "600", "900", "--samples", "2", "--seed", "5",
              "--concurrency", "3"]
    with FakeOpenAI(answer=needle_oracle) as fake:
        assert A.main(["--url", fake.url, *common, "--label", "dense", "--out", str(out_a)]) == 0
        sent = fake.completions()
    with FakeOpenAI(answer=lambda p: " nothing") as fake:
        assert A.main(["--url", fake.url, *common, "--label", "broken", "--out", str(out_b), "-q"]) == 0
    data = json.loads(out_a.read_text())
    assert data["schema"] == A.SCHEMA and data["label"] == "dense"
    cfg = data["config"]
    assert cfg["tasks"] == ["niah_single", "vt"] and cfg["lengths"] == [600, 900]
    assert (cfg["samples"], cfg["seed"], cfg["concurrency"], cfg["model"]) == (2, 5, 3, MODEL)
    assert cfg["max_tokens"] == {"niah_single": 32, "vt": 64}
    assert data["backend_info"]["server_info"]["version"] == "fake"
    assert len(data["records"]) == 8 and len(sent) == 8
    for r in data["records"]:
        assert set(r) >= {"task", "length", "index", "prompt_tokens", "expected", "output", "correct"}
        assert r["prompt_tokens"] == r["server_prompt_tokens"] <= r["length"] - r["max_tokens"] - A.RESERVE
        assert r["correct"] == (r["task"] == "niah_single")
    assert {b["max_tokens"] for b in sent} == {32, 64} and {b["temperature"] for b in sent} == {0.0}
    s = data["summary"]
    assert s["accuracy"] == {"niah_single": {"600": 1.0, "900": 1.0}, "vt": {"600": 0.0, "900": 0.0}}
    assert s["average"] == 0.5 and (s["correct"], s["total"]) == (4, 8)
    assert "wrote" in capsys.readouterr().out

    table = R.report([R.load(str(out_a)), R.load(str(out_b))], baseline="dense", by_length=True)
    rows = table.splitlines()
    assert rows[0] == "| config | niah_single | vt | average | loss vs dense (points) | lost / gained |"
    assert rows[2] == "| dense | 100.0 | 0.0 | 50.0 | 0.0 | - |"
    assert rows[3] == "| broken | 0.0 | 0.0 | 0.0 | +50.0 | 4 / 0 |"
    assert "| broken | 0.0 | 0.0 | 0.0 |" in table.split("| config | 600 | 900 | average |")[1]
    assert R.main([str(out_a), str(out_b)]) == 0


def test_report_flags_other_samples_and_a_missing_baseline(tmp_path):
    def run(label, seed, correct):
        recs = [{"task": "vt", "length": 600, "index": 0, "seed": seed, "correct": correct}]
        return {"label": label, "config": {"samples": 1, "seed": seed}, "records": recs,
                "summary": A.summarize(recs, ["vt"], [600])}

    table = R.report([run("dense", 0, True), run("other", 1, True)])
    assert "| other | 100.0 | 100.0 | +0.0 | n/a |" in table and "ran other samples than `dense`" in table
    assert "no run labelled `dense`" in R.report([run("a", 0, True)])
    with pytest.raises(ValueError, match=r"labels: expected one run per label, got duplicates \['a'\]"):
        R.report([run("a", 0, True), run("a", 0, False)])
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="expected an accuracy-suite JSON"):
        R.load(str(bad))
