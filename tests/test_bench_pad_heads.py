# SPDX-License-Identifier: Apache-2.0
"""bench.pad_heads: the padded checkpoint computes the same logits as the original."""

from __future__ import annotations

import json

import pytest
import torch

from bench.pad_heads import pad_checkpoint, pad_state_dict


@pytest.mark.parametrize("q_heads,kv_heads,new_kv", [(9, 3, 4), (6, 6, 8), (4, 1, 2)])
def test_padded_llama_computes_the_same_logits(tmp_path, q_heads, kv_heads, new_kv):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(q_heads * 10 + new_kv)
    head_dim = 16
    cfg = LlamaConfig(vocab_size=97, hidden_size=72, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=q_heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                      attention_bias=kv_heads == 6, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    src, out = tmp_path / "src", tmp_path / "out"
    model.save_pretrained(str(src))
    pad_checkpoint(src, out, new_kv)
    padded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    saved = json.loads((out / "config.json").read_text())
    assert (saved["num_attention_heads"], saved["num_key_value_heads"]) == (new_kv * q_heads // kv_heads, new_kv)
    ids = torch.randint(0, cfg.vocab_size, (2, 37))
    with torch.no_grad():
        want, got = model(ids).logits, padded(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_padded_rows_are_zero_and_the_original_rows_kept():
    state = {"model.layers.0.self_attn.q_proj.weight": torch.randn(6 * 4, 8)}
    padded = pad_state_dict(state, q_heads=6, kv_heads=3, head_dim=4, new_kv_heads=4)
    w = padded["model.layers.0.self_attn.q_proj.weight"]
    assert w.shape == (8 * 4, 8)
    assert torch.equal(w[:24], state["model.layers.0.self_attn.q_proj.weight"]) and not w[24:].any()


def test_fewer_kv_heads_is_refused():
    with pytest.raises(ValueError, match="kv_heads: expected at least the model's 3, got 2"):
        pad_state_dict({}, q_heads=9, kv_heads=3, head_dim=64, new_kv_heads=2)
