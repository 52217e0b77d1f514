# SPDX-License-Identifier: Apache-2.0
"""bench.served_accuracy: the suite command per configuration, and bad names refused before any server starts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from bench.served_accuracy import main, suite_command


def test_suite_command_passes_the_flags_after_the_separator():
    cmd = suite_command("http://127.0.0.1:30000", "mosaic-r3", Path("/tmp/a.json"), ["--lengths", "2048"])
    assert cmd[:3] == [sys.executable, "-m", "bench.accuracy"]
    assert cmd[3:] == ["--url", "http://127.0.0.1:30000", "--label", "mosaic-r3", "--out", "/tmp/a.json", "-q",
                       "--lengths", "2048"]  # fmt: skip


def test_a_bad_configuration_name_fails_before_any_server_starts(tmp_path):
    with pytest.raises(ValueError, match="config: expected dense, fp8 or mosaic-r<ratio>"):
        main(["--model", "m", "--configs", "dense", "sparse-r3", "--out", str(tmp_path), "--", "--samples", "1"])
    assert not list(tmp_path.iterdir())
