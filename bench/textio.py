# SPDX-License-Identifier: Apache-2.0
"""Result files read as they are archived: a path ending in ``.gz`` is read through gzip (the run folders of
``bench/results`` keep their larger files gzipped, :mod:`bench.compact_results`)."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Union

PathLike = Union[str, Path]


def read_text(path: PathLike) -> str:
    """The file's text (UTF-8), through gzip when its name ends in ``.gz``."""
    p = Path(path)
    if p.suffix == ".gz":
        with gzip.open(p, "rt", encoding="utf-8") as f:
            return f.read()
    return p.read_text(encoding="utf-8")


def plain_name(path: PathLike) -> str:
    """The file's name without a trailing ``.gz`` (``itl.jsonl.gz`` gives ``itl.jsonl``)."""
    name = Path(path).name
    return name[: -len(".gz")] if name.endswith(".gz") else name
