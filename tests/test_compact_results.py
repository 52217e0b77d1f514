# SPDX-License-Identifier: Apache-2.0
"""bench.compact_results (the run folders' larger text files gzipped in place) and the readers that take them as
they are (bench.textio)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from bench import accuracy_report, compact_results, scrape_cli, stack_summary
from bench.textio import plain_name, read_text


def _text(rng, kib):
    words = ["decode", "seal", "pack", "p99", "13.6", "ms", "\n"]
    out = []
    while sum(map(len, out)) < kib * 1024:
        out.append(words[int(rng.integers(len(words)))] + f"{int(rng.integers(10**6))} ")
    return "".join(out)


@pytest.fixture()
def tree(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "results"
    (root / "run-a" / "sub").mkdir(parents=True)
    files = {
        "top.json": _text(rng, 40),  # the root's own file: named by path in RESULTS.md, stays
        "run-a/server.log": _text(rng, 45),
        "run-a/small.json": _text(rng, 2),
        "run-a/sub/itl.jsonl": _text(rng, 31),
        "run-a/sub/figure.png": _text(rng, 50),  # not a text suffix
        "run-a/old.csv.gz": _text(rng, 50),  # already gzipped by name
    }
    for name, text in files.items():
        (root / name).write_text(text)
    return root, files


def test_the_larger_text_files_of_run_folders_are_gzipped_and_read_back_the_same(tree, capsys):
    root, files = tree
    assert compact_results.main(["--root", str(root), "--dry-run"]) == 0
    assert "2 files would shrink" in capsys.readouterr().out
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == sorted(files)
    assert compact_results.main(["--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "[1/2] " in out and "[2/2] " in out and "2 files shrank" in out
    for name in ("run-a/server.log", "run-a/sub/itl.jsonl"):
        assert not (root / name).exists()
        assert gzip.decompress((root / (name + ".gz")).read_bytes()).decode() == files[name]
        assert read_text(root / (name + ".gz")) == files[name]
    for name in ("top.json", "run-a/small.json", "run-a/sub/figure.png", "run-a/old.csv.gz"):
        assert (root / name).read_text() == files[name]
    assert compact_results.main(["--root", str(root)]) == 0  # nothing left to do
    assert "0 files shrank" in capsys.readouterr().out


def test_the_same_file_gives_the_same_bytes_and_nothing_is_overwritten(tree, capsys):
    root, files = tree
    log = root / "run-a" / "server.log"
    packed = compact_results.gzip_bytes(log.read_bytes())
    assert packed == compact_results.gzip_bytes(files["run-a/server.log"].encode())
    (root / "run-a" / "server.log.gz").write_bytes(b"an earlier archive")
    assert compact_results.main(["--root", str(root)]) == 1
    assert "expected no server.log.gz beside it" in capsys.readouterr().err
    assert log.read_text() == files["run-a/server.log"]
    assert (root / "run-a" / "server.log.gz").read_bytes() == b"an earlier archive"


def test_bad_arguments_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        compact_results.main(["--root", str(tmp_path / "missing")])
    assert "--root: expected a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compact_results.main(["--root", str(tmp_path), "--min-kb", "-1"])
    assert "--min-kb: expected an integer >= 0, got -1" in capsys.readouterr().err


def _gzipped_twin(path):
    twin = path.with_name(path.name + ".gz")
    twin.write_bytes(gzip.compress(path.read_bytes()))
    return twin


def test_the_readers_take_a_gzipped_file_as_the_plain_one(tmp_path, capsys):
    assert plain_name(tmp_path / "a.jsonl.gz") == "a.jsonl" and plain_name("b.log") == "b.log"
    stacks = tmp_path / "stacks.txt"
    stacks.write_text("main (m.py:1);f (m.py:5) @7 2\nmain (m.py:1);g (m.py:9) @3 1\n")
    outs = []
    for path in (stacks, _gzipped_twin(stacks)):
        assert stack_summary.main([str(path), "--json"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and json.loads(outs[0])
    before, after = tmp_path / "before.txt", tmp_path / "after.txt"
    before.write_text("x 1\n")
    after.write_text("x 3\n")
    assert scrape_cli.run_two_scrapes("bench.t", "t", lambda a, b: [a, b], str,
                                      [str(_gzipped_twin(before)), str(after), "--json"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out) == ["x 1\n", "x 3\n"]
    run = tmp_path / "acc.json"
    run.write_text(json.dumps({"label": "dense", "config": {}, "summary": {}, "records": []}))
    assert accuracy_report.load(str(_gzipped_twin(run))) == accuracy_report.load(str(run))
    (tmp_path / "bad.json.gz").write_bytes(b"not gzip")
    with pytest.raises(OSError):
        accuracy_report.load(str(tmp_path / "bad.json.gz"))
