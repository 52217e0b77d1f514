# SPDX-License-Identifier: Apache-2.0
"""The README documents every option with its real default, and CI runs the README's commands."""

from __future__ import annotations

import re
from pathlib import Path

from mosaickv_sglang.config import OPTIONS

REPO = Path(__file__).resolve().parents[1]


def test_readme_option_table_matches_the_code():
    """Each option has one table row naming its flag, Engine keyword and actual default."""
    readme = (REPO / "README.md").read_text()
    for opt in OPTIONS:
        rows = [line for line in readme.splitlines() if line.startswith(f"| `{opt.flag}` / `{opt.kwarg}` |")]
        assert len(rows) == 1, opt.flag
        shown = ("on" if opt.default else "off") if isinstance(opt.default, bool) else str(opt.default)
        assert rows[0].split("|")[2].strip() == f"`{shown}`", rows[0]


def test_ci_runs_the_readme_commands():
    """.ci/run runs the two commands of the README's set-up section, verbatim."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Set up and test.*?```bash\n(.*?)```", readme, re.S)
    assert block is not None
    commands = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(commands) == 2
    ci_lines = {line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()}
    for command in commands:
        assert command in ci_lines, command
