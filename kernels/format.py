# SPDX-License-Identifier: Apache-2.0
"""The MosaicKV packed segment format: constants, sizes and the per-segment plan.

This module is the single source of truth for the packed layout read and written by the Triton kernels of
``mosaickv_sglang.kernels``; ``docs/packed-format.md`` describes the same layout in prose. Everything here is plain
PyTorch (no Triton), so the pool, the planner and the tests can use it without a GPU.

Layout summary
--------------
* A *segment* is ``S`` consecutive tokens (``S`` a power of two in ``[16, 256]``, 64 by default) of one layer and one
  KV head. It keeps ``m <= S`` token rows (token dropping, shared by K and V), stored contiguously in their original
  order. RoPE is applied before caching, so attention needs no token positions.
* K and V each have a *form*: :data:`FORM_DENSE` (``m * d`` values), :data:`FORM_CHAN` with parameter ``k``
  (``m * d / 32`` int32 bitmask words, then ``m * k`` values in ascending channel order), or :data:`FORM_LOWRANK`
  with parameter ``r`` (``A`` of ``m * r`` values row-major, then ``B`` of ``r * d`` values row-major;
  ``rows = A @ B``).
* Payloads live in one 1-D 16-bit arena (fp16 or bf16); int32 mask words share its storage
  (``arena.view(torch.int32)``). The arena is addressed in *granules* of :data:`GRANULE_ELEMS` elements (128 bytes);
  every payload starts on a granule boundary and occupies ``ceil(elems / 64)`` granules.
* The descriptor table is int32 ``[num_segments, DESC_WIDTH]`` with the fields :data:`N_ROWS`, :data:`K_FORM`,
  :data:`K_PARAM`, :data:`V_FORM`, :data:`V_PARAM`, :data:`K_OFF`, :data:`V_OFF`, :data:`FLAGS`.
* The bounds table is ``[num_segments, 2, d]`` (arena dtype): per-channel min (index 0) and max (index 1) of the
  segment's original K rows (all ``S`` tokens, before any compression), for Quest-style upper bounds.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional, Sequence, Tuple, Union

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "FORM_DENSE",
    "FORM_CHAN",
    "FORM_LOWRANK",
    "FORM_NAMES",
    "GRANULE_ELEMS",
    "GRANULE_BYTES",
    "MASK_BITS",
    "DESC_WIDTH",
    "N_ROWS",
    "K_FORM",
    "K_PARAM",
    "V_FORM",
    "V_PARAM",
    "K_OFF",
    "V_OFF",
    "FLAGS",
    "FLAG_ALWAYS_READ",
    "ARENA_DTYPES",
    "KERNEL_HEAD_DIMS",
    "MIN_SEG_SIZE",
    "MAX_SEG_SIZE",
    "DEFAULT_SEG_SIZE",
    "payload_elems",
    "payload_granules",
    "assign_offsets",
    "SegmentPlan",
    "plans_granules",
]

# --- forms -----------------------------------------------------------------------------------------------------------
FORM_DENSE = 0
"""Rows stored as is: payload ``m * d`` elements."""
FORM_CHAN = 1
"""Per-vector top-k channels: ``m * d / 32`` int32 mask words, then ``m * k`` values (ascending channel order)."""
FORM_LOWRANK = 2
"""Low rank: ``A`` (``m * r``, row-major) then ``B`` (``r * d``, row-major); rows are ``A @ B``."""
FORM_NAMES = {FORM_DENSE: "dense", FORM_CHAN: "chan", FORM_LOWRANK: "lowrank"}

# --- arena -----------------------------------------------------------------------------------------------------------
GRANULE_ELEMS = 64
"""Arena allocation unit in 16-bit elements (128 bytes). Payload offsets are granule indices."""
GRANULE_BYTES = 2 * GRANULE_ELEMS
MASK_BITS = 32
"""Channels per bitmask word of a :data:`FORM_CHAN` payload; ``head_dim`` must be a multiple of it."""
ARENA_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_HEAD_DIMS = (64, 128)
"""Head dims the Triton kernels are built and tested for (the format itself allows any multiple of 32)."""

# --- descriptor table ------------------------------------------------------------------------------------------------
DESC_WIDTH = 8
N_ROWS = 0
"""Number of kept token rows ``m`` (``1 <= m <= S``)."""
K_FORM = 1
K_PARAM = 2
"""``k`` for :data:`FORM_CHAN`, ``r`` for :data:`FORM_LOWRANK`, 0 for :data:`FORM_DENSE`."""
V_FORM = 3
V_PARAM = 4
K_OFF = 5
"""Granule offset of the K payload in the arena."""
V_OFF = 6
"""Granule offset of the V payload in the arena."""
FLAGS = 7
FLAG_ALWAYS_READ = 1
"""Bit 0 of :data:`FLAGS`: the segment is never skipped by selection (attention sinks, pinned segments)."""

# --- segments --------------------------------------------------------------------------------------------------------
MIN_SEG_SIZE = 16
MAX_SEG_SIZE = 256
DEFAULT_SEG_SIZE = 64

IntOrTensor = Union[int, torch.Tensor]


def _is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def payload_elems(form: IntOrTensor, param: IntOrTensor, rows: IntOrTensor, head_dim: int) -> IntOrTensor:
    """Number of 16-bit arena elements of one K or V payload.

    Parameters
    ----------
    form : int or torch.Tensor
        Form code (:data:`FORM_DENSE`, :data:`FORM_CHAN`, :data:`FORM_LOWRANK`); a tensor of any integer dtype and
        shape computes element-wise.
    param : int or torch.Tensor
        ``k`` for :data:`FORM_CHAN`, ``r`` for :data:`FORM_LOWRANK`, ignored for :data:`FORM_DENSE`; same shape as
        ``form`` when a tensor.
    rows : int or torch.Tensor
        Kept rows ``m``; same shape as ``form`` when a tensor.
    head_dim : int
        ``d``, a multiple of 32.

    Returns
    -------
    int or torch.Tensor
        Element counts; a tensor (dtype ``torch.int64``) when any input is a tensor.
    """
    if head_dim <= 0 or head_dim % MASK_BITS != 0:
        raise ValueError(f"head_dim: expected a positive multiple of {MASK_BITS}, got {head_dim}")
    words_elems = 2 * (head_dim // MASK_BITS)  # int32 words per row, counted in 16-bit elements
    if not any(isinstance(t, torch.Tensor) for t in (form, param, rows)):
        form, param, rows = int(form), int(param), int(rows)
        if form == FORM_DENSE:
            return rows * head_dim
        if form == FORM_CHAN:
            return rows * words_elems + rows * param
        if form == FORM_LOWRANK:
            return rows * param + param * head_dim
        raise ValueError(f"form: expected one of {sorted(FORM_NAMES)}, got {form}")
    device = next(t.device for t in (form, param, rows) if isinstance(t, torch.Tensor))
    f = torch.as_tensor(form, device=device).to(torch.int64)
    p = torch.as_tensor(param, device=device).to(torch.int64)
    m = torch.as_tensor(rows, device=device).to(torch.int64)
    dense = m * head_dim
    chan = m * words_elems + m * p
    lowrank = m * p + p * head_dim
    return torch.where(f == FORM_DENSE, dense, torch.where(f == FORM_CHAN, chan, lowrank))


def payload_granules(form: IntOrTensor, param: IntOrTensor, rows: IntOrTensor, head_dim: int) -> IntOrTensor:
    """Granules (of :data:`GRANULE_ELEMS` elements) occupied by one payload: ``ceil(payload_elems / 64)``.

    Parameters are those of :func:`payload_elems`; returns an int or an int64 tensor of the same shape.
    """
    elems = payload_elems(form, param, rows, head_dim)
    return (elems + GRANULE_ELEMS - 1) // GRANULE_ELEMS


def assign_offsets(granules: torch.Tensor, base: int = 0) -> torch.Tensor:
    """Bump-allocate consecutive payloads: exclusive prefix sum of ``granules`` plus ``base``.

    A placeholder for the pool's free-list allocator: payload ``i`` gets granules
    ``[out[i], out[i] + granules[i])``.

    Parameters
    ----------
    granules : torch.Tensor
        shape ``[n]``, dtype ``torch.int32`` or ``torch.int64``; granules of each payload (non-negative).
    base : int
        Granule offset of the first payload.

    Returns
    -------
    torch.Tensor
        shape ``[n]``, dtype ``torch.int64``, on ``granules.device``: granule offset of each payload.
    """
    if not isinstance(granules, torch.Tensor):
        raise TypeError(f"granules: expected torch.Tensor, got {type(granules).__name__}")
    if granules.dtype not in (torch.int32, torch.int64) or granules.dim() != 1:
        raise ValueError(
            f"granules: expected a 1-D torch.int32/torch.int64 tensor, got dtype {granules.dtype} "
            f"shape {tuple(granules.shape)}"
        )
    if base < 0:
        raise ValueError(f"base: expected a non-negative granule offset, got {base}")
    g = granules.to(torch.int64)
    return torch.cumsum(g, 0) - g + int(base)


_PLAN_VECTORS = ("token_keep", "k_form", "k_param", "v_form", "v_param", "k_chan_weight", "v_chan_weight", "flags")
"""A plan's per-segment tensors (first dim ``N``), apart from the low-rank factors."""


@dataclasses.dataclass
class SegmentPlan:
    """Compression plan of ``N`` segments (one layer), as produced by the planner and consumed by ``pack``.

    Attributes
    ----------
    token_keep : torch.Tensor
        shape ``[N, S]``, dtype ``torch.bool``; kept tokens of each segment (at least one per segment). K and V
        share the token selection; kept rows are stored in their original order.
    k_form, v_form : torch.Tensor
        shape ``[N]``, dtype ``torch.int32``; form codes of the K and V payloads.
    k_param, v_param : torch.Tensor
        shape ``[N]``, dtype ``torch.int32``; ``k`` (``1 <= k <= d - 1``) for :data:`FORM_CHAN`, ``r``
        (``1 <= r <= min(S, d, Rmax)``) for :data:`FORM_LOWRANK`, ignored (stored as 0) for :data:`FORM_DENSE`.
    k_chan_weight, v_chan_weight : torch.Tensor
        shape ``[N, d]``, dtype ``torch.float32``, finite and ``>= 0``; a :data:`FORM_CHAN` vector ``x`` keeps its
        ``k`` channels of largest ``|x_c| * w_c`` (computed in fp32), ties broken by the lower channel index.
    k_factors, v_factors : tuple of torch.Tensor, optional
        ``(A, B)`` with ``A`` shape ``[N, S, Rmax]`` and ``B`` shape ``[N, Rmax, d]``, floating dtype (cast to the
        arena dtype when packed). Required when any segment uses :data:`FORM_LOWRANK` on that side. For a
        segment with ``m`` kept rows and rank ``r``, ``A[n, :m, :r] @ B[n, :r, :]`` approximates the kept rows in
        order; other entries are ignored.
    flags : torch.Tensor
        shape ``[N]``, dtype ``torch.int32``; descriptor flags (bit 0 :data:`FLAG_ALWAYS_READ`).

    All tensors must be on one device. ``__post_init__`` checks shapes, dtypes and parameter ranges (this reads
    one value, i.e. synchronizes with the GPU once). ``check_values=False`` (a plan valid by construction, e.g. the
    fast planner's in a seal) checks shapes and dtypes only, reading nothing, unless ``MOSAICKV_DEBUG_CHECKS=1``.
    """

    token_keep: torch.Tensor
    k_form: torch.Tensor
    k_param: torch.Tensor
    v_form: torch.Tensor
    v_param: torch.Tensor
    k_chan_weight: torch.Tensor
    v_chan_weight: torch.Tensor
    k_factors: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    v_factors: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    flags: Optional[torch.Tensor] = None
    check_values: dataclasses.InitVar[bool] = True

    def __post_init__(self, check_values: bool = True) -> None:
        from . import _checks  # local import: _checks is tiny, keeps format importable on its own

        keep = self.token_keep
        _checks.check_tensor(keep, "token_keep", ndim=2, dtype=torch.bool)
        n, s = keep.shape
        if not (_is_pow2(s) and MIN_SEG_SIZE <= s <= MAX_SEG_SIZE):
            raise ValueError(
                f"token_keep: expected S (dim 1) a power of two in [{MIN_SEG_SIZE}, {MAX_SEG_SIZE}], got {s}"
            )
        dev = keep.device
        if self.flags is None:
            self.flags = torch.zeros(n, dtype=torch.int32, device=dev)
        for name in ("k_form", "k_param", "v_form", "v_param", "flags"):
            _checks.check_tensor(getattr(self, name), name, shape=(n,), dtype=torch.int32, device=dev)
        _checks.check_tensor(self.k_chan_weight, "k_chan_weight", ndim=2, dtype=torch.float32, device=dev)
        d = self.k_chan_weight.shape[1]
        if d <= 0 or d % MASK_BITS != 0:
            raise ValueError(f"k_chan_weight: expected head_dim (dim 1) a positive multiple of {MASK_BITS}, got {d}")
        _checks.check_tensor(self.k_chan_weight, "k_chan_weight", shape=(n, d))
        _checks.check_tensor(self.v_chan_weight, "v_chan_weight", shape=(n, d), dtype=torch.float32, device=dev)
        if n == 0:
            return
        for side in ("k", "v"):
            factors = getattr(self, f"{side}_factors")
            if factors is None:
                continue
            if not isinstance(factors, tuple) or len(factors) != 2:
                raise TypeError(f"{side}_factors: expected a tuple (A, B), got {type(factors).__name__}")
            a, b = factors
            _checks.check_tensor(a, f"{side}_factors[0]", ndim=3, device=dev)
            rmax = a.shape[2]
            _checks.check_tensor(a, f"{side}_factors[0]", shape=(n, s, rmax))
            _checks.check_tensor(b, f"{side}_factors[1]", shape=(n, rmax, d), device=dev)
            for nm, t in ((f"{side}_factors[0]", a), (f"{side}_factors[1]", b)):
                if not t.dtype.is_floating_point:
                    raise ValueError(f"{nm}: expected a floating dtype, got {t.dtype}")
        # One reduction and one read of the result (one GPU synchronisation per plan); the checks that name the
        # problem run only when it is set.
        if (check_values or _checks.debug_checks_enabled()) and bool(self._any_invalid_value(d, s)):
            self._raise_invalid_value(d, s)

    def _any_invalid_value(self, d: int, s: int) -> torch.Tensor:
        """A 0-d bool tensor: whether any check of :meth:`_raise_invalid_value` fails (nothing read to the host)."""
        bad = [(self.token_keep.sum(1) < 1).any()]
        for side in ("k", "v"):
            form = getattr(self, f"{side}_form")
            param = getattr(self, f"{side}_param")
            weight = getattr(self, f"{side}_chan_weight")
            factors = getattr(self, f"{side}_factors")
            chan = form == FORM_CHAN
            low = form == FORM_LOWRANK
            bad.append(((form < FORM_DENSE) | (form > FORM_LOWRANK)).any())
            bad.append((chan & ((param < 1) | (param > d - 1))).any())
            bad.append((chan[:, None] & ~(torch.isfinite(weight) & (weight >= 0))).any())
            if factors is None:
                bad.append(low.any())
            else:
                hi = min(s, d, factors[0].shape[2])
                bad.append((low & ((param < 1) | (param > hi))).any())
        return torch.stack(bad).any()

    def _raise_invalid_value(self, d: int, s: int) -> None:
        """Raise the error naming the first invalid value (reads values: called when :meth:`_any_invalid_value`)."""
        rows = self.token_keep.sum(1)
        if bool((rows < 1).any()):
            raise ValueError(
                "token_keep: expected at least one kept token per segment, "
                f"got {int((rows < 1).sum())} empty segment(s)"
            )
        for side in ("k", "v"):
            form = getattr(self, f"{side}_form")
            param = getattr(self, f"{side}_param")
            weight = getattr(self, f"{side}_chan_weight")
            factors = getattr(self, f"{side}_factors")
            bad = (form < FORM_DENSE) | (form > FORM_LOWRANK)
            if bool(bad.any()):
                raise ValueError(
                    f"{side}_form: expected codes in {sorted(FORM_NAMES)}, got {sorted(set(form[bad].tolist()))}"
                )
            chan = form == FORM_CHAN
            if bool(chan.any()):
                pk = param[chan]
                if bool(((pk < 1) | (pk > d - 1)).any()):
                    raise ValueError(
                        f"{side}_param: expected chan k in [1, {d - 1}], got {sorted(set(pk.tolist()))[:8]}"
                    )
                w = weight[chan]
                if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                    raise ValueError(f"{side}_chan_weight: expected finite weights >= 0, got negative or non-finite")
            low = form == FORM_LOWRANK
            if bool(low.any()):
                if factors is None:
                    raise ValueError(
                        f"{side}_factors: expected (A, B) because some segments use FORM_LOWRANK, got None"
                    )
                hi = min(s, d, factors[0].shape[2])
                pr = param[low]
                if bool(((pr < 1) | (pr > hi)).any()):
                    raise ValueError(
                        f"{side}_param: expected lowrank r in [1, {hi}] (min of S, d, Rmax), "
                        f"got {sorted(set(pr.tolist()))[:8]}"
                    )
        raise AssertionError("SegmentPlan: a value check failed that names no field (the two checks disagree)")

    # --- derived quantities ------------------------------------------------------------------------------------------
    @property
    def num_segments(self) -> int:
        return int(self.token_keep.shape[0])

    @property
    def seg_size(self) -> int:
        return int(self.token_keep.shape[1])

    @property
    def head_dim(self) -> int:
        return int(self.k_chan_weight.shape[1])

    @property
    def device(self) -> torch.device:
        return self.token_keep.device

    def segment_slice(self, start: int, stop: int) -> "SegmentPlan":
        """Segments ``start:stop`` of this plan (views), not checked again: every check of ``__post_init__`` holds
        for any subset of the segments of a checked plan, so slicing reads no values."""
        if not 0 <= start <= stop <= self.num_segments:
            raise ValueError(f"start/stop: expected 0 <= start <= stop <= {self.num_segments}, got {start}, {stop}")

        def cut(t: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
            return None if t is None else (t[0][start:stop], t[1][start:stop])

        part = object.__new__(type(self))  # no __init__, so no __post_init__
        for f in _PLAN_VECTORS:
            setattr(part, f, getattr(self, f)[start:stop])
        part.k_factors, part.v_factors = cut(self.k_factors), cut(self.v_factors)
        # where the part's views start and end in the plan they were first cut from (concat_plans joins parts of one
        # plan back without a copy or a look at each tensor); not a field: copies of the plan (store._map_plan) drop it
        root, at, _ = getattr(self, "_slice_of", (self, 0, 0))
        part._slice_of = (root, at + start, at + stop)
        return part

    def to(self, device: torch.device) -> "SegmentPlan":
        """This plan on ``device`` (itself when already there), not checked again."""
        device = torch.device(device)
        if self.device == device:
            return self

        def move(t: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
            return None if t is None else (t[0].to(device), t[1].to(device))

        moved = object.__new__(type(self))
        for f in _PLAN_VECTORS:
            setattr(moved, f, getattr(self, f).to(device))
        moved.k_factors, moved.v_factors = move(self.k_factors), move(self.v_factors)
        return moved

    def rows(self) -> torch.Tensor:
        """Kept rows per segment: shape ``[N]``, dtype ``torch.int64``."""
        return self.token_keep.sum(1)

    def granules(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Granules of the K and V payloads: two tensors of shape ``[N]``, dtype ``torch.int64``."""
        m = self.rows()
        kg = payload_granules(self.k_form, self.k_param, m, self.head_dim)
        vg = payload_granules(self.v_form, self.v_param, m, self.head_dim)
        return kg, vg  # type: ignore[return-value]

    def bump_offsets(self, base: int = 0) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """Place segment ``i``'s K payload then its V payload consecutively from granule ``base``.

        Returns
        -------
        tuple
            ``(k_offsets, v_offsets, end)``: two int64 tensors of shape ``[N]`` and the first free granule after
            them (a Python int; this synchronizes with the device).
        """
        kg, vg = self.granules()
        both = torch.stack([kg, vg], 1).reshape(-1)
        off = assign_offsets(both, base).view(-1, 2)
        end = int(base + both.sum().item()) if both.numel() else int(base)
        return off[:, 0].contiguous(), off[:, 1].contiguous(), end

    @classmethod
    def uniform(
        cls,
        num_segments: int,
        seg_size: int,
        head_dim: int,
        *,
        device: Union[str, torch.device] = "cpu",
        k_form: int = FORM_DENSE,
        k_param: int = 0,
        v_form: int = FORM_DENSE,
        v_param: int = 0,
    ) -> "SegmentPlan":
        """A plan keeping every token, one form per side, unit channel weights (no low-rank factors).

        ``FORM_LOWRANK`` needs factors, so it is refused here.
        """
        if FORM_LOWRANK in (k_form, v_form):
            raise ValueError(
                "k_form/v_form: expected FORM_DENSE or FORM_CHAN (lowrank needs factors), got FORM_LOWRANK"
            )
        n, dev = num_segments, torch.device(device)
        i32 = dict(dtype=torch.int32, device=dev)
        return cls(
            token_keep=torch.ones(n, seg_size, dtype=torch.bool, device=dev),
            k_form=torch.full((n,), k_form, **i32),
            k_param=torch.full((n,), k_param, **i32),
            v_form=torch.full((n,), v_form, **i32),
            v_param=torch.full((n,), v_param, **i32),
            k_chan_weight=torch.ones(n, head_dim, dtype=torch.float32, device=dev),
            v_chan_weight=torch.ones(n, head_dim, dtype=torch.float32, device=dev),
            flags=torch.zeros(n, **i32),
        )


def plans_granules(plans: Sequence["SegmentPlan"]) -> torch.Tensor:
    """Granules of the K and V payloads of several plans of the same segment count (one per layer of a seal), in one
    pass: ``out[l, i] = (K granules, V granules)`` of ``plans[l]``'s segment ``i``, as :meth:`SegmentPlan.granules`
    gives them plan by plan (which launches about twenty small ops per plan on a GPU).

    Returns
    -------
    torch.Tensor
        shape ``[L, N, 2]``, dtype ``torch.int64``, on the plans' device.
    """
    if not plans:
        raise ValueError("plans: expected at least one plan, got none")
    n, d = plans[0].num_segments, plans[0].head_dim
    if any(p.num_segments != n or p.head_dim != d for p in plans):
        raise ValueError(f"plans: expected plans of {n} segments of head_dim {d}, got "
                         f"{[(p.num_segments, p.head_dim) for p in plans]}")  # fmt: skip
    rows = torch.stack([p.token_keep for p in plans]).sum(2)
    kg = payload_granules(torch.stack([p.k_form for p in plans]), torch.stack([p.k_param for p in plans]), rows, d)
    vg = payload_granules(torch.stack([p.v_form for p in plans]), torch.stack([p.v_param for p in plans]), rows, d)
    return torch.stack([kg, vg], 2)  # type: ignore[list-item]


def _joined_factors(plans: Sequence["SegmentPlan"], side: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """One side's factors of all plans: ``None`` when no plan has them; else ``A``, ``B`` as wide as the widest plan's
    (narrower ones zero-padded, plans without factors zero: never read, their segments are not low-rank)."""
    factors = [getattr(p, side) for p in plans]
    present = [f for f in factors if f is not None]
    if not present:
        return None
    width = max(f[0].shape[2] for f in present)
    dtype, dev = present[0][0].dtype, present[0][0].device
    a_parts, b_parts = [], []
    for p, f in zip(plans, factors):
        n, s, d = p.num_segments, p.seg_size, p.head_dim
        a = torch.zeros(n, s, width, dtype=dtype, device=dev)
        b = torch.zeros(n, width, d, dtype=dtype, device=dev)
        if f is not None:
            a[:, :, : f[0].shape[2]] = f[0]
            b[:, : f[1].shape[1]] = f[1]
        a_parts.append(a)
        b_parts.append(b)
    return torch.cat(a_parts), torch.cat(b_parts)


def concat_plans(plans: Sequence["SegmentPlan"]) -> "SegmentPlan":
    """The segments of ``plans`` in order, as one plan (e.g. one plan per layer -> the layer-major plan that
    :func:`~mosaickv_sglang.kernels.pack.pack_layers_fwd` packs in one launch).

    Plans that are consecutive :meth:`SegmentPlan.segment_slice` s of one plan (the planners' per-layer plans) give
    that plan's slice back, without a copy; others are concatenated (low-rank factors zero-padded to the widest
    plan's). Not checked again: every check of ``__post_init__`` holds for the union of checked plans of one segment
    size and head dim.
    """
    if not plans:
        raise ValueError("plans: expected at least one plan, got none")
    cuts = [getattr(p, "_slice_of", None) if isinstance(p, SegmentPlan) else None for p in plans]
    if all(c is not None and c[0] is cuts[0][0] for c in cuts) and all(a[2] == b[1] for a, b in zip(cuts, cuts[1:])):
        root, start, stop = cuts[0][0], cuts[0][1], cuts[-1][2]  # one plan's slices: checked as that plan was
        return root if (start, stop) == (0, root.num_segments) else root.segment_slice(start, stop)
    for p in plans:
        if not isinstance(p, SegmentPlan):
            raise TypeError(f"plans: expected SegmentPlan items, got {type(p).__name__}")
    s, d, dev = plans[0].seg_size, plans[0].head_dim, plans[0].device
    if any(p.seg_size != s or p.head_dim != d or p.device != dev for p in plans):
        raise ValueError(f"plans: expected one segment size, head dim and device, got "
                         f"{[(p.seg_size, p.head_dim, str(p.device)) for p in plans]}")  # fmt: skip
    if len(plans) == 1:
        return plans[0]
    whole = object.__new__(SegmentPlan)  # no __init__, so no __post_init__
    for f in _PLAN_VECTORS:
        setattr(whole, f, torch.cat([getattr(p, f) for p in plans]))
    whole.k_factors, whole.v_factors = _joined_factors(plans, "k_factors"), _joined_factors(plans, "v_factors")
    return whole
