# SPDX-License-Identifier: Apache-2.0
"""bench.serve_check: configuration names to server flags, and the comparison table."""

from __future__ import annotations

import pytest

from bench.serve_check import compare, config_flags, split_tp


@pytest.mark.parametrize(
    "name,want",
    [
        ("dense", ["--attention-backend", "flashinfer"]),
        ("dense-tp2", ["--tp-size", "2", "--attention-backend", "flashinfer"]),
        ("fp8", ["--attention-backend", "flashinfer", "--kv-cache-dtype", "fp8_e4m3"]),
        ("mosaic-r3", ["--kv-compressor", "mosaic", "--mosaic-compression-ratio", "3"]),
        ("mosaic-r1-b0-tp2", ["--tp-size", "2", "--kv-compressor", "mosaic", "--mosaic-compression-ratio", "1",
                              "--mosaic-decode-read-budget", "0"]),
        ("mosaic-r2.5-h256", ["--kv-compressor", "mosaic", "--mosaic-compression-ratio", "2.5",
                              "--mosaic-hot-window", "256"]),
        ("mosaic-r3-rs0", ["--kv-compressor", "mosaic", "--mosaic-compression-ratio", "3",
                           "--mosaic-resegment", "off"]),
        ("mosaic-r3-b0-sc0-tp2", ["--tp-size", "2", "--kv-compressor", "mosaic", "--mosaic-compression-ratio", "3",
                                  "--mosaic-decode-read-budget", "0", "--mosaic-sidecar", "off"]),
        ("mosaic-r1-b0-cg", ["--kv-compressor", "mosaic", "--mosaic-compression-ratio", "1",
                             "--mosaic-decode-read-budget", "0", "--mosaic-cuda-graph", "on"]),
        ("mosaic-r1-b0-ov", ["--kv-compressor", "mosaic", "--mosaic-compression-ratio", "1",
                             "--mosaic-decode-read-budget", "0", "--mosaic-overlap-schedule", "on"]),
        ("dense-flashinfer", ["--attention-backend", "flashinfer"]),
        ("dense-triton-tp2", ["--tp-size", "2", "--attention-backend", "triton"]),
    ],
)
def test_config_flags(name, want):
    assert config_flags(name) == want


@pytest.mark.parametrize("name", ["mosaic", "mosaic-r3-x1", "dense-tpx", "sparse", "mosaic-r3-rs1", "mosaic-r3-sc",
                                  "mosaic-r3-cg1", "mosaic-r3-ov1", "dense-", "dense-flash", "dense-fp8"])
def test_bad_config_names_are_refused(name):
    with pytest.raises(ValueError, match="config: "):
        config_flags(name)


def test_split_tp():
    assert split_tp("mosaic-r3-tp4") == ("mosaic-r3", 4)
    assert split_tp("mosaic-r3") == ("mosaic-r3", 1)


def _res(texts, cap, chat="c"):
    comps = [{"task": "niah_single", "text": t, "correct": t == "1234"} for t in texts]
    return {"completions": comps, "server_info": {"max_total_num_tokens": cap}, "chat": chat, "frontend": {"a": 1}}


def test_compare_pairs_each_config_with_dense_at_its_tp_size_and_with_itself_at_tp1():
    results = {
        "dense": _res(["1234", "5678"], 100),
        "mosaic-r3": _res(["1234", "0000"], 250),
        "dense-tp2": _res(["1234", "9999"], 200),
        "mosaic-r3-tp2": _res(["1234", "9999"], 500, chat="d"),
    }
    s = compare(results)
    assert s["mosaic-r3"]["equal_to_dense"] == 1 and s["mosaic-r3"]["capacity_vs_dense"] == 2.5
    row = s["mosaic-r3-tp2"]
    assert (row["equal_to_dense"], row["capacity_vs_dense"], row["chat_equal"]) == (2, 2.5, False)
    assert (row["equal_to_tp1"], row["chat_equal_to_tp1"], row["needle_correct"]) == (1, False, 1)
    assert "equal_to_tp1" not in s["mosaic-r3"] and "equal_to_dense" not in s["dense-tp2"]


def test_stock_with_another_backend_is_compared_against_dense():
    """dense-<backend> (stock against stock) gets the same comparison as a mosaic configuration."""
    s = compare({"dense": _res(["1234", "5678", "42"], 100), "dense-flashinfer": _res(["1234", "5679", "42"], 98)})
    row = s["dense-flashinfer"]
    assert (row["equal_to_dense"], row["compared"], row["capacity_vs_dense"]) == (2, 3, 0.98)


def test_merge_compares_runs_made_in_separate_directories(tmp_path, capsys):
    import json

    from bench.serve_check import main

    for sub, name, res in [("gpu0", "dense", _res(["1234"], 100)), ("gpu1", "mosaic-r3", _res(["1234"], 300))]:
        (tmp_path / sub).mkdir()
        (tmp_path / sub / f"serve_{name}.json").write_text(json.dumps({"config": name, **res}))
    assert main(["--merge", str(tmp_path / "gpu0"), str(tmp_path / "gpu1"), "--out", str(tmp_path / "all")]) == 0
    summary = json.loads((tmp_path / "all" / "serve_check.json").read_text())["summary"]
    assert summary["mosaic-r3"]["equal_to_dense"] == 1 and summary["mosaic-r3"]["capacity_vs_dense"] == 3.0
    with pytest.raises(FileNotFoundError, match="--merge: expected serve_<config>.json files in"):
        main(["--merge", str(tmp_path / "all"), "--out", str(tmp_path / "x")])
