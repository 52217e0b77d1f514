# SPDX-License-Identifier: Apache-2.0
"""Seeded builders of random packed caches for the kernel tests (not a test module).

Everything is built from a ``torch.Generator`` on the CPU and moved to the target device, so a seed gives the same
case on the CPU interpreter and on the GPU.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import List, Optional, Sequence, Tuple, Union

import pytest
import torch

from mosaickv_sglang.kernels.format import (
    FLAG_ALWAYS_READ,
    FORM_CHAN,
    FORM_DENSE,
    FORM_LOWRANK,
    GRANULE_ELEMS,
    SegmentPlan,
)
from mosaickv_sglang.kernels.reference import ref_pack_segments

ALL_FORM_PAIRS = list(itertools.product((FORM_DENSE, FORM_CHAN, FORM_LOWRANK), repeat=2))
# forms="chan": chan on at least one side of every segment, chan/chan twice as often
CHAN_FORM_PAIRS = [(FORM_CHAN, FORM_CHAN), (FORM_CHAN, FORM_DENSE), (FORM_CHAN, FORM_CHAN), (FORM_DENSE, FORM_CHAN),
                   (FORM_CHAN, FORM_LOWRANK), (FORM_LOWRANK, FORM_CHAN)]  # fmt: skip
# forms="lowrank": low-rank on at least one side of every segment, low-rank/low-rank twice as often
LOWRANK_FORM_PAIRS = [(FORM_LOWRANK, FORM_LOWRANK), (FORM_LOWRANK, FORM_DENSE), (FORM_LOWRANK, FORM_LOWRANK),
                      (FORM_DENSE, FORM_LOWRANK), (FORM_LOWRANK, FORM_CHAN), (FORM_CHAN, FORM_LOWRANK)]  # fmt: skip



def gpu_only(fn):
    """Mark a test ``gpu`` (deselected by default) and skip it without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(fn))


def randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in ``[lo, hi]``."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def pick(gen: torch.Generator, options: Sequence[int]) -> int:
    return int(options[randint(gen, 0, len(options) - 1)])


def random_plan(
    gen: torch.Generator,
    n: int,
    seg_size: int,
    head_dim: int,
    *,
    forms: str = "mixed",
    rmax: Union[int, Tuple[int, int]] = 16,
    always_read_frac: float = 0.0,
    full_rows: bool = False,
) -> SegmentPlan:
    """A CPU plan of ``n`` segments.

    ``forms="mixed"`` cycles through all 9 (K form, V form) pairs (shuffled); ``"dense"`` keeps everything dense;
    ``"chan"`` cycles through :data:`CHAN_FORM_PAIRS` (shuffled) and also draws chan ``k`` at ``d / 4``, ``d / 2``
    and one above each (the row-compact decode's tile widths); ``"lowrank"`` cycles through
    :data:`LOWRANK_FORM_PAIRS` (shuffled). Kept rows ``m`` mix ``S``, 1 and random values
    (``full_rows`` forces ``m = S``); chan ``k`` mixes 1, ``d - 1`` and random values; low-rank ``r`` mixes 1,
    ``Rmax`` and random values. ``rmax``: the factors' columns ``Rmax``,
    or ``(K, V)`` per side, 0 giving that side no factors (its low-rank pairs become dense).
    """
    s, d = seg_size, head_dim
    if forms == "mixed":
        pairs = [ALL_FORM_PAIRS[i % 9] for i in range(n)]
        perm = torch.randperm(n, generator=gen).tolist()
        pairs = [pairs[i] for i in perm]
    elif forms in ("chan", "lowrank"):
        table = CHAN_FORM_PAIRS if forms == "chan" else LOWRANK_FORM_PAIRS
        pairs = [table[i % len(table)] for i in range(n)]
        perm = torch.randperm(n, generator=gen).tolist()
        pairs = [pairs[i] for i in perm]
    elif forms == "dense":
        pairs = [(FORM_DENSE, FORM_DENSE)] * n
    else:
        raise ValueError(f"forms: expected 'mixed', 'chan', 'lowrank' or 'dense', got {forms!r}")
    k_choices = (d // 4, d // 4 + 1, d // 2, d // 2 + 1) if forms == "chan" else ()
    side_rmax = dict(zip(("k", "v"), (rmax, rmax) if isinstance(rmax, int) else rmax))
    pairs = [
        tuple(FORM_DENSE if f == FORM_LOWRANK and not side_rmax[side] else f for side, f in zip(("k", "v"), p))
        for p in pairs
    ]
    keep = torch.zeros(n, s, dtype=torch.bool)
    params = {"k": [], "v": []}
    for i in range(n):
        m = s if full_rows else pick(gen, (s, 1, randint(gen, 1, s), randint(gen, 1, s)))
        keep[i, torch.randperm(s, generator=gen)[:m]] = True
        for side, form in zip(("k", "v"), pairs[i]):
            if form == FORM_CHAN:
                params[side].append(pick(gen, (1, d - 1, randint(gen, 1, d - 1), randint(gen, 1, d - 1), *k_choices)))
            elif form == FORM_LOWRANK:
                rmax_eff = min(side_rmax[side], s, d)
                params[side].append(pick(gen, (1, rmax_eff, randint(gen, 1, rmax_eff))))
            else:
                params[side].append(0)

    def factors(r):
        if not r:
            return None
        a = torch.randn(n, s, r, generator=gen)
        b = torch.randn(n, r, d, generator=gen) / r**0.5
        return a, b

    i32 = dict(dtype=torch.int32)
    flags = (torch.rand(n, generator=gen) < always_read_frac).to(torch.int32) * FLAG_ALWAYS_READ
    # chan weights: positive, with a few exact zeros and repeated values to exercise ties
    def weights():
        w = torch.rand(n, d, generator=gen) + 0.05
        w[torch.rand(n, d, generator=gen) < 0.1] = 0.0
        w[:, : d // 4] = 1.0
        return w

    return SegmentPlan(
        token_keep=keep,
        k_form=torch.tensor([p[0] for p in pairs], **i32),
        k_param=torch.tensor(params["k"], **i32),
        v_form=torch.tensor([p[1] for p in pairs], **i32),
        v_param=torch.tensor(params["v"], **i32),
        k_chan_weight=weights(),
        v_chan_weight=weights(),
        k_factors=factors(side_rmax["k"]),
        v_factors=factors(side_rmax["v"]),
        flags=flags,
    )


def plan_to(plan: SegmentPlan, device: torch.device) -> SegmentPlan:
    def mv(x):
        if x is None:
            return None
        if isinstance(x, tuple):
            return tuple(t.to(device) for t in x)
        return x.to(device)

    return SegmentPlan(**{f.name: mv(getattr(plan, f.name)) for f in dataclasses.fields(plan)})


@dataclasses.dataclass
class PackedCase:
    """A packed cache: pool buffers, the plan, and the tables, all on one device."""

    k_src: torch.Tensor  # [pool, H_kv, d]
    v_src: torch.Tensor
    seg_token_index: torch.Tensor  # [N, S] int64
    seg_heads: torch.Tensor  # [N] int32
    plan: SegmentPlan
    arena: torch.Tensor
    desc: torch.Tensor  # [num_segments, 8]
    bounds: torch.Tensor  # [num_segments, 2, d]
    seg_ids: torch.Tensor  # [N] int32: descriptor row of plan segment i
    k_offsets: torch.Tensor
    v_offsets: torch.Tensor

    @property
    def num_segments(self) -> int:
        return int(self.desc.shape[0])


def pool_buffers(gen, pool, h_kv, d, dtype, device, scale=1.0):
    k = (torch.randn(pool, h_kv, d, generator=gen) * scale).to(dtype).to(device)
    v = torch.randn(pool, h_kv, d, generator=gen).to(dtype).to(device)
    return k, v


def build_packed(
    seed: int,
    *,
    n: int,
    seg_size: int,
    head_dim: int,
    h_kv: int,
    pool: int,
    device: torch.device,
    dtype: torch.dtype = torch.float16,
    forms: str = "mixed",
    rmax: Union[int, Tuple[int, int]] = 16,
    always_read_frac: float = 0.0,
    full_rows: bool = False,
    token_index: Optional[torch.Tensor] = None,
    seg_heads: Optional[torch.Tensor] = None,
    k_src: Optional[torch.Tensor] = None,
    v_src: Optional[torch.Tensor] = None,
    pack: str = "ref",
    base_granule: int = 3,
) -> PackedCase:
    """Random pool + plan, packed by the reference (``pack="ref"``), the kernel (``"kernel"``) or not (``"none"``).

    Descriptor rows are a random permutation (segment ``i`` -> row ``seg_ids[i]``), payloads start at
    ``base_granule`` with a spare granule at the end, and the arena starts filled with NaN so that reads of
    unwritten memory show up.
    """
    gen = torch.Generator().manual_seed(seed)
    plan = random_plan(
        gen, n, seg_size, head_dim, forms=forms, rmax=rmax, always_read_frac=always_read_frac, full_rows=full_rows
    )
    if k_src is None:
        k_src, v_src = pool_buffers(gen, pool, h_kv, head_dim, dtype, device)
    if token_index is None:
        token_index = torch.stack([torch.randperm(pool, generator=gen)[:seg_size] for _ in range(n)])
    if seg_heads is None:
        seg_heads = torch.randint(0, h_kv, (n,), generator=gen, dtype=torch.int32)
    seg_ids = torch.randperm(n, generator=gen).to(torch.int32)
    plan = plan_to(plan, device)
    k_off, v_off, end = plan.bump_offsets(base_granule)
    arena = torch.full(((end + 1) * GRANULE_ELEMS,), float("nan"), dtype=dtype, device=device)
    desc = torch.full((n, 8), -7, dtype=torch.int32, device=device)
    bounds = torch.full((n, 2, head_dim), float("nan"), dtype=dtype, device=device)
    case = PackedCase(
        k_src, v_src, token_index.to(device), seg_heads.to(device), plan, arena, desc, bounds,
        seg_ids.to(device), k_off.to(device), v_off.to(device),
    )  # fmt: skip
    if pack == "ref":
        ref_pack_segments(*pack_args(case))
    elif pack == "kernel":
        from mosaickv_sglang.kernels.pack import pack_segments_fwd

        pack_segments_fwd(*pack_args(case))
    elif pack != "none":
        raise ValueError(f"pack: expected 'ref', 'kernel' or 'none', got {pack!r}")
    return case


def pack_args(c: PackedCase) -> tuple:
    return (c.k_src, c.v_src, c.seg_token_index, c.seg_heads, c.plan, c.arena, c.desc, c.bounds, c.seg_ids,
            c.k_offsets, c.v_offsets)  # fmt: skip


def ragged_indices(gen, lens: Sequence[int], pool: int, device, dtype=torch.int64) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(indptr int32 [B+1], indices [sum(lens)])`` of distinct random pool slots per request."""
    indptr = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
    idx = [torch.randperm(pool, generator=gen)[:n] for n in lens]
    indices = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.int64)
    return indptr.to(device), indices.to(dtype).to(device)


def random_selection(gen, num_segments: int, bsz: int, h_kv: int, counts: List[int], width: int, device):
    """``[B, H_kv, width]`` int32: request ``b`` selects ``counts[b]`` random segment rows per head, the rest ``-1``
    (interleaved, not only at the end)."""
    sel = torch.full((bsz, h_kv, width), -1, dtype=torch.int32)
    for b in range(bsz):
        for h in range(h_kv):
            ids = torch.randperm(num_segments, generator=gen)[: counts[b]].to(torch.int32)
            slots = torch.randperm(width, generator=gen)[: counts[b]]
            sel[b, h, slots] = ids
    return sel.to(device)
