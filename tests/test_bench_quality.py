# SPDX-License-Identifier: Apache-2.0
"""The quality benchmark's own machinery, without the real model: RULER generator, attention path, byte ratios."""

from __future__ import annotations

import pytest
import torch

from bench import quality as Q
from bench.ruler import TASKS, generate, generate_suite

# --- RULER-style generator -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_ruler_is_deterministic_and_places_the_answer(task):
    a = generate(task, target_tokens=600, seed=3, index=1)
    b = generate(task, target_tokens=600, seed=3, index=1)
    c = generate(task, target_tokens=600, seed=4, index=1)
    assert a == b and a.prompt == b.prompt
    assert a.prompt != c.prompt
    assert a.prompt == a.context + a.query
    assert a.query.startswith("\n\nQuestion: ") and "\nAnswer: " in a.query
    assert "Question:" not in a.context
    assert a.answers and all(ans in a.context for ans in a.answers)
    assert 0 < a.num_tokens <= 600
    assert a.num_tokens > 450, "the haystack should fill most of the target length"
    assert a.exact_match(" " + ", ".join(a.answers)) and not a.exact_match(" nothing")


def test_ruler_needles_and_lengths_follow_the_token_counter():
    count = lambda s: len(s)  # noqa: E731  (one "token" per character)
    s = generate("niah_multikey", target_tokens=3000, seed=0, count_tokens=count)
    assert s.num_tokens == len(s.prompt) <= 3000
    assert len(s.meta["keys"]) == 4 and s.answers[0] == s.meta["values"][0]
    for key, value in zip(s.meta["keys"], s.meta["values"]):
        assert f"One of the special magic numbers for {key} is: {value}." in s.context
    suite = generate_suite(["niah_single", "vt"], num_samples=2, target_tokens=400)
    assert [x.task for x in suite] == ["niah_single", "niah_single", "vt", "vt"]
    assert len({x.prompt for x in suite}) == 4


# --- attention path on a tiny random Llama (GQA 3) -------------------------------------------------------------------
SETTINGS = Q.CompressSettings(seg_size=16, sinks=16, hot=32, arena_dtype="fp32")


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=3,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=512, rope_theta=10000.0,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 96, (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(input_ids=ids).logits[0].float()  # stock eager attention, whole sequence at once
    Q.use_mosaic_attention(model)
    ctx, qry = ids[0, :176].tolist(), ids[0, 176:].tolist()
    dense, queries = Q.prefill(model, ctx, window=8)
    return model, ctx, qry, ref, dense, queries


def test_dense_prefix_path_matches_stock_attention(tiny):
    model, ctx, qry, ref, dense, queries = tiny
    assert model.config._attn_implementation == Q.ATTN_IMPL
    assert len(dense.keys) == 2 and dense.keys[0].shape == (1, 176, 32)
    assert queries[0].shape == (3, 8, 32)
    bank = Q.PrefixBank.stack([dense], ["dense"])
    logits = Q.run_tokens(model, Q._new_cache(model), torch.tensor([qry]), len(ctx), Q.BankHook(bank))[0]
    torch.testing.assert_close(logits, ref[len(ctx):], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["mosaic-fast", "mosaic-exact", "token-only", "channel-only"])
def test_all_dense_plan_reproduces_dense_attention_exactly(tiny, method):
    model, ctx, qry, ref, dense, queries = tiny
    p = Q.compress(method, 1.0, dense.keys, dense.values, queries, SETTINGS)
    assert all(bool(k.all()) for k in p.keep)
    assert p.info["ratio"] < 1.0  # all-dense plan: region bytes = raw + descriptors + bounds
    dense_bank = Q.PrefixBank.stack([dense], ["dense"])
    bank = Q.PrefixBank.stack([p, dense], ["plan", "dense-copy"])
    probe = Q.ProbeHook(dense_bank, [bank], num_layers=2)
    toks, logits = Q.greedy(model, qry, 5, len(ctx), probe)
    assert probe.mean_error("plan") == 0.0 and probe.mean_error("dense-copy") == 0.0
    tf = Q.teacher_forced(model, qry, toks[0].tolist(), len(ctx), Q.BankHook(bank), batch=2)
    assert torch.equal(tf[0], tf[1])
    torch.testing.assert_close(tf[0], logits[0], atol=1e-5, rtol=1e-5)
    btoks, _ = Q.greedy(model, qry, 5, len(ctx), Q.BankHook(bank), batch=2)
    assert torch.equal(btoks[0], toks[0]) and torch.equal(btoks[1], toks[0])


def test_compressed_prefix_drops_rows_per_kv_head_and_meets_the_budget(tiny):
    model, ctx, qry, ref, dense, queries = tiny
    layout = Q.Layout(len(ctx), 16, 16, 32)
    region = layout.region_token_mask()
    for method in ("token-only", "mosaic-fast"):
        p = Q.compress(method, 3.0, dense.keys, dense.values, queries, SETTINGS)
        assert p.info["ratio"] >= 3.0
        for keep in p.keep:
            assert bool(keep[:, ~region].all()), "sinks, hot window and tail stay"
        if method == "token-only":
            assert not bool(torch.stack(p.keep)[:, :, region].all())
        probe = Q.ProbeHook(Q.PrefixBank.stack([dense], ["d"]), [Q.PrefixBank.stack([p], ["c"])], num_layers=2)
        Q.greedy(model, qry, 2, len(ctx), probe)
        assert 0.0 < probe.mean_error("c") < 1.0


def test_unseen_weight_setting_reaches_the_planner(tiny):
    """--unseen-weight is passed to every planner method: weight 0 gives the observed-query plan (plan_fast with
    unseen_weight=0), and the default (None) the planner's default plan."""
    import dataclasses

    from mosaickv_sglang import planner as pl

    model, ctx, qry, ref, dense, queries = tiny
    k, v, q = dense.keys[0][:, :64].reshape(4, 16, 32), dense.values[0][:, :64].reshape(4, 16, 32), queries[0]
    qs = q.view(1, 3, 8, 32).permute(0, 2, 1, 3).expand(4, 8, 3, 32)
    for weight in (None, 0.0):
        fn = Q._planner_fn("mosaic-fast", "exact", weight)
        want = pl.plan_fast(k, v, queries=qs, ratio=3, **({} if weight is None else {"unseen_weight": weight}))
        got = fn(k, v, qs, ratio=3)
        assert torch.equal(got.choice, want.choice)
    assert dataclasses.replace(SETTINGS, unseen_weight=0.0).unseen_weight == 0.0


def test_attend_prefix_equals_attention_over_kept_rows():
    torch.manual_seed(2)
    q = torch.randn(2, 6, 3, 32)
    pk, pv = torch.randn(2, 2, 40, 32), torch.randn(2, 2, 40, 32)
    k, v = torch.randn(2, 2, 3, 32), torch.randn(2, 2, 3, 32)
    keep = torch.rand(2, 2, 40) > 0.5
    out = Q.attend_prefix(q, pk, pv, keep, k, v, 0.2)
    for b in range(2):
        for h in range(2):
            kk = torch.cat([pk[b, h][keep[b, h]], k[b, h]])[None, None]
            vv = torch.cat([pv[b, h][keep[b, h]], v[b, h]])[None, None]
            ref = Q.attend(q[b : b + 1, 3 * h : 3 * h + 3], kk, vv, 0.2)
            torch.testing.assert_close(out[b, 3 * h : 3 * h + 3], ref[0], atol=1e-6, rtol=1e-5)


# --- casts -----------------------------------------------------------------------------------------------------------
def test_fp8_baseline_ratio_is_two_and_bf16_is_one(tiny):
    _, ctx, _, _, dense, queries = tiny
    fp8 = Q.compress("fp8", 2.0, dense.keys, dense.values, queries, SETTINGS)
    assert fp8.info["ratio"] == pytest.approx(2.0, rel=5e-3)  # two fp32 scales per layer are the only extra bytes
    assert fp8.info["ratio"] <= 2.0
    assert fp8.keep is None
    region = Q.Layout(len(ctx), 16, 16, 32).region_token_mask()
    err = (fp8.keys[0][:, region] - dense.keys[0][:, region]).abs().max()
    assert 0 < float(err) < 0.1 * float(dense.keys[0].abs().max())
    assert torch.equal(fp8.keys[0][:, ~region], dense.keys[0][:, ~region])  # fp32 arena in SETTINGS
    bf16 = Q.compress("bf16", 1.0, dense.keys, dense.values, queries, SETTINGS)
    assert bf16.info["ratio"] == 1.0
    think = Q.compress("think", 4.0, dense.keys, dense.values, queries, SETTINGS)
    assert think.info["ratio"] == pytest.approx(4.0, rel=0.01)


# --- one sample end to end (the CLI's per-sample path) ---------------------------------------------------------------
class _CharTokenizer:
    """One token per character (ids modulo the tiny vocabulary), with offsets: enough for evaluate_sample."""

    class _Enc(dict):
        __getattr__ = dict.__getitem__

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        enc = self._Enc(input_ids=[ord(c) % 96 for c in text])
        if return_offsets_mapping:
            enc["offset_mapping"] = [(i, i + 1) for i in range(len(text))]
        return enc

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(chr(48 + i % 10) for i in ids)


def test_evaluate_sample_end_to_end_on_the_tiny_model(tiny):
    model = tiny[0]
    sample = generate("niah_single", target_tokens=480, seed=0, count_tokens=len, digits=4)
    vars_ = Q.variants(["mosaic-fast", "token-only", "channel-only", "fp8", "bf16"], [2.0, 4.0])
    rec = Q.evaluate_sample(model, _CharTokenizer(), sample, vars_, SETTINGS, window=8, gen_tokens=3, batch=4,
                            check_exact=True)
    assert set(rec["checks"]) >= {"check:dense", "check:mosaic-fast@1", "check:token-only@1"}
    assert all(c["attn_err"] < 1e-5 and c["agree_free"] == 1.0 for c in rec["checks"].values())
    assert rec["gen_tokens"] == len(rec["dense"]["tokens"]) >= 3
    assert "unreachable" in rec["variants"]["channel-only@4"]  # bitmask overhead caps it at 3.76x for d = 32
    for name, v in rec["variants"].items():
        if "unreachable" in v:
            continue
        assert v["ratio"] >= v["target_ratio"] * (0.99 if v["method"] == "fp8" else 1.0), name
        assert v["attn_err"] >= 0 and 0 <= v["agree_tf"] <= 1 and 0 <= v["needle_kept"] <= 1
    assert rec["variants"]["token-only@4"]["attn_err"] > 0 and rec["variants"]["fp8@2"]["needle_kept"] == 1.0
    summary = Q.summarize([rec], vars_)
    assert "channel-only" in Q.markdown_table(summary) and "niah_single" in Q.em_table(summary)


def test_observe_other_plans_with_another_contexts_queries(tiny):
    """observe='other' plans with the queries of another context (a server's shared window after another request's
    tokens): the plans, and so the attention error, differ from observe='context'; it needs the other context."""
    model = tiny[0]
    sample = generate("niah_single", target_tokens=480, seed=0, count_tokens=len, digits=4)
    other = generate("niah_single", target_tokens=480, seed=5, count_tokens=len, digits=4)
    vars_ = Q.variants(["mosaic-fast"], [4.0])
    kw = dict(window=8, gen_tokens=3, batch=4)
    own = Q.evaluate_sample(model, _CharTokenizer(), sample, vars_, SETTINGS, **kw)
    theirs = Q.evaluate_sample(model, _CharTokenizer(), sample, vars_, SETTINGS, observe="other",
                               other_context=other.context, **kw)  # fmt: skip
    assert own["dense"] == theirs["dense"]
    assert own["variants"]["mosaic-fast@4"]["attn_err"] != theirs["variants"]["mosaic-fast@4"]["attn_err"]
    with pytest.raises(ValueError, match="other_context: expected another sample's context"):
        Q.evaluate_sample(model, _CharTokenizer(), sample, vars_, SETTINGS, observe="other", **kw)
