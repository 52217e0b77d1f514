# SPDX-License-Identifier: Apache-2.0
"""Pick, on the server's own GPU, the sparse decode kernel's fastest chan rebuild and register cap.

The chan rebuild modes that rebuild whole rows (``ptr-gather``, ``tl-gather``, ``popcount``, ``row-compact``) give
the same rows bit for bit, and a register cap changes only where values live, so every candidate of
:data:`CANDIDATES` gives the same decode output: choosing among them by speed cannot change an answer. Which is
fastest depends on the GPU (the kernel is bound by the rebuild's instructions and by how many warps fit, not by
bandwidth), so the attention backend calls :func:`select_decode_variant` once at startup on CUDA, before the kernel
warmup: each candidate decodes the same synthetic chan-compressed batch, and the fastest becomes the module default
of :func:`~mosaickv_sglang.kernels.sparse_decode.sparse_decode_fwd` (``CHAN_MODE``, ``MAXNREG``). A candidate whose
output differs from the first's is dropped (logged). ``MOSAICKV_DECODE_TUNE=0`` keeps the defaults;
``MOSAICKV_DECODE_TUNE=MODE`` or ``MODE/CAP`` (e.g. ``popcount``, ``ptr-gather/168``: one of :data:`CANDIDATES`) fixes
the variant without timing. Timings taken while other work runs on the GPU (a second server starting beside this one)
can pick a variant that is slower once the server is alone (``bench/RESULTS.md``, thirty-fourth run: decode steps 15%
slower); a fixed variant keeps such servers comparable and a restart's choice the same.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from mosaickv_sglang.device_timer import best_seconds_in_rounds
from mosaickv_sglang.kernels import sparse_decode as sd
from mosaickv_sglang.kernels.format import FORM_CHAN, SegmentPlan
from mosaickv_sglang.warmup import WarmupShape

logger = logging.getLogger(__name__)

__all__ = ["CANDIDATES", "ENV_VAR", "DecodeBatch", "configure_decode_variant", "fixed_variant", "select_decode_variant",
           "time_decode_variants"]

ENV_VAR = "MOSAICKV_DECODE_TUNE"
Variant = Tuple[int, Optional[int]]  # (chan mode, register cap)
CANDIDATES: Tuple[Variant, ...] = (
    (sd.CHAN_PTR_GATHER, None),
    (sd.CHAN_TL_GATHER, None),
    (sd.CHAN_POPCOUNT, None),
    (sd.CHAN_ROW_COMPACT, None),
    (sd.CHAN_PTR_GATHER, 168),
    (sd.CHAN_POPCOUNT, 168),
)
"""Decode-output-invariant variants (word-blocks, which rounds differently, is not among them)."""


def tune_enabled() -> bool:
    """``MOSAICKV_DECODE_TUNE`` unset, ``1`` or ``auto``: time the candidates (``0`` or a variant: do not)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() in ("1", "auto")


def _name(v: Variant) -> str:
    return f"{sd.CHAN_MODE_NAMES[v[0]]}/{'no cap' if v[1] is None else f'maxnreg {v[1]}'}"


def _spelling(v: Variant) -> str:
    """How ``MOSAICKV_DECODE_TUNE`` names ``v``: ``MODE`` without a cap, ``MODE/CAP`` with one."""
    return sd.CHAN_MODE_NAMES[v[0]] + ("" if v[1] is None else f"/{v[1]}")


def fixed_variant() -> Optional[Variant]:
    """The candidate ``MOSAICKV_DECODE_TUNE`` names (``MODE`` or ``MODE/CAP``, case and spaces ignored), or ``None``
    when it asks for timing or for the defaults."""
    raw = os.environ.get(ENV_VAR, "1").strip().lower()
    if raw in ("1", "auto", "0"):
        return None
    by_spelling = {_spelling(v): v for v in CANDIDATES}
    if raw not in by_spelling:
        raise ValueError(f"{ENV_VAR}: expected 1 or auto (time them), 0 (the defaults) or one of "
                         f"{', '.join(by_spelling)}, got {raw!r}")  # fmt: skip
    return by_spelling[raw]


class DecodeBatch:
    """A decode batch over a chan-compressed cache (served caches are chan on both sides almost everywhere): ``batch``
    requests reading ``segments`` packed segments per KV head (chan ``k = d / 4`` on K and V, every token kept) and a
    dense tail of ``tail`` tokens each, in the shape's dtypes."""

    def __init__(self, shape: WarmupShape, device: torch.device, batch: int = 16, segments: int = 64,
                 tail: int = 64) -> None:  # fmt: skip
        from mosaickv_sglang.kernels.pack import pack_segments_fwd

        h, s, d, g = shape.num_kv_heads, shape.seg_size, shape.head_dim, shape.group
        gen = torch.Generator().manual_seed(0)
        pool = segments * s + batch * tail
        self.k_buf = torch.randn(pool, h, d, generator=gen).to(device, shape.dtype)
        self.v_buf = torch.randn(pool, h, d, generator=gen).to(device, shape.dtype)
        n = segments * h  # segment i * h + head reads page i's head
        plan = SegmentPlan.uniform(n, s, d, device=device, k_form=FORM_CHAN, k_param=max(1, d // 4),
                                   v_form=FORM_CHAN, v_param=max(1, d // 4))  # fmt: skip
        k_off, v_off, end = plan.bump_offsets(0)
        self.arena = torch.zeros(max(end, 1) * 64, dtype=shape.dtype, device=device)
        self.desc = torch.zeros(n, 8, dtype=torch.int32, device=device)
        bounds = torch.zeros(n, 2, d, dtype=shape.dtype, device=device)
        pages = torch.arange(segments, device=device).repeat_interleave(h)
        tok = pages[:, None] * s + torch.arange(s, device=device)[None, :]
        heads = torch.arange(h, dtype=torch.int32, device=device).repeat(segments)
        ids = torch.arange(n, dtype=torch.int32, device=device)
        pack_segments_fwd(self.k_buf, self.v_buf, tok, heads, plan, self.arena, self.desc, bounds, ids,
                          k_off.to(device, torch.int64), v_off.to(device, torch.int64))  # fmt: skip
        per_head = torch.arange(segments, dtype=torch.int32, device=device)[None, :] * h
        self.sel = (per_head + torch.arange(h, dtype=torch.int32, device=device)[:, None]).expand(batch, h, segments)
        self.sel = self.sel.contiguous()
        self.tail_indptr = torch.arange(0, (batch + 1) * tail, tail, dtype=torch.int32, device=device)
        self.tail_indices = torch.arange(segments * s, pool, dtype=torch.int64, device=device)
        self.q = torch.randn(batch, h * g, d, generator=gen).to(device, shape.q_dtype)
        self.out = torch.empty_like(self.q)
        self.splits = sd.suggest_num_splits(batch, h, segments + 1, shape.num_sms)
        self.partial_out = torch.empty(batch, h * g, self.splits, d, dtype=torch.float32, device=device)
        self.partial_lse = torch.empty(batch, h * g, self.splits, dtype=torch.float32, device=device)

    def run(self, v: Variant) -> torch.Tensor:
        return sd.sparse_decode_fwd(self.q, self.arena, self.desc, self.sel, self.k_buf, self.v_buf, self.tail_indptr,
                                    self.tail_indices, self.out, self.partial_out, self.partial_lse,
                                    num_splits=self.splits, chan_mode=v[0], maxnreg=v[1])  # fmt: skip


def time_decode_variants(batch: DecodeBatch, candidates: Sequence[Variant] = CANDIDATES, repeats: int = 5,
                         launches: int = 10) -> Dict[Variant, float]:  # fmt: skip
    """Seconds per launch of each candidate on ``batch`` (the best of ``repeats`` rounds of ``launches``, every
    candidate timed once a round, :func:`~mosaickv_sglang.device_timer.best_seconds_in_rounds`, after one untimed
    launch each, which also compiles it). A candidate that raises, or whose output is not bit for bit the first
    candidate's, is logged and left out."""
    runnable: Dict[Variant, Callable[[], torch.Tensor]] = {}
    first: Optional[torch.Tensor] = None
    for v in candidates:
        try:
            got = batch.run(v).clone()
        except Exception:  # noqa: BLE001 - a variant that cannot run here is not chosen; the others still can be
            _failed(v)
            continue
        if first is None:
            first = got
        elif not torch.equal(got, first):
            logger.warning("MosaicKV: decode variant %s gives another output than %s; not chosen", _name(v),
                           _name(candidates[0]))  # fmt: skip
            continue
        runnable[v] = functools.partial(batch.run, v)
    return best_seconds_in_rounds(runnable, batch.q.device, repeats, launches, on_error=_failed)


def _failed(v: Variant) -> None:
    logger.warning("MosaicKV: decode variant %s failed; not chosen", _name(v), exc_info=True)


def select_decode_variant(shape: WarmupShape, device: torch.device,
                          timings: Optional[Dict[Variant, float]] = None) -> Variant:  # fmt: skip
    """Make the fastest of ``timings`` (default: :func:`time_decode_variants` on a :class:`DecodeBatch` of ``shape``
    on ``device``) the sparse decode's default chan mode and register cap; returns it. With no timing the defaults
    stay."""
    if timings is None:
        timings = time_decode_variants(DecodeBatch(shape, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the server's memory budget was set before: give the batch's buffers back
    if timings:
        sd.CHAN_MODE, sd.MAXNREG = min(timings, key=timings.__getitem__)
    chosen = (sd.CHAN_MODE, sd.MAXNREG)
    logger.info("MosaicKV: sparse decode %s (%s)", _name(chosen),
                ", ".join(f"{_name(v)} {1e6 * t:.1f} us" for v, t in timings.items()) or "no timing")  # fmt: skip
    return chosen


def configure_decode_variant(shape: WarmupShape, device: torch.device) -> Optional[Variant]:
    """The startup choice as ``MOSAICKV_DECODE_TUNE`` asks: the variant it names made the default (logged), nothing
    with ``0``, else :func:`select_decode_variant` (timing). Returns the variant set, ``None`` when none was. A bad
    value raises; a timing that fails is logged and the kernel keeps its defaults."""
    fixed = fixed_variant()
    if fixed is not None:
        sd.CHAN_MODE, sd.MAXNREG = fixed
        logger.info("MosaicKV: sparse decode %s (%s)", _name(fixed), ENV_VAR)
        return fixed
    if not tune_enabled():
        return None
    try:
        return select_decode_variant(shape, device)
    except Exception:  # noqa: BLE001 - an optimisation: the kernel's defaults serve without it
        logger.exception("MosaicKV: timing the sparse decode variants failed; the kernel keeps its defaults "
                         f"({ENV_VAR}=0 skips the timing)")  # fmt: skip
        return None
