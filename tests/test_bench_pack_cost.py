# SPDX-License-Identifier: Apache-2.0
"""bench.pack_cost: a real pool packs every planned page, the timings and counts come back, the pack's kernel ops
do not grow with the layers (one launch packs them all), --launches compares that launch with one per layer, and bad
arguments are refused by name."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("sglang")

from bench import pack_cost  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = "--kv-heads 2 --pages 2 --page-size 16 --head-dim 64 --repeats 2 --warmup 0 --json"


def _run(argv: str, capsys) -> dict:
    report = pack_cost.main(argv.split())
    printed = json.loads(capsys.readouterr().out)
    assert printed["pages_sealed"] == report["pages_sealed"]
    return report


def test_packs_every_planned_page_and_counts_the_packs_ops(capsys):
    two = _run(f"--layers 2 {TINY}", capsys)
    three = _run(f"--layers 3 {TINY} --seed 5", capsys)
    for report in (two, three):
        assert report["pages_sealed"] == (2 + 1) * 2  # two timed packs and the counted one, of 2 pages each
        assert len(report["host_ms"]) == len(report["time_ms"]) == 2
        assert all(0 < h <= t for h, t in zip(report["host_ms"], report["time_ms"]))
        assert report["ops_by_kind"]["kernel"] > 0
    # one launch packs every layer (pack_layers_fwd): a third layer adds no kernel op, at the store's pack or elsewhere
    pack_site = [site for site in three["kernel_ops_by_site"] if "(seal)" in site]
    assert pack_site
    assert [three["kernel_ops_by_site"][site] for site in pack_site] == [two["kernel_ops_by_site"][site]
                                                                         for site in pack_site]  # fmt: skip
    assert three["ops_by_kind"]["kernel"] == two["ops_by_kind"]["kernel"]


def test_profile_names_the_pack(capsys):
    report = _run(f"--layers 2 {TINY} --repeats 1 --no-count --profile 5", capsys)
    assert report["pages_sealed"] == (1 + 1) * 2
    assert "seal_pages" in report["profile"]
    assert "ops_by_kind" not in report


@pytest.mark.parametrize(
    "argv, message",
    [("--pages 0", "--pages: expected an integer >= 1, got 0"), ("--warmup -1", "--warmup: expected an integer >= 0"),
     ("--ratio 1", "--ratio: expected a compression ratio > 1, got 1.0")],
)  # fmt: skip
def test_bad_arguments_are_refused_by_name(argv, message):
    with pytest.raises(SystemExit, match=message):
        pack_cost.main(argv.split())


def test_launches_one_per_layer_and_one_for_all_write_the_same_bytes(capsys):
    """--launches packs one more seal's plans both ways into scratch tables (the bench refuses unequal bytes) and
    times each; those pages stay dense."""
    report = _run(f"--layers 3 {TINY} --no-count --launches", capsys)
    assert report["launches_same_bytes"] is True
    assert report["pages_sealed"] == 2 * 2  # the two timed packs; not the launches' pages
    for way in ("per_layer", "one_launch"):
        timing = report["launches"][way]
        assert len(timing["host_ms"]) == len(timing["time_ms"]) == 2
        assert all(0 < h <= t for h, t in zip(timing["host_ms"], timing["time_ms"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_launches_on_cuda_build_their_slots_on_the_pool_device(capsys):
    """On CUDA, --launches reads the pages' slots through the pool's device page table (the twenty-ninth run's
    seal-graphs step failed there: a host tensor of logical slots indexed the CUDA table)."""
    report = _run(f"--layers 2 {TINY} --no-count --launches --device cuda --dtype fp16", capsys)
    assert report["launches_same_bytes"] is True
