# SPDX-License-Identifier: Apache-2.0
"""Shared-prefix accuracy (:mod:`bench.shared_context`): one question per key of a niah_multikey context, asked one
after another against the local fake OpenAI server (client code only, no model)."""

from __future__ import annotations

import json
import re

import pytest
from mkv_fake_openai import MODEL, FakeOpenAI

from bench import accuracy as A
from bench import shared_context as S
from bench.ruler import generate, multikey_questions


def words(text: str) -> int:
    """The fake server's token count (whitespace words), so that local and server counts agree."""
    return len(text.split())


def oracle(wrong=()):
    """Fake "model": looks the asked key's value up in the prompt; for keys in ``wrong`` answers another needle's."""

    def answer(prompt: str) -> str:
        key = re.search(r"special magic number for (\S+) mentioned in the provided text is$", prompt).group(1)
        needles = dict(re.findall(r"special magic numbers for (\S+) is: (\d+)\.", prompt))
        if key in wrong:
            return " " + next(v for k, v in needles.items() if k != key) + "."
        return f" {needles[key]}.\n\nQuestion: and so on"

    return answer


@pytest.mark.parametrize("seed,index,length", [(0, 0, 700), (3, 5, 2000), (11, 2, 4000)])
def test_multikey_questions_ask_each_key_for_its_own_value(seed, index, length):
    s = generate("niah_multikey", target_tokens=length, seed=seed, index=index, count_tokens=words)
    keys, values = s.meta["keys"], s.meta["values"]
    qs = multikey_questions(s)
    assert len(qs) == 4 and len(set(keys)) == 4
    assert qs[0] == (s.query, s.answers)  # the suite's own question comes first
    for k, (query, answers) in enumerate(qs):
        assert query == s.query.replace(keys[0], keys[k])  # the same template, another key
        assert re.findall(r"special magic number for (\S+) mentioned", query) == [keys[k]] * 2
        assert answers == (values[k],)
        assert f"One of the special magic numbers for {keys[k]} is: {values[k]}." in s.context
    assert len({q for q, _ in qs}) == 4
    again = generate("niah_multikey", target_tokens=length, seed=seed, index=index, count_tokens=words)
    assert multikey_questions(again) == qs


def test_multikey_questions_refuses_other_tasks():
    with pytest.raises(ValueError, match="sample.task: expected 'niah_multikey', got 'niah_single'"):
        multikey_questions(generate("niah_single", target_tokens=700))


def test_every_question_fits_and_the_first_is_the_suites_sample():
    """Prompts stay within L - max_tokens - RESERVE; a context is regenerated shorter only when a key overflows."""
    chars = lambda s: len(s) // 3  # noqa: E731  (keys of different lengths: some questions are longer)
    ctxs = S.build_contexts([900], 8, 0, chars)
    suite = A.build_samples(["niah_multikey"], [900], 8, 0, chars)
    for c, it in zip(ctxs, suite):
        assert c.prompt_tokens == tuple(chars(q.prompt) for q in c.questions)
        assert max(c.prompt_tokens) <= 900 - 32 - A.RESERVE
        assert all(q.context == c.sample.context for q in c.questions)
        fits = max(chars(it.sample.context + q) for q, _ in multikey_questions(it.sample)) <= 900 - 32 - A.RESERVE
        assert (c.sample.prompt == it.sample.prompt) == fits
    assert sum(c.sample.prompt != it.sample.prompt for c, it in zip(ctxs, suite)) >= 1  # the regeneration ran
    with pytest.raises(ValueError, match="lengths: expected >= 168, got 100"):
        S.build_contexts([100], 1, 0, words)


def test_questions_go_one_after_another_with_the_pause_and_reuse_the_prefix():
    """Each question leaves after the previous answer plus the pause; the fake's prefix cache shows the reuse."""
    ctxs = S.build_contexts([600], 2, 0, words)
    lines = []
    with FakeOpenAI(answer=oracle(), delay=0.05, cache_report=True) as fake:
        recs = S.run_contexts(A.HttpBackend(fake.url, model="m"), ctxs, pause=0.3, progress=lines.append)
        done = fake.completed()
        assert fake.max_in_flight == 1
    assert [r["body"]["prompt"] for r in done] == [q.prompt for c in ctxs for q in c.questions]
    for c in range(2):
        reqs = done[4 * c: 4 * c + 4]
        gaps = [b["t"] - a["t_done"] for a, b in zip(reqs, reqs[1:])]
        assert all(0.29 <= g < 3.0 for g in gaps), gaps
    assert [(r["index"], r["reader"]) for r in recs] == [(i, k) for i in range(2) for k in range(1, 5)]
    assert all(r["correct"] for r in recs)
    assert recs[0]["cached_tokens"] == 0
    for r, c in zip(recs, [c for c in ctxs for _ in range(4)]):
        assert r["key"] == c.sample.meta["keys"][r["reader"] - 1] and r["server_prompt_tokens"] == r["prompt_tokens"]
        if r["reader"] > 1:
            assert r["cached_tokens"] >= words(c.sample.context)
    assert recs[4]["cached_tokens"] < words(ctxs[1].sample.context)  # another context: only a common start
    assert len(lines) == 2 and lines[-1].startswith("[2/2] ") and "ok ok ok ok" in lines[-1]
    assert "8/8 correct" in lines[-1] and re.search(r"cached 0 \d+ \d+ \d+", lines[0])


def test_contexts_may_overlap_but_each_stays_sequential():
    ctxs = S.build_contexts([600], 2, 1, words)
    with FakeOpenAI(answer=oracle(), delay=0.2) as fake:
        recs = S.run_contexts(A.HttpBackend(fake.url, model="m"), ctxs, pause=0.1, concurrency=2)
        done = fake.completed()
        assert fake.max_in_flight == 2
    for c in ctxs:
        mine = [r for r in done if r["body"]["prompt"].startswith(c.sample.context)]
        assert [r["body"]["prompt"] for r in mine] == [q.prompt for q in c.questions]
        assert all(b["t"] - a["t_done"] >= 0.09 for a, b in zip(mine, mine[1:]))
    assert [r["cached_tokens"] for r in recs] == [None] * 8  # no cache report: recorded as None


def test_scoring_per_reader_and_summary():
    """A wrong value for one key (another needle's) is a miss of that reader only."""
    ctxs = S.build_contexts([600, 800], 2, 0, words)
    wrong = {c.sample.meta["keys"][2] for c in ctxs}
    with FakeOpenAI(answer=oracle(wrong)) as fake:
        recs = S.run_contexts(A.HttpBackend(fake.url, model="m"), ctxs, pause=0.0)
    assert [r["correct"] for r in recs] == [True, True, False, True] * 4
    assert all(r["answer"] == r["output"].strip().split("\n\n")[0] for r in recs)
    s = S.summarize(recs, [600, 800])
    assert s["by_reader"] == {"1": 1.0, "2": 1.0, "3": 0.0, "4": 1.0}
    assert s["by_length"]["600"] == {"1": 1.0, "2": 1.0, "3": 0.0, "4": 1.0, "all": 0.75}
    assert (s["accuracy"], s["correct"], s["total"], s["cache_reported"]) == (0.75, 12, 16, 0)
    assert s["cached_tokens"] == {"1": None, "2": None, "3": None, "4": None}
    table = S.markdown_table(s, "x")
    assert "| 3 | 0.0 | 0.0 | 0.0 |  |" in table and "| **all** | 75.0 | 75.0 | **75.0** | |" in table


def test_completion_reads_cached_tokens_when_reported():
    with FakeOpenAI(answer=lambda p: " 1.", cache_report=True) as fake:
        client = A.HttpBackend(fake.url, model="m")
        assert client.complete("a b c d", 4).cached_tokens == 0
        assert client.complete("a b c e f", 4) == A.Completion(" 1.", 5, 1, "stop", 3)
    with FakeOpenAI(answer=lambda p: " 1.") as fake:
        assert A.HttpBackend(fake.url, model="m").complete("a b", 4).cached_tokens is None


def test_cli_writes_the_json(tmp_path, capsys):
    out = tmp_path / "shared.json"
    with FakeOpenAI(answer=oracle(), cache_report=True) as fake:
        rc = S.main(["--url", fake.url, "--label", "reseg", "--lengths", "600", "900", "--samples", "2",
                     "--reader-pause", "0.05", "--out", str(out)])
        assert rc == 0 and fake.max_in_flight == 1
        assert {b["temperature"] for b in fake.completions()} == {0.0}
        assert {b["max_tokens"] for b in fake.completions()} == {A.MAX_TOKENS["niah_multikey"]}
    data = json.loads(out.read_text())
    assert data["schema"] == S.SCHEMA == "mosaickv.shared_context/1" and data["label"] == "reseg"
    cfg = data["config"]
    assert (cfg["lengths"], cfg["samples"], cfg["reader_pause"], cfg["concurrency"], cfg["model"]) == (
        [600, 900], 2, 0.05, 1, MODEL)
    assert data["backend_info"]["server_info"]["version"] == "fake"
    assert len(data["records"]) == 16 and all(r["correct"] for r in data["records"])
    assert [r["reader"] for r in data["records"]] == [1, 2, 3, 4] * 4
    s = data["summary"]
    assert s["accuracy"] == 1.0 and s["cache_reported"] == 16 and s["cached_tokens"]["2"] > s["cached_tokens"]["1"]
    printed = capsys.readouterr().out
    assert "| reseg: reader | 600 | 900 | all | cached tokens |" in printed and "16/16 correct" in printed


def test_cli_help_and_argument_errors(capsys):
    with pytest.raises(SystemExit) as e:
        S.main(["--help"])
    assert e.value.code == 0 and "--reader-pause" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        S.main(["--reader-pause", "-1"])
    assert e.value.code == 2 and "--reader-pause: expected >= 0, got -1.0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="pause: expected >= 0 seconds, got -0.5"):
        S.run_contexts(None, [], pause=-0.5)
