# SPDX-License-Identifier: Apache-2.0
"""The compressed KV store: per-layer granule arenas, static descriptor/bounds tables, page states.

See the package docstring (:mod:`mosaickv_sglang.pool`) for the design. This module holds
:class:`CompressedKVStore` and the metadata dataclasses it builds for the kernels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from mosaickv_sglang.kernels.format import (
    ARENA_DTYPES,
    DESC_WIDTH,
    GRANULE_BYTES,
    GRANULE_ELEMS,
    K_OFF,
    KERNEL_HEAD_DIMS,
    MAX_SEG_SIZE,
    MIN_SEG_SIZE,
    SegmentPlan,
    V_OFF,
    concat_plans,
    plans_granules,
)
from mosaickv_sglang.kernels.pack import pack_layers_fwd
from mosaickv_sglang.pool.allocator import ArenaFullError, GranuleAllocator
from mosaickv_sglang.pool.checks import check_int
from mosaickv_sglang.pool.compaction import move_runs, packed_offsets
from mosaickv_sglang.pool.device import to_device
from mosaickv_sglang.pool.pages import PAGE_DENSE, PAGE_FREE, PAGE_SEALED, sealable_pages
from mosaickv_sglang.pool.sizing import capacity_tokens

logger = logging.getLogger(__name__)

__all__ = ["CompressedKVStore", "DecodeMetadata", "ExtendMetadata", "ReleaseHandle", "pin_plan"]

_GB = float(1 << 30)


@dataclasses.dataclass(frozen=True)
class DecodeMetadata:
    """Inputs of ``segment_scores_fwd`` / ``select_segments`` / ``sparse_decode_fwd`` for one batch.

    Attributes
    ----------
    seg_ids_padded : torch.Tensor
        shape ``[B, H_kv, MAX_SEGS]``, dtype ``torch.int32``, contiguous; the sealed segments of each request and KV
        head (``page * H_kv + head``, pages in request order), ``-1`` padded.
    seg_counts : torch.Tensor
        shape ``[B]``, dtype ``torch.int32``; sealed pages per request.
    tail_indptr : torch.Tensor
        shape ``[B + 1]``, dtype ``torch.int32``; request ``b``'s dense tail is
        ``tail_indices[tail_indptr[b]:tail_indptr[b + 1]]``.
    tail_indices : torch.Tensor
        shape ``[num_tail_tokens]``, dtype ``torch.int64``; dense pool slots of the unsealed tokens.
    max_segs : int
        ``MAX_SEGS`` (at least 1, so that ``select_segments`` always has a valid budget range).
    """

    seg_ids_padded: torch.Tensor
    seg_counts: torch.Tensor
    tail_indptr: torch.Tensor
    tail_indices: torch.Tensor
    max_segs: int


@dataclasses.dataclass(frozen=True)
class ExtendMetadata:
    """Inputs of ``extend_fwd`` for one batch (besides the new tokens' q/k/v and the scratch).

    Attributes
    ----------
    qo_indptr : torch.Tensor
        shape ``[B + 1]``, dtype ``torch.int32``; new tokens of request ``b`` are ``qo_indptr[b]:qo_indptr[b + 1]``.
    max_extend_len : int
        Longest extend length of the batch.
    seg_ids : torch.Tensor
        shape ``[B, H_kv, MAX_SEGS]``, dtype ``torch.int32``, contiguous; sealed prefix segments, ``-1`` padded.
    seg_counts : torch.Tensor
        shape ``[B]``, dtype ``torch.int32``.
    tail_indptr : torch.Tensor
        shape ``[B + 1]``, dtype ``torch.int32``; dense prefix tail per request.
    tail_indices : torch.Tensor
        shape ``[num_tail_tokens]``, dtype ``torch.int64``; dense pool slots of the unsealed prefix tokens.
    scratch_shape : tuple of int
        ``(B, H_kv, MAX_SEGS, S, d)``, the shape of ``extend_fwd``'s ``k_scratch`` / ``v_scratch``.
    """

    qo_indptr: torch.Tensor
    max_extend_len: int
    seg_ids: torch.Tensor
    seg_counts: torch.Tensor
    tail_indptr: torch.Tensor
    tail_indices: torch.Tensor
    scratch_shape: Tuple[int, int, int, int, int]

    def alloc_scratch(self, dtype: torch.dtype = torch.float16) -> Tuple[torch.Tensor, torch.Tensor]:
        """Fresh ``(k_scratch, v_scratch)`` of :attr:`scratch_shape` on the metadata's device."""
        dev = self.seg_ids.device
        return (
            torch.empty(self.scratch_shape, dtype=dtype, device=dev),
            torch.empty(self.scratch_shape, dtype=dtype, device=dev),
        )


@dataclasses.dataclass(frozen=True, eq=False)
class ReleaseHandle:
    """Old payloads displaced by :meth:`CompressedKVStore.reseal`, freed by :meth:`CompressedKVStore.release`.

    Attributes
    ----------
    handle_id : int
        Identifier within its store.
    runs : dict
        ``layer_id -> (offsets, sizes)``: int64 arrays of shape ``[n]`` (granule runs of the old payloads).
    """

    handle_id: int
    runs: Dict[int, Tuple[np.ndarray, np.ndarray]]

    @property
    def granules(self) -> int:
        """Granules held by the handle (all layers)."""
        return int(sum(int(s.sum()) for _, s in self.runs.values()))


@dataclasses.dataclass(frozen=True, eq=False)
class StagedReseal:
    """One layer's re-seal with everything that does not touch the store's state done
    (:meth:`CompressedKVStore.stage_reseal`): the tokens, slots and plan on the store's device, the payload sizes on
    the host. :meth:`CompressedKVStore.reseal_staged` commits it.

    Attributes
    ----------
    pages : numpy.ndarray
        shape ``[P]``, int64; the store's pages.
    layer_id : int
    keys, values : torch.Tensor
        shape ``[P * S, H_kv, d]``, the store's dtype and device; the pages' tokens, token-major.
    segments : tuple
        What :meth:`CompressedKVStore._segments` returns for ``pages``: host rows, then the token index, heads and
        rows on the device.
    plan : SegmentPlan
        On the store's device.
    sizes : numpy.ndarray
        shape ``[P * H_kv * 2]``, int64; granules of each segment's K and V payloads, interleaved.
    ready : torch.cuda.Event or None
        Recorded on ``stream`` after the uploads (CUDA only).
    stream : torch.cuda.Stream or None
        Where the device tensors were made, when not the committing stream.
    """

    pages: np.ndarray
    layer_id: int
    keys: torch.Tensor
    values: torch.Tensor
    segments: Tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]
    plan: SegmentPlan
    sizes: np.ndarray
    ready: Optional[Any] = None
    stream: Optional[Any] = None


def _map_plan(plan: SegmentPlan, fn: Callable[[torch.Tensor], torch.Tensor]) -> SegmentPlan:
    """``plan`` with ``fn`` applied to each of its tensors (factor pairs included), fields unchecked."""
    moved = object.__new__(SegmentPlan)
    for f in dataclasses.fields(plan):
        v = getattr(plan, f.name)
        if isinstance(v, torch.Tensor):
            v = fn(v)
        elif isinstance(v, tuple):
            v = tuple(fn(t) for t in v)
        setattr(moved, f.name, v)
    return moved


def _plan_tensors(plan: SegmentPlan) -> List[torch.Tensor]:
    """Every tensor of ``plan`` (factor pairs included)."""
    out: List[torch.Tensor] = []
    _map_plan(plan, lambda t: out.append(t) or t)
    return out


def _plan_to(plan: SegmentPlan, device: torch.device) -> SegmentPlan:
    """:meth:`SegmentPlan.to` with host tensors copied by :func:`to_device`."""
    if plan.device == device:
        return plan
    return _map_plan(plan, lambda t: to_device(t, device))


def pin_plan(plan: SegmentPlan) -> SegmentPlan:
    """A host ``plan`` with its tensors in pinned memory, so that :meth:`CompressedKVStore.reseal` copies it to a
    CUDA device without staging it first (needs CUDA; a plan already pinned is returned as is)."""
    return _map_plan(plan, lambda t: t.pin_memory())


def _host_long(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1 or x.dtype.is_floating_point or x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name}: expected a 1-D integer tensor, got dtype {x.dtype} shape {list(x.shape)}")
    return x.detach().to("cpu", torch.int64)


# the byte distance between two layers' descriptor tables in desc_table: the CUDA caching allocator's block alignment
DESC_LAYER_ALIGN_BYTES = 512


class CompressedKVStore:
    """Compressed KV storage of one SGLang KV pool: arenas, descriptor and bounds tables, page states.

    Parameters
    ----------
    num_layers : int
        Layers (one arena, descriptor table and bounds table each).
    num_pages : int
        Logical pages of the pool (SGLang's token capacity / ``page_size``).
    page_size : int
        Tokens per page = segment size ``S``: a power of two in ``[16, 256]``.
    num_kv_heads : int
        KV heads per layer on this rank (``H_kv``).
    head_dim : int
        ``d``, one of the kernel head dims (64 or 128).
    dtype : torch.dtype
        Arena dtype, ``torch.float16`` or ``torch.bfloat16`` (the dense pool's dtype).
    device : torch.device or str
        Where the arenas and tables live.
    arena_granules_per_layer : int
        Granules (of 64 elements, 128 bytes) of each layer's arena.

    Attributes
    ----------
    arenas : list of torch.Tensor
        Per layer: shape ``[arena_granules_per_layer * 64]``, dtype ``dtype``.
    desc : list of torch.Tensor
        Per layer: shape ``[num_pages * H_kv, 8]``, dtype ``torch.int32``; row ``page * H_kv + head``. Rows of
        pages that are not sealed are stale and never listed in metadata.
    desc_table : torch.Tensor
        shape ``[num_layers, R, 8]``, ``R >= num_pages * H_kv`` (rows past ``num_pages * H_kv`` unused): the tables of
        :attr:`desc`, each a view of its first rows, for a read of every layer's rows in one gather. Each layer's table
        starts :data:`DESC_LAYER_ALIGN_BYTES` after the one before, as separate allocations would: the pack kernel
        compiles for the alignment of its layers' offsets, and the warm-up's tables have that one.
    bounds : list of torch.Tensor
        Per layer: shape ``[num_pages * H_kv, 2, d]``, dtype ``dtype``.
    allocators : list of GranuleAllocator
        Per layer, host-side.
    """

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: Union[torch.device, str],
        arena_granules_per_layer: int,
    ) -> None:
        check_int(num_layers, "num_layers", 1)
        check_int(num_pages, "num_pages", 1)
        check_int(page_size, "page_size", 1)
        if page_size & (page_size - 1) or not MIN_SEG_SIZE <= page_size <= MAX_SEG_SIZE:
            raise ValueError(
                f"page_size: expected a power of two in [{MIN_SEG_SIZE}, {MAX_SEG_SIZE}] (it is the segment size), "
                f"got {page_size}; use --page-size equal to --mosaic-segment-size"
            )
        check_int(num_kv_heads, "num_kv_heads", 1)
        if head_dim not in KERNEL_HEAD_DIMS:
            raise ValueError(f"head_dim: expected one of {list(KERNEL_HEAD_DIMS)}, got {head_dim!r}")
        if dtype not in ARENA_DTYPES:
            raise ValueError(f"dtype: expected one of {[str(t) for t in ARENA_DTYPES]}, got {dtype}")
        check_int(arena_granules_per_layer, "arena_granules_per_layer", 0)
        n_seg = num_pages * num_kv_heads
        if n_seg * DESC_WIDTH >= 2**31 or arena_granules_per_layer >= 2**31:
            raise ValueError(
                f"num_pages: expected num_pages * num_kv_heads * 8 and the arena granules below 2**31, got "
                f"{n_seg * DESC_WIDTH} and {arena_granules_per_layer}"
            )
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.arena_granules_per_layer = arena_granules_per_layer
        self._elem = torch.empty((), dtype=dtype).element_size()

        self.arenas: List[torch.Tensor] = [
            torch.zeros(arena_granules_per_layer * GRANULE_ELEMS, dtype=dtype, device=self.device)
            for _ in range(num_layers)
        ]
        align_rows = DESC_LAYER_ALIGN_BYTES // (DESC_WIDTH * 4)
        rows = -(-n_seg // align_rows) * align_rows
        self.desc_table = torch.zeros(num_layers, rows, DESC_WIDTH, dtype=torch.int32, device=self.device)
        self.desc: List[torch.Tensor] = [self.desc_table[li, :n_seg] for li in range(num_layers)]
        self.bounds: List[torch.Tensor] = [
            torch.zeros(n_seg, 2, head_dim, dtype=dtype, device=self.device) for _ in range(num_layers)
        ]
        self.allocators: List[GranuleAllocator] = [
            GranuleAllocator(arena_granules_per_layer) for _ in range(num_layers)
        ]
        # host mirrors: page states and the granule runs of every segment's current payloads
        self._state = np.full((num_layers, num_pages), PAGE_FREE, dtype=np.int8)
        # layers in which each page is sealed (kept with _state): "sealed in every layer" without reading [L, P]
        self._layers_sealed = np.zeros(num_pages, dtype=np.int32)
        self._k_off = np.zeros((num_layers, n_seg), dtype=np.int64)
        self._v_off = np.zeros((num_layers, n_seg), dtype=np.int64)
        self._k_gran = np.zeros((num_layers, n_seg), dtype=np.int64)
        self._v_gran = np.zeros((num_layers, n_seg), dtype=np.int64)
        self._pending: Dict[int, ReleaseHandle] = {}
        self._handle_ids = itertools.count()
        self.compactions = 0  # compact() calls that moved something, and the granules they moved
        self.granules_compacted = 0
        # calls that freed granules (release, free): a granule freed after a step was launched may still be read by it
        self.granule_frees = 0
        # called before compact() moves payloads (the sealer makes a side stream wait there for the step in flight)
        self.before_move: Optional[Callable[[], None]] = None
        logger.info(
            "MosaicKV compressed store: %d layers x %d pages x %d tokens, %d KV heads, head_dim %d, %s on %s; "
            "arena %.3f GB (%d granules/layer), descriptors %.3f GB, bounds %.3f GB",
            num_layers, num_pages, page_size, num_kv_heads, head_dim, dtype, self.device,
            num_layers * arena_granules_per_layer * GRANULE_BYTES / _GB, arena_granules_per_layer,
            num_layers * n_seg * DESC_WIDTH * 4 / _GB, num_layers * n_seg * 2 * head_dim * self._elem / _GB,
        )  # fmt: skip

    # --- page states ---------------------------------------------------------------------------------------------
    def _pages(self, pages: object, name: str = "pages", distinct: bool = True) -> np.ndarray:
        p = _host_long(pages, name).numpy()
        if p.size and (int(p.min()) < 0 or int(p.max()) >= self.num_pages):
            raise ValueError(
                f"{name}: expected page ids in [0, {self.num_pages}), got [{int(p.min())}, {int(p.max())}]"
            )
        if distinct and np.unique(p).size != p.size:
            raise ValueError(f"{name}: expected distinct page ids, got duplicates")
        return p

    def _layers(self, layer_ids: Optional[Sequence[int]]) -> List[int]:
        if layer_ids is None:
            return list(range(self.num_layers))
        ids = [int(i) for i in layer_ids]
        if not ids or any(i < 0 or i >= self.num_layers for i in ids) or len(set(ids)) != len(ids):
            raise ValueError(f"layer_ids: expected distinct ids in [0, {self.num_layers}), got {list(layer_ids)}")
        return ids

    def page_state(self, layer_id: Optional[int] = None) -> torch.Tensor:
        """Page states (:data:`~mosaickv_sglang.pool.pages.PAGE_FREE` / ``PAGE_DENSE`` / ``PAGE_SEALED``).

        Parameters
        ----------
        layer_id : int, optional
            One layer's states; by default the pool view, where a page is ``PAGE_SEALED`` only if sealed in every
            layer (its dense slots may be reused only then).

        Returns
        -------
        torch.Tensor
            shape ``[num_pages]``, dtype ``torch.int8``, on the CPU (a copy).
        """
        if layer_id is not None:
            self._layers([layer_id])
            return torch.from_numpy(self._state[layer_id].copy())
        sealed_all = (self._state == PAGE_SEALED).all(0)
        st = np.where(sealed_all, PAGE_SEALED, np.where(self._state[0] == PAGE_FREE, PAGE_FREE, PAGE_DENSE))
        return torch.from_numpy(st.astype(np.int8))

    def _sealed_at(self, p: np.ndarray, layer_id: Optional[int]) -> np.ndarray:
        """Whether each page of ``p`` (int64, in range) is sealed in ``layer_id`` (or in every layer): only those
        pages' states are read, not the whole ``[L, num_pages]`` table (these run on every step and staleness check)."""
        if layer_id is None:
            return self._layers_sealed[p] == self.num_layers
        self._layers([layer_id])
        return self._state[layer_id, p] == PAGE_SEALED

    def is_sealed(self, pages: torch.Tensor, layer_id: Optional[int] = None) -> torch.Tensor:
        """shape ``[P]``, dtype ``torch.bool`` (CPU): whether each page is sealed (in ``layer_id``, or in all)."""
        p = self._pages(pages, distinct=False)
        return torch.from_numpy(self._sealed_at(p, layer_id))

    def mark_dense(self, pages: torch.Tensor) -> None:
        """Mark freshly allocated pages ``PAGE_DENSE`` (their tokens go to the dense pool).

        Parameters
        ----------
        pages : torch.Tensor
            shape ``[P]``, integer dtype; distinct pages, each ``PAGE_FREE``.
        """
        p = self._pages(pages)
        busy = (self._state[:, p] != PAGE_FREE).any(0)
        if busy.any():
            raise ValueError(
                f"pages: expected free pages, got {int(busy.sum())} already in use (e.g. {int(p[busy][0])})"
            )
        self._state[:, p] = PAGE_DENSE
        self._layers_sealed[p] = 0

    def pages_to_seal(
        self, req_pages: torch.Tensor, seq_len: int, hot_window: int, sink_tokens: int
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:func:`~mosaickv_sglang.pool.pages.sealable_pages` minus the pages already sealed in every layer.

        Returns
        -------
        tuple of torch.Tensor
            ``(pages, always_dense)``: shape ``[P]``, dtypes ``torch.int64`` and ``torch.bool``, on the CPU.
        """
        sp = sealable_pages(req_pages.cpu(), seq_len, hot_window, sink_tokens, page_size=self.page_size)
        todo = ~self.is_sealed(sp.pages)
        return sp.pages[todo], sp.always_dense[todo]

    # --- sealing -------------------------------------------------------------------------------------------------
    def _segments(
        self, p: np.ndarray, slot_of_page_token: torch.Tensor
    ) -> Tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Segment rows (host int64 [N]), token index [N, S], heads [N] int32 and rows [N] int32 on the device."""
        n_p, h, s = p.size, self.num_kv_heads, self.page_size
        if not isinstance(slot_of_page_token, torch.Tensor):
            raise TypeError(f"slot_of_page_token: expected torch.Tensor, got {type(slot_of_page_token).__name__}")
        if tuple(slot_of_page_token.shape) != (n_p, s) or slot_of_page_token.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"slot_of_page_token: expected shape [{n_p}, {s}] and dtype torch.int32 or torch.int64, got "
                f"shape {list(slot_of_page_token.shape)} dtype {slot_of_page_token.dtype}"
            )
        rows = (p[:, None] * h + np.arange(h)[None, :]).reshape(-1)
        tok = to_device(slot_of_page_token, self.device).repeat_interleave(h, dim=0).contiguous()
        heads = torch.arange(h, dtype=torch.int32, device=self.device).repeat(n_p)
        rows_dev = to_device(torch.from_numpy(rows.astype(np.int32)), self.device)
        return rows, tok, heads, rows_dev

    def _check_plans(self, plans: Sequence[SegmentPlan], layers: List[int], n: int) -> None:
        if len(plans) != len(layers):
            raise ValueError(f"plans: expected one SegmentPlan per sealed layer ({len(layers)}), got {len(plans)}")
        for plan in plans:
            if not isinstance(plan, SegmentPlan):
                raise TypeError(f"plans: expected SegmentPlan items, got {type(plan).__name__}")
            if (plan.num_segments, plan.seg_size, plan.head_dim) != (n, self.page_size, self.head_dim):
                raise ValueError(
                    f"plans: expected (num_segments, seg_size, head_dim) = ({n}, {self.page_size}, {self.head_dim}) "
                    f"(P * H_kv segments, page-major), got ({plan.num_segments}, {plan.seg_size}, {plan.head_dim})"
                )

    def _alloc_layers(
        self, layers: List[int], plans: Sequence[SegmentPlan], all_sizes: Optional[np.ndarray] = None
    ) -> List[Tuple[np.ndarray, np.ndarray]]:
        """K/V offsets and granules per layer, all layers or none (rolled back on :class:`ArenaFullError`);
        ``all_sizes`` (``[L, N * 2]``): the plans' granules when already known."""
        done: List[Tuple[int, np.ndarray, np.ndarray]] = []
        # per layer K0, V0, K1, V1, ...: a segment's K and V payloads adjacent; one host copy for all layers
        if all_sizes is None and len(plans):
            all_sizes = plans_granules(plans).reshape(len(plans), -1).cpu().numpy()
        if len(layers):
            all_sizes = np.asarray(all_sizes, dtype=np.int64)
            if (all_sizes < 1).any():
                raise ValueError(f"sizes: expected every payload >= 1 granule, got minimum {int(all_sizes.min())}")
            totals, in_run = all_sizes.sum(1), np.cumsum(all_sizes, 1) - all_sizes  # offsets in a layer's run
        for i, li in enumerate(layers):
            sizes, total = all_sizes[i], int(totals[i])
            alloc = self.allocators[li]
            start = alloc.try_carve(total)  # try_alloc's first choice, for the prefix sums of every layer
            offsets = start + in_run[i] if start is not None else alloc.try_alloc(sizes)
            if offsets is None and alloc.free_granules >= total:
                self.compact(li)  # the room is there, in pieces too small
                offsets = alloc.try_alloc(sizes)
            if offsets is None:
                for lj, off, sz in reversed(done):
                    self.allocators[lj].free(off, sz)
                raise ArenaFullError(total, alloc.free_granules, alloc.largest_free, what=f"arena of layer {li}")
            done.append((li, offsets, sizes))
        return [(off.reshape(-1, 2), sz.reshape(-1, 2)) for _, off, sz in done]

    def compact(self, layer_id: int) -> int:
        """Move every payload of layer ``layer_id``'s arena to the front, in address order, so that its free granules
        are one extent (see :mod:`mosaickv_sglang.pool.compaction`); called by :meth:`seal` and :meth:`reseal` when a
        batch does not fit although the arena has enough free granules.

        Descriptor rows and host runs follow their payloads, and so do the old payloads of pending :meth:`reseal`
        handles. The copies run in stream order, after every step already launched, like the packing of a seal:
        call it between steps, as :meth:`seal` is.

        Returns
        -------
        int
            Granules moved.
        """
        li = self._layers([layer_id])[0]
        h = self.num_kv_heads
        pages = np.flatnonzero(self._state[li] == PAGE_SEALED)
        rows = (pages[:, None] * h + np.arange(h)[None, :]).reshape(-1)
        pending = [hd for hd in self._pending.values() if li in hd.runs]
        offsets = np.concatenate([self._k_off[li, rows], self._v_off[li, rows]] + [hd.runs[li][0] for hd in pending])
        sizes = np.concatenate([self._k_gran[li, rows], self._v_gran[li, rows]] + [hd.runs[li][1] for hd in pending])
        order, new = packed_offsets(offsets, sizes)
        moving = order[new[order] != offsets[order]]  # a suffix in address order: every run after the first gap
        if moving.size == 0:
            return 0
        if self.before_move is not None:
            self.before_move()
        move_runs(self.arenas[li], offsets[moving], new[moving], sizes[moving])
        n = rows.size
        self._k_off[li, rows], self._v_off[li, rows] = new[:n], new[n : 2 * n]
        at = 2 * n
        for hd in pending:
            k = hd.runs[li][0].size
            hd.runs[li] = (new[at : at + k].copy(), hd.runs[li][1])
            at += k
        changed = rows[(new[:n] != offsets[:n]) | (new[n : 2 * n] != offsets[n : 2 * n])]
        if changed.size:
            idx = to_device(torch.from_numpy(changed), self.device)
            offs = np.stack([self._k_off[li, changed], self._v_off[li, changed]], 1).astype(np.int32)
            self.desc[li][idx.unsqueeze(1), torch.tensor([K_OFF, V_OFF], device=self.device)] = to_device(
                torch.from_numpy(offs), self.device
            )
        self.allocators[li].pack()
        moved = int(sizes[moving].sum())
        self.compactions += 1
        self.granules_compacted += moved
        logger.debug("compacted the arena of layer %d: %d runs, %d granules moved", li, moving.size, moved)
        return moved

    def _free_allocs(self, layers: List[int], allocs: List[Tuple[np.ndarray, np.ndarray]]) -> None:
        for li, (off, sz) in zip(layers, allocs):
            self.allocators[li].free(off.reshape(-1), sz.reshape(-1))

    def _check_bufs(self, k_bufs: Sequence[torch.Tensor], v_bufs: Sequence[torch.Tensor]) -> None:
        for name, bufs in (("k_bufs", k_bufs), ("v_bufs", v_bufs)):
            if len(bufs) != self.num_layers:
                raise ValueError(f"{name}: expected one buffer per layer ({self.num_layers}), got {len(bufs)}")

    def _check_states(self, layers: List[int], p: np.ndarray, expected_state: int, expected: str, wrong: str) -> None:
        """Pages ``p`` in state ``expected_state`` in every layer of ``layers``, else ``ValueError``."""
        wrong_state = (self._state[np.ix_(layers, p)] != expected_state).any(0)
        if wrong_state.any():
            raise ValueError(
                f"pages: expected {expected}, got {int(wrong_state.sum())} {wrong} (e.g. page {int(p[wrong_state][0])})"
            )

    def _check_seal_inputs(self, layers, p, expected_state, expected, wrong, k_bufs, v_bufs, slot_of_page_token,
                           plans):  # fmt: skip
        """Shared argument checks of :meth:`seal` and :meth:`reseal`; returns the segments of pages ``p``."""
        self._check_states(layers, p, expected_state, expected, wrong)
        self._check_bufs(k_bufs, v_bufs)
        segments = self._segments(p, slot_of_page_token)
        self._check_plans(plans, layers, segments[0].size)
        return segments

    def seal(
        self,
        pages: torch.Tensor,
        k_bufs: Sequence[torch.Tensor],
        v_bufs: Sequence[torch.Tensor],
        slot_of_page_token: torch.Tensor,
        plans: Sequence[SegmentPlan],
        layer_ids: Optional[Sequence[int]] = None,
        sizes: Optional[np.ndarray] = None,
    ) -> None:
        """Compress dense pages into the arenas and mark them sealed, all layers or none.

        Parameters
        ----------
        pages : torch.Tensor
            shape ``[P]``, integer dtype; distinct pages, ``PAGE_DENSE`` in every layer of ``layer_ids``.
        k_bufs, v_bufs : sequence of torch.Tensor
            Indexed by layer id (length ``num_layers``): shape ``[pool_size, H_kv, d]``, dtype ``dtype``; the dense
            pool buffers. Only the layers of ``layer_ids`` are read.
        slot_of_page_token : torch.Tensor
            shape ``[P, S]``, dtype ``torch.int32`` or ``torch.int64``; dense pool slot of each page's tokens.
        plans : sequence of SegmentPlan
            Aligned with ``layer_ids``: each plans the ``P * H_kv`` segments in page-major, head-minor order
            (segment ``i * H_kv + h`` is page ``pages[i]``, head ``h``), on ``device``.
        layer_ids : sequence of int, optional
            Layers to seal (default: all). A page's dense slots may be reused only once it is sealed in all layers.
        sizes : numpy.ndarray, optional
            shape ``[len(plans), P * H_kv * 2]``: the plans' payload granules (``plans_granules(plans)``), when
            already read from the device; else read here (one synchronisation).

        Raises
        ------
        ArenaFullError
            Some layer's arena cannot hold its payloads; nothing changed.
        ValueError
            Bad arguments (wrong shapes, pages not dense, ...); nothing changed.
        """
        layers = self._layers(layer_ids)
        p = self._pages(pages)
        rows, tok, heads, rows_dev = self._check_seal_inputs(
            layers, p, PAGE_DENSE, "PAGE_DENSE pages in every sealed layer", "free or already sealed",
            k_bufs, v_bufs, slot_of_page_token, plans,
        )  # fmt: skip
        if p.size == 0:
            return
        if sizes is not None and np.shape(sizes) != (len(plans), 2 * rows.size):
            raise ValueError(f"sizes: expected shape [{len(plans)}, {2 * rows.size}], got {list(np.shape(sizes))}")
        allocs = self._alloc_layers(layers, plans, sizes)
        try:
            all_offs = to_device(torch.from_numpy(np.stack([off for off, _ in allocs])), self.device)  # [L, N, 2]
            pack_layers_fwd(
                [k_bufs[li] for li in layers], [v_bufs[li] for li in layers], tok, heads, concat_plans(plans),
                [self.arenas[li] for li in layers], [self.desc[li] for li in layers],
                [self.bounds[li] for li in layers], rows_dev, all_offs,
            )  # fmt: skip
        except BaseException:
            self._free_allocs(layers, allocs)
            raise
        for li, (off, sz) in zip(layers, allocs):
            self._k_off[li, rows], self._v_off[li, rows] = off[:, 0], off[:, 1]
            self._k_gran[li, rows], self._v_gran[li, rows] = sz[:, 0], sz[:, 1]
            self._state[li, p] = PAGE_SEALED
        self._layers_sealed[p] += len(layers)  # dense in each of them before (checked above)
        logger.debug("sealed %d pages in %d layers", p.size, len(layers))

    def reseal(
        self,
        pages: torch.Tensor,
        k_bufs: Sequence[torch.Tensor],
        v_bufs: Sequence[torch.Tensor],
        slot_of_page_token: torch.Tensor,
        plans: Sequence[SegmentPlan],
        layer_ids: Optional[Sequence[int]] = None,
    ) -> ReleaseHandle:
        """Re-pack sealed pages with new plans, double-buffered.

        New payloads are allocated (all layers or none) and packed into staging descriptor and bounds rows; only
        then are the live descriptor rows swapped. The old payloads stay intact until :meth:`release` is called
        with the returned handle, so a step that still reads the old descriptors (e.g. one already launched, or a
        snapshot of them) keeps seeing valid data.

        Parameters
        ----------
        pages, k_bufs, v_bufs, slot_of_page_token, layer_ids
            As in :meth:`seal`; the pages must be ``PAGE_SEALED`` in every layer of ``layer_ids``, and the dense
            sources must hold their original tokens (e.g. a staging buffer from the sidecar, or pages unpacked from
            a lossless first format).
        plans : sequence of SegmentPlan
            As in :meth:`seal`, on any device: plans on the host (the sidecar's) are sized there, so re-packing reads
            nothing back from the device, and copied to it without waiting.

        Returns
        -------
        ReleaseHandle
            The displaced payloads; pass it to :meth:`release` once no in-flight step reads them.

        Raises
        ------
        ArenaFullError
            Not enough room for the new payloads next to the old ones; nothing changed.
        """
        layers = self._layers(layer_ids)
        p = self._pages(pages)
        segments = self._check_seal_inputs(
            layers, p, PAGE_SEALED, "PAGE_SEALED pages in every resealed layer", "that are not",
            k_bufs, v_bufs, slot_of_page_token, plans,
        )  # fmt: skip
        return self._reseal(layers, p, segments, k_bufs, v_bufs, plans)

    def _reseal(
        self,
        layers: List[int],
        p: np.ndarray,
        segments: Tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor],
        k_bufs: Sequence[torch.Tensor],
        v_bufs: Sequence[torch.Tensor],
        plans: Sequence[SegmentPlan],
        all_sizes: Optional[np.ndarray] = None,
    ) -> ReleaseHandle:
        """:meth:`reseal` on checked inputs (``all_sizes``: the plans' granules when known)."""
        rows, tok, heads, rows_dev = segments
        n = rows.size
        handle = ReleaseHandle(next(self._handle_ids), {})
        if n == 0:
            self._pending[handle.handle_id] = handle
            return handle
        allocs = self._alloc_layers(layers, plans, all_sizes)
        staging_ids = torch.arange(n, dtype=torch.int32, device=self.device)
        staged = []
        try:
            for li, plan, (off, _) in zip(layers, plans, allocs):
                desc_new = torch.zeros(n, DESC_WIDTH, dtype=torch.int32, device=self.device)
                bounds_new = torch.zeros(n, 2, self.head_dim, dtype=self.dtype, device=self.device)
                offs = to_device(torch.from_numpy(off), self.device)
                plan = _plan_to(plan, self.device)
                pack_layers_fwd(
                    [k_bufs[li]], [v_bufs[li]], tok, heads, plan, [self.arenas[li]], [desc_new], [bounds_new],
                    staging_ids, offs[None],
                )  # fmt: skip
                staged.append((desc_new, bounds_new))
        except BaseException:
            self._free_allocs(layers, allocs)
            raise
        rows_long = to_device(torch.from_numpy(rows), self.device)
        for li, (off, sz), (desc_new, bounds_new) in zip(layers, allocs, staged):
            self.desc[li].index_copy_(0, rows_long, desc_new)
            self.bounds[li].index_copy_(0, rows_long, bounds_new)
            old_off = np.stack([self._k_off[li, rows], self._v_off[li, rows]], 1).reshape(-1)
            old_sz = np.stack([self._k_gran[li, rows], self._v_gran[li, rows]], 1).reshape(-1)
            handle.runs[li] = (old_off, old_sz)
            self._k_off[li, rows], self._v_off[li, rows] = off[:, 0], off[:, 1]
            self._k_gran[li, rows], self._v_gran[li, rows] = sz[:, 0], sz[:, 1]
        self._pending[handle.handle_id] = handle
        logger.debug("resealed %d pages in %d layers (handle %d)", p.size, len(layers), handle.handle_id)
        return handle

    def stage_reseal(
        self,
        pages: torch.Tensor,
        layer_id: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        plan: SegmentPlan,
        stream: Optional[Any] = None,
    ) -> StagedReseal:
        """The part of re-sealing one layer's pages from their tokens laid out as segments (the sidecar's replies)
        that reads none of the store's mutable state, so that another thread can do it while steps run: argument
        checks, payload sizes (on the host for a host plan), and on ``stream`` (CUDA; default: the current stream)
        the uploads of the tokens and the plan. Commit with :meth:`reseal_staged`.

        Parameters
        ----------
        pages : torch.Tensor
            shape ``[P]``, integer dtype; distinct pages.
        layer_id : int
        keys, values : torch.Tensor
            shape ``[P * H_kv, S, d]``, float, any device (pinned host memory is copied without the host waiting);
            the pages' original tokens, segments page-major, head-minor.
        plan : SegmentPlan
            The ``P * H_kv`` segments' new plan, any device.
        stream : torch.cuda.Stream, optional
            Where the uploads run (a store on CUDA only).
        """
        li = self._layers([layer_id])[0]
        p = self._pages(pages)
        n, s, h, d = p.size, self.page_size, self.num_kv_heads, self.head_dim
        for name, x in (("keys", keys), ("values", values)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name}: expected torch.Tensor, got {type(x).__name__}")
            if tuple(x.shape) != (n * h, s, d):
                raise ValueError(f"{name}: expected shape [{n * h}, {s}, {d}], got {list(x.shape)}")
        self._check_plans([plan], [li], n * h)
        sizes = plans_granules([plan]).reshape(-1).cpu().numpy()  # a host plan: no device read
        on_cuda = self.device.type == "cuda"
        if stream is not None and not on_cuda:
            raise ValueError(f"stream: expected None for a store on {self.device}, got a stream")
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            def tokens_major(x: torch.Tensor) -> torch.Tensor:
                x = to_device(x, self.device).to(self.dtype)
                return x.view(n, h, s, d).permute(0, 2, 1, 3).reshape(n * s, h, d).contiguous()

            k, v = tokens_major(keys), tokens_major(values)
            segments = self._segments(p, torch.arange(n * s, dtype=torch.int64).view(n, s))
            plan = _plan_to(plan, self.device)
            ready = None
            if on_cuda:
                ready = torch.cuda.Event()
                ready.record()
        return StagedReseal(p, li, k, v, segments, plan, sizes, ready, stream)

    def reseal_staged(self, staged: StagedReseal) -> ReleaseHandle:
        """Commit a :meth:`stage_reseal`: as :meth:`reseal` of its pages in its layer (double-buffered; the old
        payloads stay until :meth:`release`), ordered on the current stream after the staging's uploads.

        Raises
        ------
        ArenaFullError
            Not enough room for the new payloads next to the old ones; nothing changed.
        ValueError
            Some page is no longer ``PAGE_SEALED`` in the staged layer; nothing changed.
        """
        if not isinstance(staged, StagedReseal):
            raise TypeError(f"staged: expected StagedReseal, got {type(staged).__name__}")
        li, p = staged.layer_id, staged.pages
        self._check_states([li], p, PAGE_SEALED, "PAGE_SEALED pages in the resealed layer", "that are not")
        if staged.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(staged.ready)
            if staged.stream is not None and staged.stream != current:
                # made on the staging stream, read on this one: not reused before this stream's reads are done
                for t in (staged.keys, staged.values, *staged.segments[1:], *_plan_tensors(staged.plan)):
                    t.record_stream(current)
        bufs_k, bufs_v = [staged.keys] * self.num_layers, [staged.values] * self.num_layers
        return self._reseal([li], p, staged.segments, bufs_k, bufs_v, [staged.plan], staged.sizes[None, :])

    def reseal_segments(
        self, pages: torch.Tensor, layer_id: int, keys: torch.Tensor, values: torch.Tensor, plan: SegmentPlan
    ) -> ReleaseHandle:
        """:meth:`stage_reseal` and :meth:`reseal_staged` in one call, on the current stream."""
        return self.reseal_staged(self.stage_reseal(pages, layer_id, keys, values, plan))

    def release(self, handle: ReleaseHandle) -> None:
        """Free the old payloads of a :meth:`reseal` (exactly once per handle)."""
        if not isinstance(handle, ReleaseHandle):
            raise TypeError(f"handle: expected ReleaseHandle, got {type(handle).__name__}")
        if self._pending.get(handle.handle_id) is not handle:
            raise ValueError(
                f"handle: expected a pending handle of this store, got {handle.handle_id} (released twice?)"
            )
        del self._pending[handle.handle_id]
        for li, (off, sz) in handle.runs.items():
            self.allocators[li].free(off, sz)
        self.granule_frees += 1

    @property
    def pending_releases(self) -> int:
        """Handles returned by :meth:`reseal` and not yet released."""
        return len(self._pending)

    def free(self, pages: torch.Tensor) -> None:
        """Return pages to ``PAGE_FREE``; sealed pages give their granules back in every layer.

        Freeing a dense page only changes its state. Freeing a free page (a double free) raises ``ValueError``
        and changes nothing. Old payloads of pending :meth:`reseal` handles are not affected.

        Parameters
        ----------
        pages : torch.Tensor
            shape ``[P]``, integer dtype; distinct pages.
        """
        p = self._pages(pages)
        free_now = (self._state[:, p] == PAGE_FREE).any(0)
        if free_now.any():
            raise ValueError(f"pages: expected allocated (dense or sealed) pages, got {int(free_now.sum())} free "
                             f"(double free of page {int(p[free_now][0])})")  # fmt: skip
        h = self.num_kv_heads
        for li in range(self.num_layers):
            sp = p[self._state[li, p] == PAGE_SEALED]
            if sp.size:
                rows = (sp[:, None] * h + np.arange(h)[None, :]).reshape(-1)
                off = np.concatenate([self._k_off[li, rows], self._v_off[li, rows]])
                sz = np.concatenate([self._k_gran[li, rows], self._v_gran[li, rows]])
                self.allocators[li].free(off, sz)
                self._k_gran[li, rows] = 0
                self._v_gran[li, rows] = 0
                self.granule_frees += 1
        self._state[:, p] = PAGE_FREE
        self._layers_sealed[p] = 0

    def _force_state(self, layers: Any, pages: np.ndarray, state: int) -> None:
        """Tests and benches only: set page states without payloads (a state built without sealing), keeping the
        per-page count of sealed layers. ``layers``: an index of the layer axis (``slice(None)`` for all)."""
        self._state[layers, pages] = state
        self._layers_sealed[:] = (self._state == PAGE_SEALED).sum(0)

    # --- metadata ------------------------------------------------------------------------------------------------
    def _segment_table(
        self, req_pages: Sequence[torch.Tensor], max_segs: Optional[int], layer_id: Optional[int]
    ) -> Tuple[torch.Tensor, torch.Tensor, int]:
        b = len(req_pages)
        per = [self._pages(rp, name=f"req_pages[{i}]", distinct=False) for i, rp in enumerate(req_pages)]
        flat = np.concatenate(per) if per else np.zeros(0, dtype=np.int64)
        req = np.repeat(np.arange(b), [x.size for x in per]) if per else np.zeros(0, dtype=np.int64)
        return self.segment_table_flat(flat, req, self._sealed_at(flat, layer_id), b, max_segs)

    def sealed_in_all(self, pages: np.ndarray) -> np.ndarray:
        """shape ``[P]``, bool: whether each page is sealed in every layer (``pages``: int64, in range, unchecked).

        :meth:`is_sealed` of the all-layers view without its checks.
        """
        return self._sealed_at(pages, None)

    def segment_table_flat(
        self, flat: np.ndarray, req: np.ndarray, sealed: np.ndarray, b: int, max_segs: Optional[int]
    ) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """``(seg_ids_padded, seg_counts, MAX_SEGS)`` on the device from every request's pages concatenated in
        request order (``flat``, in range), their request (``req``, non-decreasing) and seal state (``sealed``)."""
        h = self.num_kv_heads
        sp, sreq = flat[sealed], req[sealed]
        counts = np.bincount(sreq, minlength=b).astype(np.int64)
        need = int(counts.max()) if b else 0
        if max_segs is None:
            width = max(1, need)
        else:
            width = check_int(max_segs, "max_segs", 1)
            if need > width:
                raise ValueError(f"max_segs: expected >= the most sealed pages of a request ({need}), got {width}")
        page = np.full((b, width), -1, dtype=np.int64)
        if sp.size:
            page[sreq, np.arange(sp.size) - (np.cumsum(counts) - counts)[sreq]] = sp
        heads = np.arange(h, dtype=np.int64)[None, :, None]
        ids = np.where(page[:, None, :] >= 0, page[:, None, :] * h + heads, -1).astype(np.int32)
        return (
            to_device(torch.from_numpy(ids), self.device),
            to_device(torch.from_numpy(counts.astype(np.int32)), self.device),
            width,
        )

    def _tails(self, tails: Sequence[torch.Tensor], b: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if len(tails) != b:
            raise ValueError(f"tails: expected one tensor per request ({b}), got {len(tails)}")
        host = [_host_long(t, f"tails[{i}]") for i, t in enumerate(tails)]
        lens = torch.tensor([0] + [t.numel() for t in host], dtype=torch.int64)
        indptr = torch.cumsum(lens, 0).to(torch.int32)
        indices = torch.cat(host) if host else torch.zeros(0, dtype=torch.int64)
        return to_device(indptr, self.device), to_device(indices, self.device)

    def decode_metadata(
        self,
        req_pages: Sequence[torch.Tensor],
        tails: Sequence[torch.Tensor],
        *,
        max_segs: Optional[int] = None,
        layer_id: Optional[int] = None,
    ) -> DecodeMetadata:
        """Segment table and dense tail of a decode batch.

        Only pages sealed (in every layer, or in ``layer_id``) are listed; the caller's ``tails`` must hold the dense
        slots of every other token of the request. Host work: inputs are copied to the CPU (a synchronisation when
        they live on the GPU) and the results copied to ``device``; the backend's plan step then copies them into
        its static CUDA-graph buffers.

        Parameters
        ----------
        req_pages : sequence of torch.Tensor
            ``B`` tensors of shape ``[n_pages_b]``, integer dtype; each request's logical pages in order.
        tails : sequence of torch.Tensor
            ``B`` tensors of shape ``[n_tail_b]``, integer dtype; dense pool slots of each request's unsealed tokens
            (may be empty).
        max_segs : int, optional
            Fixed ``MAX_SEGS`` (static shapes for CUDA graphs); default: the batch maximum (at least 1).
        layer_id : int, optional
            Use one layer's seal states instead of the all-layers view.

        Returns
        -------
        DecodeMetadata
        """
        ids, counts, width = self._segment_table(req_pages, max_segs, layer_id)
        indptr, indices = self._tails(tails, len(req_pages))
        return DecodeMetadata(ids, counts, indptr, indices, width)

    def extend_metadata(
        self,
        prefix_pages: Sequence[torch.Tensor],
        prefix_tails: Sequence[torch.Tensor],
        extend_lens: Union[Sequence[int], torch.Tensor],
        *,
        max_segs: Optional[int] = None,
        layer_id: Optional[int] = None,
    ) -> ExtendMetadata:
        """Segment table, dense prefix tail and ``qo_indptr`` of an extend (prefill) batch, for ``extend_fwd``.

        Parameters
        ----------
        prefix_pages : sequence of torch.Tensor
            ``B`` tensors of shape ``[n_pages_b]``, integer dtype; the pages of each request's cached prefix.
        prefix_tails : sequence of torch.Tensor
            ``B`` tensors, integer dtype; dense pool slots of the prefix tokens that are not sealed.
        extend_lens : sequence of int or torch.Tensor
            ``B`` new-token counts (``>= 0``); the new tokens' q/k/v are passed to ``extend_fwd`` directly.
        max_segs, layer_id
            As in :meth:`decode_metadata`.

        Returns
        -------
        ExtendMetadata
        """
        b = len(prefix_pages)
        lens = _host_long(torch.as_tensor(extend_lens), "extend_lens") if b else torch.zeros(0, dtype=torch.int64)
        if lens.numel() != b or (lens < 0).any():
            raise ValueError(f"extend_lens: expected {b} counts >= 0, got {lens.tolist()}")
        ids, counts, width = self._segment_table(prefix_pages, max_segs, layer_id)
        indptr, indices = self._tails(prefix_tails, b)
        qo = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lens, 0)]).to(torch.int32)
        qo = to_device(qo, self.device)  # pinned: a pageable copy would wait for the step in flight
        shape = (b, self.num_kv_heads, width, self.page_size, self.head_dim)
        return ExtendMetadata(qo, int(lens.max()) if b else 0, ids, counts, indptr, indices, shape)

    # --- accounting ----------------------------------------------------------------------------------------------
    def layers_sealed(self) -> np.ndarray:
        """shape ``[num_pages]``, int32 (a copy): the layers each page is sealed in."""
        return self._layers_sealed.copy()

    def sealed_segments(self) -> int:
        """Sealed (page, head) segments summed over layers."""
        return int((self._state == PAGE_SEALED).sum()) * self.num_kv_heads

    def bytes_used(self) -> int:
        """Arena bytes allocated (pending reseal releases included) plus descriptor and bounds bytes of sealed
        segments."""
        arena = sum(a.used_granules for a in self.allocators) * GRANULE_BYTES
        return arena + self.sealed_segments() * (DESC_WIDTH * 4 + 2 * self.head_dim * self._elem)

    def dense_bytes_sealed(self) -> int:
        """Bytes the sealed segments' K and V would take uncompressed (``2 * S * d * e`` per segment)."""
        return self.sealed_segments() * 2 * self.page_size * self.head_dim * self._elem

    def compression_ratio(self) -> float:
        """Dense bytes of the sealed tokens / :meth:`bytes_used` (1.0 when nothing is sealed)."""
        used = self.bytes_used()
        return self.dense_bytes_sealed() / used if used else 1.0

    def capacity_tokens(self, budget_bytes: int, ratio: float, dense_tokens: int = 0) -> int:
        """:func:`~mosaickv_sglang.pool.sizing.capacity_tokens` for this store's shape and dtype."""
        return capacity_tokens(
            budget_bytes, ratio, num_layers=self.num_layers, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            page_size=self.page_size, dense_tokens=dense_tokens, dtype=self.dtype,
        )  # fmt: skip

    def snapshot(self) -> Tuple[object, ...]:
        """Hashable summary of the host state (allocators, page states, payload runs, pending handles), for tests
        that assert a failed call changed nothing."""
        return (
            tuple(a.state() for a in self.allocators),
            self._state.tobytes(),
            self._k_off.tobytes(), self._v_off.tobytes(), self._k_gran.tobytes(), self._v_gran.tobytes(),
            tuple(sorted(self._pending)),
        )  # fmt: skip
