# SPDX-License-Identifier: Apache-2.0
"""bench.apply_cost: a small run re-seals every job with its sidecar plan through the store's real paths (whole, and
staged then committed) and reports every mode; bad arguments are refused with the option's name."""

from __future__ import annotations

import pytest

from bench.apply_cost import main


def test_small_run_lands_every_plan_and_reports_every_mode(capsys):
    rep = main(["--layers", "2", "--kv-heads", "2", "--pages", "2", "--jobs", "3", "--rounds", "2", "--profile", "5"])
    assert rep["plans_landed"] is True
    assert rep["applies"] == 3
    assert all(rep[m]["median_ms"] > 0 and rep[m]["max_ms"] >= rep[m]["median_ms"] for m in ("idle", "busy", "commit"))
    out = capsys.readouterr().out
    assert "plans landed: True" in out and "reseal_segments" in out


@pytest.mark.parametrize("argv, match", [(["--pages", "0"], "--pages: expected >= 1, got 0"),
                                         (["--busy-ms", "-1"], "--busy-ms: expected >= 0, got -1.0"),
                                         (["--ratio", "0.5"], "--ratio: expected >= 1, got 0.5")])
def test_bad_arguments_are_refused(argv, match):
    with pytest.raises(SystemExit, match=match):
        main(argv)
