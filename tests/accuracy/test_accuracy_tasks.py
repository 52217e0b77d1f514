# SPDX-License-Identifier: Apache-2.0
"""RULER-style tasks of the accuracy suite: seeded, sized by the tokenizer, answers really in the haystack, scored."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from bench import accuracy as A
from bench.ruler import TASKS, generate


def regex_tokens(text: str) -> int:
    """A deterministic stand-in tokenizer: words, numbers and punctuation marks are one token each."""
    return len(re.findall(r"\w+|[^\w\s]", text))


@pytest.fixture(scope="module")
def smollm2_count():
    """SmolLM2's own tokenizer: from the cache, or fetched and converted as test_accuracy_smollm2.py's model is (in
    the CI's two workers, whichever file comes first makes it, once). Skipped only without the bench extra's
    converters."""
    from bench import smollm2

    path = smollm2.converted_dir()
    if not (path / "tokenizer.json").is_file():
        missing = smollm2.missing_converters()
        if missing:
            pytest.skip(f"SmolLM2 tokenizer not cached at {path} and {missing} missing to convert it "
                        "(uv sync --extra bench)")
        path = smollm2.ensure_converted()
    from tokenizers import Tokenizer  # the fast tokenizer transformers wraps, without transformers' import time

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    return lambda s: len(tok.encode(s, add_special_tokens=False).ids)


def test_suite_has_the_seven_ruler_tasks_and_an_answer_budget_for_each():
    """All seven task families exist, each with a max_tokens budget."""
    assert set(TASKS) == {"niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"}
    assert set(A.MAX_TOKENS) == set(TASKS)


@pytest.mark.parametrize("task", TASKS)
def test_same_seed_same_sample_other_seed_or_index_other_sample(task):
    """Generation is a pure function of (task, length, seed, index, tokenizer)."""
    a = generate(task, target_tokens=1000, seed=7, index=2, count_tokens=regex_tokens)
    b = generate(task, target_tokens=1000, seed=7, index=2, count_tokens=regex_tokens)
    assert a == b and a.prompt == b.prompt and a.meta == b.meta
    assert generate(task, target_tokens=1000, seed=8, index=2, count_tokens=regex_tokens).prompt != a.prompt
    assert generate(task, target_tokens=1000, seed=7, index=3, count_tokens=regex_tokens).prompt != a.prompt


@pytest.mark.parametrize("target", [700, 2000])
@pytest.mark.parametrize("task", TASKS)
def test_prompt_fills_the_target_length_within_two_percent(task, target):
    """The prompt is at most the target and within 2% below it, in tokens of the given counter."""
    s = generate(task, target_tokens=target, seed=1, count_tokens=regex_tokens)
    assert s.num_tokens == regex_tokens(s.prompt)
    assert 0.98 * target <= s.num_tokens <= target, (s.num_tokens, target)


@pytest.mark.parametrize("task", TASKS)
def test_lengths_in_smollm2_tokens(task, smollm2_count):
    """With the model's tokenizer, 2k and 8k samples land within 1% below the target."""
    for target in (2048 - A.MAX_TOKENS[task] - A.RESERVE, 8192 - A.MAX_TOKENS[task] - A.RESERVE):
        s = generate(task, target_tokens=target, seed=0, count_tokens=smollm2_count)
        assert s.num_tokens == smollm2_count(s.prompt)
        assert 0.99 * target <= s.num_tokens <= target, (s.num_tokens, target)


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery"])
def test_needles_are_in_the_context_and_the_question_asks_for_them(task):
    """Every needle sentence is in the context once; the expected values are exactly the asked keys' values."""
    s = generate(task, target_tokens=1500, seed=3, index=1, count_tokens=regex_tokens)
    keys, values = s.meta["keys"], s.meta["values"]
    for k, v in zip(keys, values):
        assert s.context.count(f"One of the special magic numbers for {k} is: {v}.") == 1
    asked = s.meta["asked_keys"]
    expected = [v for k, v in zip(keys, values) if k in asked]
    assert sorted(s.answers) == sorted(expected)
    assert all(k in s.query for k in asked)
    assert "Question:" not in s.context and s.query.startswith("\n\nQuestion: ")
    n_needles = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 3, "niah_multiquery": 4}[task]
    n_asked = {"niah_single": 1, "niah_multikey": 1, "niah_multivalue": 3, "niah_multiquery": 2}[task]
    assert len(values) == n_needles and len(s.answers) == n_asked
    assert len(set(values)) == len(values) or task == "niah_multikey"
    if task == "niah_multikey":
        assert len(set(keys)) == 4 and len(s.answers) == 1


def test_variable_chain_is_in_the_context_in_order():
    """Each VAR assignment of the chain is present, and they appear in chain order."""
    s = generate("vt", target_tokens=1500, seed=3, count_tokens=regex_tokens)
    names, value = s.meta["chain"], s.meta["value"]
    assert tuple(names) == s.answers and value in s.query
    stmts = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
    pos = [s.context.index(x) for x in stmts]
    assert pos == sorted(pos)


def test_common_words_are_the_most_frequent_of_the_list():
    """cwe: the expected words are the most frequent entries of the numbered list, strictly."""
    s = generate("cwe", target_tokens=1500, seed=3, count_tokens=regex_tokens)
    words = re.findall(r"\d+\. (\w+)", s.context)
    counts = Counter(words)
    top = [w for w, _ in counts.most_common(len(s.answers))]
    assert sorted(top) == sorted(s.answers)
    rest = max(c for w, c in counts.items() if w not in s.answers)
    assert min(counts[w] for w in s.answers) > rest


@pytest.mark.parametrize("target", [700, 4000])
def test_frequent_words_are_ranks_one_to_three_of_the_coded_text(target):
    """fwe: counted in the prompt itself, the expected words are the three most frequent after the noise word."""
    s = generate("fwe", target_tokens=target, seed=5, count_tokens=regex_tokens)
    body = s.context.split("\n", 1)[1]
    counts = Counter(body.split())
    ranked = [w for w, _ in counts.most_common()]
    assert ranked[0] == "...."
    assert tuple(ranked[1:4]) == s.answers
    c = [counts[w] for w in ranked[:5]]
    assert c[1] > c[2] > c[3] > c[4]


def test_fwe_refuses_lengths_too_short_to_rank_the_words():
    with pytest.raises(ValueError, match="target_tokens: expected a length whose word counts rank"):
        generate("fwe", target_tokens=120, count_tokens=regex_tokens)


def test_exact_match_needs_every_expected_value():
    """A sample is correct only when all expected values appear (case-insensitive); score counts the fraction."""
    s = generate("niah_multivalue", target_tokens=800, seed=0, count_tokens=regex_tokens)
    a, b, c = s.answers
    assert s.exact_match(f" {a}, {b} and {c}.") and s.score(f"{c} {b} {a}") == 1.0
    assert not s.exact_match(f" {a}, {b}.") and s.score(f" {a}, {b}.") == pytest.approx(2 / 3)
    assert not s.exact_match("") and s.score("") == 0.0
    v = generate("vt", target_tokens=800, seed=0, count_tokens=regex_tokens)
    assert v.exact_match(" " + ", ".join(x.lower() for x in v.answers))


def test_build_samples_reserves_the_answer_budget():
    """Length L holds prompt + max_tokens + RESERVE; order is length, task, index; too short lengths are refused."""
    items = A.build_samples(["niah_single", "fwe"], [600, 900], 2, 4, regex_tokens, workers=2)
    assert [(i.length, i.sample.task, i.sample.index) for i in items] == [
        (L, t, k) for L in (600, 900) for t in ("niah_single", "fwe") for k in range(2)
    ]
    for it in items:
        assert it.max_tokens == A.MAX_TOKENS[it.sample.task]
        assert it.sample.target_tokens == it.length - it.max_tokens - A.RESERVE
        assert it.sample.num_tokens + it.max_tokens + A.RESERVE <= it.length
    serial = A.build_samples(["niah_single", "fwe"], [600, 900], 2, 4, regex_tokens, workers=1)
    assert [i.sample for i in serial] == [i.sample for i in items]
    with pytest.raises(ValueError, match=r"lengths: expected >= 104 for task 'niah_single', got 100"):
        A.build_samples(["niah_single"], [100], 1, 0, regex_tokens)
    with pytest.raises(ValueError, match=r"tasks: expected names from .*, got 'nope'"):
        A.build_samples(["nope"], [1000], 1, 0, regex_tokens)
    with pytest.raises(ValueError, match=r"max_tokens\['vt'\]: expected >= 1, got 0"):
        A.build_samples(["vt"], [1000], 1, 0, regex_tokens, max_tokens={"vt": 0})


def test_summarize_averages_cells_equally():
    """average is the mean over (task, length) cells; per-task and per-length means skip empty cells."""
    recs = [
        {"task": "vt", "length": 2048, "correct": True},
        {"task": "vt", "length": 2048, "correct": False},
        {"task": "vt", "length": 4096, "correct": True},
        {"task": "cwe", "length": 2048, "correct": False},
    ]
    s = A.summarize(recs, ["vt", "cwe"], [2048, 4096])
    assert s["accuracy"] == {"vt": {"2048": 0.5, "4096": 1.0}, "cwe": {"2048": 0.0, "4096": None}}
    assert s["task_average"] == {"vt": 0.75, "cwe": 0.0}
    assert s["length_average"] == {"2048": 0.25, "4096": 1.0}
    assert s["average"] == pytest.approx(0.5) and (s["correct"], s["total"]) == (2, 4)
    assert "| **average** | 25.0 | 100.0 | **50.0** |" in A.markdown_table(s, "x")


def test_score_output_reads_the_first_numbers_of_the_answer():
    """The scored answer ends at the first blank line; a needle answer's first k numbers must be the k expected."""
    s = generate("niah_multikey", target_tokens=800, seed=0, count_tokens=regex_tokens)
    (want,) = s.answers
    other = next(v for v in s.meta["values"] if v != want)
    ok = A.score_output(s, f"\n {want}.\n\nQuestion: the special magic number for x is {other}")
    assert ok == {"answer": f"{want}.", "score": 1.0, "numbers": [want], "correct": True}
    assert A.score_output(s, f" {want}, {other}, {want}")["correct"]  # what follows the answer is not read
    listed = A.score_output(s, f" {other}, {want}")
    assert listed["score"] == 1.0 and listed["numbers"] == [other] and not listed["correct"]
    late = A.score_output(s, f" 1234.\n\n{want}")
    assert late["answer"] == "1234." and late["numbers"] == [] and not late["correct"]
    assert not A.score_output(s, f" {want}1")["correct"]  # an eight-digit number is not the value
    q = generate("niah_multiquery", target_tokens=800, seed=0, count_tokens=regex_tokens)
    a, b = q.answers
    assert A.score_output(q, f" {b} and {a}; also {q.meta['values'][3]}")["correct"]
    assert not A.score_output(q, f" {a}, {q.meta['values'][3]}, {b}")["correct"]
    mv = generate("niah_multivalue", target_tokens=800, seed=0, count_tokens=regex_tokens)
    assert A.score_output(mv, " " + ", ".join(mv.answers) + ", " + mv.answers[0]) == {
        "answer": ", ".join(mv.answers) + ", " + mv.answers[0], "score": 1.0, "numbers": list(mv.answers),
        "correct": True}
    v = generate("vt", target_tokens=800, seed=0, count_tokens=regex_tokens)
    assert A.score_output(v, " " + " ".join(v.answers))["numbers"] is None
    assert not A.score_output(v, " " + " ".join(v.answers[:-1]))["correct"]
