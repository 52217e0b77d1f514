# SPDX-License-Identifier: Apache-2.0
"""bench.sidecar_cost: a small run against a real sidecar worker reports the bridge's time split and the jobs it
handed over; bad arguments are refused with the option's name."""

from __future__ import annotations

import pytest

from bench.sidecar_cost import main


def test_small_run_reports_the_split_and_the_jobs(capsys):
    rep = main(["--layers", "2", "--kv-heads", "2", "--head-dim", "64", "--page-size", "16", "--pages", "8",
                "--seals", "3", "--ticks", "2", "--tick-gap-ms", "0", "--dtype", "fp16", "--profile", "5"])  # fmt: skip
    assert rep["seal_ms"]["count"] == 3 and rep["tick_ms"]["count"] == 6
    assert rep["segments_submitted"] > 0 and rep["segments_submitted"] + rep["segments_skipped"] == 3 * 8 * 2 * 2
    assert rep["bridge_ms"]["submit"] > 0 and rep["bridge_ms"]["land"] >= 0
    out = capsys.readouterr().out
    assert "submit_sealed: mean" in out and "bridge time: submit" in out and "cumulative" in out


def test_seals_of_several_sizes_in_turn_land_in_the_staging_arena():
    rep = main(["--layers", "2", "--kv-heads", "2", "--head-dim", "64", "--page-size", "16", "--pages", "8", "3", "5",
                "--seals", "6", "--ticks", "2", "--tick-gap-ms", "0", "--dtype", "fp16", "--staging-mb", "1",
                "--json"])  # fmt: skip
    assert rep["seal_ms"]["count"] == 6 and rep["config"]["pages"] == [8, 3, 5]
    assert rep["segments_submitted"] + rep["segments_skipped"] == 2 * (8 + 3 + 5) * 2 * 2
    assert rep["staging_full_batches"] == 0 and 0 < rep["staging_peak_mb"] <= 1


@pytest.mark.parametrize("argv, match", [(["--pages", "0"], "--pages: expected an integer >= 1, got 0"),
                                         (["--pages", "4", "0"], "--pages: expected an integer >= 1, got 0"),
                                         (["--ticks", "-1"], "--ticks/--tick-gap-ms: expected values >= 0"),
                                         (["--staging-mb", "0"], "--staging-mb: expected an integer >= 1, got 0")])
def test_bad_arguments_are_refused(argv, match):
    with pytest.raises(SystemExit, match=match):
        main(argv)
