# SPDX-License-Identifier: Apache-2.0
"""Keep the tracked raw results small: gzip the larger text files of the run folders under ``bench/results``.

``python -m bench.compact_results [--root bench/results] [--min-kb 30] [--dry-run]``: each ``.json``, ``.jsonl``,
``.log``, ``.txt`` and ``.csv`` file over ``--min-kb`` KiB in a folder below ``--root`` becomes ``NAME.gz`` (no name
or time in the gzip header, so the same file always gives the same bytes), read back and compared before the
original is removed. The root's own files stay as they are: RESULTS.md and the commands in it name them by path.

Every GPU step carries the tracked tree in its transfer (64 MiB with the step's own folder,
``../shared/device/README.md``), and the raw logs and JSON of each run shrink about 6x gzipped. The readers in
``bench`` take the ``.gz`` files as they are (:mod:`bench.textio`; ``bench.step_trace``, ``bench.figures``,
``bench.stack_summary``, ``bench.scrape_cli``, ``bench.accuracy_report``); by hand, ``zcat``.
"""

from __future__ import annotations

import argparse
import gzip
import io
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

TEXT_SUFFIXES = (".json", ".jsonl", ".log", ".txt", ".csv")


def gzip_bytes(data: bytes) -> bytes:
    """``data`` gzipped with an empty name and a zero time in the header."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(data)
    return buf.getvalue()


def candidates(root: Path, min_bytes: int) -> List[Path]:
    """The text files over ``min_bytes`` in the folders below ``root`` (not ``root``'s own files), sorted."""
    return sorted(p for p in root.rglob("*") if p.parent != root and p.is_file() and not p.is_symlink()
                  and p.suffix in TEXT_SUFFIXES and p.stat().st_size > min_bytes)  # fmt: skip


def compact(path: Path) -> Tuple[int, int]:
    """Replace ``path`` by ``path.gz``; returns the sizes before and after. Refuses to overwrite an existing
    ``.gz``."""
    target = path.with_name(path.name + ".gz")
    if target.exists():
        raise FileExistsError(f"{path}: expected no {target.name} beside it, got one")
    data = path.read_bytes()
    packed = gzip_bytes(data)
    if gzip.decompress(packed) != data:
        raise OSError(f"{path}: the gzipped copy does not read back as the file")
    target.write_bytes(packed)
    path.unlink()
    return len(data), len(packed)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compact_results", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path("bench/results"), help="results folder (default bench/results)")
    ap.add_argument("--min-kb", type=int, default=30, help="files over this many KiB are gzipped (default 30)")
    ap.add_argument("--dry-run", action="store_true", help="list what would be gzipped, change nothing")
    args = ap.parse_args(argv)
    if not args.root.is_dir():
        ap.error(f"--root: expected a directory, got {str(args.root)!r}")
    if args.min_kb < 0:
        ap.error(f"--min-kb: expected an integer >= 0, got {args.min_kb}")
    files = candidates(args.root, args.min_kb * 1024)
    before = after = 0
    for n, path in enumerate(files, 1):
        if args.dry_run:
            size = path.stat().st_size
            before, after = before + size, after + len(gzip_bytes(path.read_bytes()))
            print(f"[{n}/{len(files)}] would gzip {path} ({size / 1024:.0f} KiB)")
            continue
        try:
            a, b = compact(path)
        except OSError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        before, after = before + a, after + b
        print(f"[{n}/{len(files)}] {path}: {a / 1024:.0f} -> {b / 1024:.0f} KiB")
    verb = "would shrink" if args.dry_run else "shrank"
    print(f"{len(files)} files {verb} from {before / 2**20:.1f} to {after / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
