# SPDX-License-Identifier: Apache-2.0
"""The command line shared by the readers of two ``/metrics`` scrapes (``bench.decode_steps``,
``bench.server_latency``): ``before.txt after.txt [--json]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

from bench.textio import read_text

T = TypeVar("T")


def run_two_scrapes(
    prog: str, description: str, load: Callable[[str, str], T], line: Callable[[T], str],
    argv: Optional[Sequence[str]],
) -> int:  # fmt: skip
    """Parse ``argv``, print ``load(before text, after text)`` as one JSON object (``--json``) or as ``line`` of it,
    and return 0; return 2 after printing ``<module>: <error>`` to stderr when a file cannot be read or ``load``
    raises ``ValueError``."""
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("before", type=Path, help="/metrics text scraped before the load")
    ap.add_argument("after", type=Path, help="/metrics text scraped after the load")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a line")
    args = ap.parse_args(argv)
    try:
        got = load(read_text(args.before), read_text(args.after))
    except (OSError, ValueError) as err:
        print(f"{prog.rsplit('.', 1)[-1]}: {err}", file=sys.stderr)
        return 2
    print(json.dumps(got) if args.json else line(got))
    return 0
