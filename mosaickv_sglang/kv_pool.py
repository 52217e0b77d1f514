# SPDX-License-Identifier: Apache-2.0
"""MosaicKV's compressed KV pool in SGLang's ``KVCache`` interface: :class:`MosaicMHATokenToKVPool`.

It replaces SGLang 0.5.17's ``MHATokenToKVPool`` (built by ``KVCacheConfigurator._build_mha_kv_pool``) and wraps the
SGLang-independent :class:`~mosaickv_sglang.pool.CompressedKVStore` (see :mod:`mosaickv_sglang.pool` for the design of
pages, seals and arenas).

Logical and physical slots
--------------------------
SGLang's paged allocator hands out **logical** token slots ``[0, size + S)`` in pages of ``page_size == S`` tokens
(``S`` = MosaicKV's segment size); page ``0`` is the padding page (allocators start at page 1, padded CUDA-graph
writes go to slot 0). ``req_to_token``, the radix cache and ``out_cache_loc`` all hold logical slots, so more tokens
can be *admitted* than the dense buffers hold: a logical page lives either

* in a **physical dense page** of the K/V buffers (``hot_tokens + S`` rows per layer; physical page 0 is padding),
  while it is being written and while it is in a request's hot window or not yet sealed, or
* **sealed** in the store's arenas (compressed segments), after which its physical page is returned.

The map is ``page_table`` (``[num_logical_pages]`` int32 on the device, ``-1`` = no physical page; entry 0 is 0)
with host mirrors and a host free list of physical pages. Who does what:

* :meth:`MosaicMHATokenToKVPool.ensure_physical` (host, **outside** CUDA graphs, before the forward that writes
  the pages: the backend's out-of-graph metadata step or the scheduler) gives every logical page about to be
  written a physical page, and marks it dense in the store.
* :meth:`~MosaicMHATokenToKVPool.set_kv_buffer` only translates (one gather on the device, graph-safe) and writes.
  A write to an unmapped page lands in the padding page (as SGLang's padded writes do) instead of corrupting
  another page; ``MOSAICKV_DEBUG_CHECKS=1`` turns that into an error.
* :meth:`~MosaicMHATokenToKVPool.seal_pages` packs pages through the store, then frees their physical pages.
* :meth:`~MosaicMHATokenToKVPool.free_pages` is called when SGLang's allocator frees logical pages: store free
  (arena granules) plus physical free.

Readers of ``get_key_buffer`` / ``get_value_buffer`` / ``get_kv_buffer`` get the **physical** dense buffers and must
translate logical slots with :meth:`~MosaicMHATokenToKVPool.physical_slots` (or use
:meth:`~MosaicMHATokenToKVPool.decode_metadata` / :meth:`~MosaicMHATokenToKVPool.extend_metadata`, whose tails are
already physical). Sealed tokens are read from the store's arenas, never from the dense buffers.

Not supported (each raises ``NotImplementedError`` naming the feature): KV quantisation recipes (fp4/mxfp8),
post-capture KV sizing (CUDA VMM backing), KV slot moves (speculative decoding), prefix-valid commits (DFlash /
dspark drafts), PD-disaggregation transfer, CPU copies for retraction, SWA / unified-memory write locations.
"""

from __future__ import annotations

import logging
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, get_tensor_size_bytes, unwrap_write_loc

from mosaickv_sglang.config import MosaicConfigError, MosaicKVConfig
from mosaickv_sglang.kernels._checks import debug_checks_enabled
from mosaickv_sglang.kernels.format import ARENA_DTYPES, KERNEL_HEAD_DIMS, SegmentPlan
from mosaickv_sglang.pool import (
    PAGE_FREE,
    PAGE_SEALED,
    ArenaLedger,
    CompressedKVStore,
    DecodeMetadata,
    ExtendMetadata,
    ReleaseHandle,
    SealablePages,
    StagedReseal,
    arena_granules_for,
    to_device,
)
from mosaickv_sglang.pool.rows import (
    as_rows,
    in_range,
    page_starts,
    pages_aligned,
    ragged,
    sealable_counts,
    whole_rows,
)
from mosaickv_sglang.pool.sizing import ARENA_SLACK
from mosaickv_sglang.strategies import RATIO_MARGIN, axes_menu, menu_max_ratio

logger = logging.getLogger(__name__)

__all__ = ["HotPoolFullError", "MosaicMHATokenToKVPool"]

_GB = float(1 << 30)


class HotPoolFullError(RuntimeError):
    """Not enough free physical dense pages for :meth:`MosaicMHATokenToKVPool.ensure_physical`; nothing changed.

    Attributes
    ----------
    requested : int
        Physical pages the call needed.
    free : int
        Physical pages free at the time.
    """

    def __init__(self, requested: int, free: int) -> None:
        self.requested = int(requested)
        self.free = int(free)
        super().__init__(
            f"hot pages: expected {self.requested} free physical dense pages, got {self.free}; seal or free pages "
            "first, or raise hot_tokens"
        )


def _check_int(x: object, name: str, lo: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < lo:
        raise ValueError(f"{name}: expected an integer >= {lo}, got {x!r}")
    return x


def _host_int64(x: object, name: str) -> np.ndarray:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1 or x.dtype.is_floating_point or x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name}: expected a 1-D integer tensor, got dtype {x.dtype} shape {list(x.shape)}")
    return x.detach().to("cpu", torch.int64).numpy()


def _check_reachable_ratio(config: MosaicKVConfig, head_dim: int) -> None:
    """Refuse a ``--mosaic-compression-ratio`` that the fast planner's menu (``--mosaic-axes``) cannot reach for
    segments of ``--mosaic-segment-size`` tokens and this model's ``head_dim``: every seal would fail."""
    s = config.segment_size
    reach = menu_max_ratio(axes_menu(config.axes, s, head_dim, lowrank=False), s, head_dim)
    if config.compression_ratio > reach * RATIO_MARGIN:
        raise MosaicConfigError(
            f"--mosaic-compression-ratio: expected at most {reach * RATIO_MARGIN:.2f} with --mosaic-axes {config.axes} "
            f"(segments of {s} tokens, head_dim {head_dim}), got {config.compression_ratio:g}; lower the ratio"
            + ("" if config.axes == "both" else " or use --mosaic-axes both")
        )


class MosaicMHATokenToKVPool(MHATokenToKVPool):
    """SGLang MHA KV pool whose dense buffers hold only a hot window; the rest of the cache is compressed.

    The positional/keyword arguments up to ``post_capture_active`` are exactly those that SGLang 0.5.17's
    ``KVCacheConfigurator._build_mha_kv_pool`` passes to the in-tree MHA pool class; ``mosaic_config`` and
    ``hot_tokens`` are supplied by the MosaicKV integration (e.g. through ``functools.partial``).

    Parameters
    ----------
    size : int
        Logical token slots SGLang's allocator hands out (``max_total_num_tokens``); logical pages are
        ``1 .. size // page_size`` plus the padding page 0.
    page_size : int
        SGLang's page size; must equal ``mosaic_config.segment_size``.
    dtype : torch.dtype
        KV dtype, ``torch.float16`` or ``torch.bfloat16``.
    head_num, head_dim : int
        KV heads on this rank and head dim (64 or 128).
    layer_num : int
        Layers of this pool (SGLang layer ids ``start_layer .. start_layer + layer_num - 1``).
    device : str
        Where buffers, arenas and tables live.
    enable_memory_saver : bool
        Passed to SGLang's pool (torch memory saver region of the dense buffers).
    v_head_dim : int, optional
        Must equal ``head_dim`` (or be ``None``).
    start_layer, end_layer : int, optional
        As in SGLang (pipeline parallelism).
    enable_alt_stream : bool
        As in SGLang (V writes on an alternate stream during capture).
    enable_kv_cache_copy : bool
        SGLang sets it for speculative decoding; must be ``False`` (KV slot moves are not supported).
    post_capture_active : bool
        Must be ``False`` (post-capture CUDA-VMM backing is not supported; unset
        ``SGLANG_ENABLE_POST_CAPTURE_KV_SIZING``).
    quant_method : optional
        Must be ``None`` (fp4 KV cache is not supported).
    mosaic_config : MosaicKVConfig
        Segment size, hot window, sinks and the target ``compression_ratio`` that sizes the arenas.
    hot_tokens : int
        Physical dense capacity in tokens (a positive multiple of ``page_size``), excluding the padding page.
    arena_granules_per_layer : int, optional
        Arena size per layer; default :func:`~mosaickv_sglang.pool.arena_granules_for` of every logical token at
        ``mosaic_config.compression_ratio``.
    allocation_label : str, optional
        As in SGLang (prefix of the allocation log line).

    Attributes
    ----------
    store : CompressedKVStore
        The compressed storage; its page ids are logical page ids.
    page_table : torch.Tensor
        shape ``[num_logical_pages]``, dtype ``torch.int32``, on ``device``: physical page of each logical page,
        ``-1`` when it has none; ``page_table[0] == 0``. Updated in place (its storage never changes, so CUDA
        graphs may read it) and only by :meth:`ensure_physical`, :meth:`seal_pages`, :meth:`free_pages` and
        :meth:`reset` (host-driven, outside CUDA graphs).
    k_buffer, v_buffer : list of torch.Tensor
        Per layer: shape ``[hot_tokens + page_size, head_num, head_dim]``, dtype ``dtype``; physical slots.

    Examples
    --------
    >>> pool = MosaicMHATokenToKVPool(4096, page_size=64, dtype=torch.float16, head_num=8, head_dim=128,
    ...     layer_num=2, device="cpu", enable_memory_saver=False, mosaic_config=MosaicKVConfig("mosaic"),
    ...     hot_tokens=1024)  # doctest: +SKIP
    >>> pool.ensure_physical(torch.tensor([1, 2]))  # doctest: +SKIP
    >>> pool.set_kv_buffer(layer, loc, k, v)  # loc: logical slots of pages 1, 2  # doctest: +SKIP
    """

    def __init__(
        self,
        size: int,
        page_size: int,
        dtype: torch.dtype,
        head_num: int,
        head_dim: int,
        layer_num: int,
        device: str,
        enable_memory_saver: bool,
        v_head_dim: Optional[int] = None,
        start_layer: Optional[int] = None,
        end_layer: Optional[int] = None,
        enable_alt_stream: bool = True,
        enable_kv_cache_copy: bool = False,
        post_capture_active: bool = False,
        quant_method: Any = None,
        *,
        mosaic_config: MosaicKVConfig,
        hot_tokens: int,
        arena_granules_per_layer: Optional[int] = None,
        allocation_label: Optional[str] = None,
    ) -> None:
        if not isinstance(mosaic_config, MosaicKVConfig):
            raise TypeError(f"mosaic_config: expected MosaicKVConfig, got {type(mosaic_config).__name__}")
        _check_int(page_size, "page_size", 1)
        if page_size != mosaic_config.segment_size:
            raise ValueError(
                f"page_size: expected the MosaicKV segment size {mosaic_config.segment_size}, got {page_size}; "
                "use --page-size equal to --mosaic-segment-size"
            )
        _check_int(size, "size", page_size)
        _check_int(hot_tokens, "hot_tokens", page_size)
        if hot_tokens % page_size:
            raise ValueError(f"hot_tokens: expected a multiple of page_size ({page_size}), got {hot_tokens}")
        if v_head_dim is not None and v_head_dim != head_dim:
            raise ValueError(f"v_head_dim: expected head_dim ({head_dim}) or None, got {v_head_dim}")
        if head_dim not in KERNEL_HEAD_DIMS:
            raise ValueError(f"head_dim: expected one of {list(KERNEL_HEAD_DIMS)}, got {head_dim!r}")
        _check_reachable_ratio(mosaic_config, head_dim)
        if dtype not in ARENA_DTYPES:
            raise ValueError(
                f"dtype: expected one of {[str(t) for t in ARENA_DTYPES]}, got {dtype}; use --kv-cache-dtype auto, "
                "float16 or bfloat16 with --kv-compressor mosaic"
            )
        if quant_method is not None:
            raise NotImplementedError(
                "MosaicMHATokenToKVPool: KV cache quantization (quant_method, e.g. fp4) is not supported; use a "
                "16-bit --kv-cache-dtype with --kv-compressor mosaic"
            )
        if post_capture_active:
            raise NotImplementedError(
                "MosaicMHATokenToKVPool: post-capture KV sizing (CUDA VMM backing) is not supported; unset "
                "SGLANG_ENABLE_POST_CAPTURE_KV_SIZING"
            )
        if enable_kv_cache_copy:
            raise NotImplementedError(
                "MosaicMHATokenToKVPool: KV slot moves (enable_kv_cache_copy, used by speculative decoding) are not "
                "supported; --speculative-algorithm cannot be combined with --kv-compressor mosaic"
            )
        _check_int(layer_num, "layer_num", 1)

        # set before the base constructor: it allocates the dense buffers through _kv_buffer_shapes() and logs
        # through _finalize_allocation_log(), which read these
        self.mosaic_config = mosaic_config
        self.hot_tokens = hot_tokens
        self.num_logical_pages = size // page_size + 1  # + padding page 0
        self.num_physical_pages = hot_tokens // page_size + 1  # + padding page 0
        if arena_granules_per_layer is None:
            arena_granules_per_layer = arena_granules_for(
                (self.num_logical_pages - 1) * page_size, mosaic_config.compression_ratio,
                num_kv_heads=head_num, head_dim=head_dim, dtype=dtype,
            )  # fmt: skip
        self.store = CompressedKVStore(
            layer_num, self.num_logical_pages, page_size, head_num, head_dim, dtype, device, arena_granules_per_layer
        )
        # reservations decide whether a batch fits (identical on every TP rank); the arena's slack over them absorbs
        # the spread of actual payloads around their share when pages of one sealed batch are freed apart
        slack = ARENA_SLACK if mosaic_config.compression_ratio > ARENA_SLACK else 1.0
        self.arena_ledger = ArenaLedger(
            self.num_logical_pages, int(arena_granules_per_layer / slack), head_num, page_size, head_dim
        )
        dev = torch.device(device)
        self.page_table = torch.full((self.num_logical_pages,), -1, dtype=torch.int32, device=dev)
        self.page_table[0] = 0
        # host mirrors: logical -> physical, physical -> logical (-1 = none), store-allocated logical pages, and
        # the free physical pages (a stack: lowest page ids are handed out first)
        self._l2p = np.full(self.num_logical_pages, -1, dtype=np.int64)
        self._p2l = np.full(self.num_physical_pages, -1, dtype=np.int64)
        self._l2p[0] = 0
        self._p2l[0] = 0
        self._live = np.zeros(self.num_logical_pages, dtype=bool)
        self._phys_free: List[int] = list(range(self.num_physical_pages - 1, 0, -1))
        # per logical page: tokens written (the paged allocator fills a page from offset 0) and the write tick
        # (a counter of note_writes calls) of its last write; both reset when the page is freed
        self._fill = np.zeros(self.num_logical_pages, dtype=np.int32)
        self._last_write = np.zeros(self.num_logical_pages, dtype=np.int64)
        self._write_tick = 0
        # per logical page: bumped when it is sealed or freed, so a plan made for its old contents can be recognised
        self.page_epoch = np.zeros(self.num_logical_pages, dtype=np.int64)
        # called with the distinct logical pages (int64 array, padding page excluded) of every free_pages
        self.free_listeners: List[Any] = []
        # bumped by every change of the page maps, fills and lives (keys the admissible_tokens cache)
        self._version = 0
        self._admissible: Tuple[Tuple[int, int], int] = ((-1, -1), 0)

        super().__init__(
            size,
            page_size,
            dtype,
            head_num,
            head_dim,
            layer_num,
            device,
            enable_memory_saver,
            v_head_dim=head_dim,
            start_layer=start_layer,
            end_layer=end_layer,
            enable_alt_stream=enable_alt_stream,
            enable_kv_cache_copy=False,
            kv_cache_layout="nhd",  # explicit: no HND / vectorized_5d layouts (slot rows are what we translate)
            post_capture_active=False,
            allocation_label=allocation_label,
        )

    # --- buffers and sizes (SGLang overrides) ----------------------------------------------------------------------
    def _kv_buffer_shapes(self) -> Tuple[Tuple[int, int, int], Tuple[int, int, int]]:
        """Dense buffers hold ``hot_tokens`` physical slots plus the padding page, not ``size``."""
        rows = self.hot_tokens + self.page_size
        return (rows, self.head_num, self.head_dim), (rows, self.head_num, self.v_head_dim)

    def store_size_bytes(self) -> int:
        """Bytes of the store's device tensors (arenas, descriptor and bounds tables of every layer)."""
        st = self.store
        return int(sum(get_tensor_size_bytes(t) for t in (st.arenas, st.desc, st.bounds)))

    def get_kv_size_bytes(self) -> Tuple[int, int]:
        """``(k_bytes, v_bytes)``: the dense K/V buffers plus the compressed store.

        The arenas interleave K and V payloads, so the store's bytes are split evenly between the two entries (the
        sum is exact; the split is nominal).
        """
        k, v = super().get_kv_size_bytes()
        extra = self.store_size_bytes()
        return int(k) + (extra + 1) // 2, int(v) + extra // 2

    def _finalize_allocation_log(self, num_tokens: int) -> None:
        name = "Mosaic KV Cache" if self.allocation_label is None else f"{self.allocation_label} Mosaic KV Cache"
        k, v = self.get_kv_size_bytes()
        store = self.store_size_bytes()
        logger.info(
            "%s is allocated. dtype: %s, #tokens: %d, #dense tokens: %d, K size: %.2f GB, V size: %.2f GB "
            "(dense %.2f GB + compressed store %.2f GB), target compression ratio: %.2f",
            name, self.dtype, num_tokens, self.hot_tokens, k / _GB, v / _GB, (k + v - store) / _GB, store / _GB,
            self.mosaic_config.compression_ratio,
        )  # fmt: skip
        self.mem_usage = (k + v) / _GB

    # --- logical -> physical -----------------------------------------------------------------------------------------
    @property
    def num_free_physical_pages(self) -> int:
        """Physical dense pages not owned by any logical page (the padding page excluded)."""
        return len(self._phys_free)

    def physical_pages(self, pages: torch.Tensor) -> torch.Tensor:
        """Host view of the page table.

        Parameters
        ----------
        pages : torch.Tensor
            shape ``[P]``, integer dtype; logical pages.

        Returns
        -------
        torch.Tensor
            shape ``[P]``, dtype ``torch.int64``, on the CPU; physical page or ``-1``.
        """
        return torch.from_numpy(self._l2p[self._logical_pages(pages, distinct=False)].copy())

    def physical_slots(self, logical_slots: torch.Tensor) -> torch.Tensor:
        """Translate logical token slots to physical dense slots (device gather; CUDA-graph safe, no sync).

        Parameters
        ----------
        logical_slots : torch.Tensor
            Any shape, integer dtype, on ``device``: logical slots in ``[0, num_logical_pages * page_size)``.

        Returns
        -------
        torch.Tensor
            Same shape, dtype ``torch.int64``: ``page_table[slot // S] * S + slot % S``. Slots of pages without a
            physical page (never written, sealed, freed) map into the padding page 0; with
            ``MOSAICKV_DEBUG_CHECKS=1`` they raise ``ValueError`` instead.
        """
        s = self.page_size
        loc = logical_slots.long()
        phys_page = self.page_table[torch.div(loc, s, rounding_mode="floor")]
        if debug_checks_enabled():
            if loc.numel() and (int(loc.min()) < 0 or int(loc.max()) >= self.num_logical_pages * s):
                raise ValueError(
                    f"logical_slots: expected slots in [0, {self.num_logical_pages * s}), got "
                    f"[{int(loc.min())}, {int(loc.max())}]"
                )
            if bool((phys_page < 0).any()):
                bad = loc[phys_page < 0][0]
                raise ValueError(
                    f"logical_slots: expected slots of pages with a physical page (ensure_physical), got slot "
                    f"{int(bad)} of page {int(bad) // s}"
                )
        return phys_page.clamp_min(0).long() * s + loc % s

    def _logical_pages(self, pages: object, name: str = "pages", distinct: bool = True) -> np.ndarray:
        p = _host_int64(pages, name)
        if p.size and (int(p.min()) < 0 or int(p.max()) >= self.num_logical_pages):
            raise ValueError(
                f"{name}: expected logical pages in [0, {self.num_logical_pages}), got [{int(p.min())}, {int(p.max())}]"
            )
        if distinct and np.unique(p).size != p.size:
            raise ValueError(f"{name}: expected distinct logical pages, got duplicates")
        return p

    def _assign(self, p: np.ndarray, phys: np.ndarray) -> None:
        self._version += 1
        self._l2p[p] = phys
        self._p2l[phys] = p
        dev = self.page_table.device
        self.page_table[to_device(torch.from_numpy(p), dev)] = to_device(torch.from_numpy(phys.astype(np.int32)), dev)

    def _release(self, p: np.ndarray) -> None:
        """Return the physical pages of the (mapped, non-padding) logical pages ``p``."""
        if p.size == 0:
            return
        self._version += 1
        phys = self._l2p[p].copy()
        self._l2p[p] = -1
        self._p2l[phys] = -1
        self._phys_free.extend(int(x) for x in np.sort(phys)[::-1])
        dev = self.page_table.device
        # index_fill_ takes -1 as a kernel argument; `page_table[idx] = -1` copies it to the device and waits for the
        # stream (torch 2.11): for a seal, the step in flight
        self.page_table.index_fill_(0, to_device(torch.from_numpy(p), dev), -1)

    def ensure_physical(self, pages: torch.Tensor) -> torch.Tensor:
        """Give every logical page about to be written a physical dense page (host; call outside CUDA graphs).

        Pages that already have one are left alone; new ones are marked ``PAGE_DENSE`` in the store. All or nothing.

        Parameters
        ----------
        pages : torch.Tensor
            shape ``[P]``, integer dtype, any device; logical pages (duplicates and the padding page 0 allowed, e.g.
            ``torch.unique(out_cache_loc // page_size)``).

        Returns
        -------
        torch.Tensor
            shape ``[P]``, dtype ``torch.int64``, on the CPU: the physical page of each input page.

        Raises
        ------
        HotPoolFullError
            Not enough free physical pages; nothing changed.
        ValueError
            A page is sealed (its tokens are read-only) or out of range.
        """
        p_all = self._logical_pages(pages, distinct=False)
        p = np.unique(p_all)
        need = p[self._l2p[p] < 0]
        if need.size:
            sealed = need[self._live[need]]
            if sealed.size:
                raise ValueError(
                    f"pages: expected pages that are free or dense, got {sealed.size} sealed (e.g. page "
                    f"{int(sealed[0])}); sealed pages are read-only"
                )
            if need.size > len(self._phys_free):
                raise HotPoolFullError(need.size, len(self._phys_free))
            phys = np.array(self._phys_free[-need.size :][::-1], dtype=np.int64)
            self.store.mark_dense(torch.from_numpy(need))
            del self._phys_free[-need.size :]
            self._live[need] = True
            self._assign(need, phys)
        return torch.from_numpy(self._l2p[p_all].copy())

    def note_writes(self, logical_slots: torch.Tensor) -> None:
        """Record that the forward about to run writes ``logical_slots`` (host; after :meth:`ensure_physical`).

        Keeps, per logical page, how many tokens it holds (a page is *complete* at ``page_size``) and when it was
        last written, which :meth:`complete_dense_pages` uses to pick pages to seal under hot-pool pressure.

        Parameters
        ----------
        logical_slots : torch.Tensor
            shape ``[N]``, integer dtype, any device (``out_cache_loc``).
        """
        slots = _host_int64(logical_slots, "logical_slots")
        if slots.size == 0:
            return
        s = self.page_size
        pages = slots // s
        self._write_tick += 1
        self._version += 1
        np.maximum.at(self._fill, pages, (slots % s + 1).astype(np.int32))
        self._last_write[pages] = self._write_tick
        self._fill[0] = 0

    def complete_dense_pages(self, exclude: Optional[np.ndarray] = None) -> np.ndarray:
        """Logical pages that could be sealed now, least recently written first: complete (every token written),
        holding a physical dense page, not the padding page, not in ``exclude``.

        Returns
        -------
        numpy.ndarray
            shape ``[P]``, dtype ``int64``.
        """
        cand = np.flatnonzero((self._l2p >= 0) & (self._fill == self.page_size) & self._live)
        cand = cand[cand != 0]
        if exclude is not None and cand.size:
            cand = cand[~np.isin(cand, exclude)]
        return cand[np.argsort(self._last_write[cand], kind="stable")]

    def admissible_tokens(self) -> int:
        """Logical tokens the pool can still hold: the free hot pages, plus the pages the arena ledger can still take
        at the target ratio (every page beyond the hot pool ends up sealed; sinks too, compressed, when room is
        short). Full pages are sealed as new ones need hot pages, so the hot pool never blocks a forward that this
        admits: it holds at most one partial page per running request besides complete pages.

        SGLang's allocator reports this when it is below its own free count (see ``patches/kv_cache.py``), so that
        the scheduler evicts cached prefixes or retracts requests when the arenas, not the logical slots, run out.
        """
        key = (self._version, self.arena_ledger.reserved)
        if self._admissible[0] != key:
            ratio = float(self.mosaic_config.compression_ratio)
            per_page = int(self.arena_ledger.reservation(np.zeros(1, dtype=bool), ratio)[0]) + 1
            sealable = max(0, self.arena_ledger.room) // per_page
            self._admissible = (key, (self.num_free_physical_pages + sealable) * self.page_size)
        return self._admissible[1]

    # --- SGLang KVCache interface ------------------------------------------------------------------------------------
    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        """Dense K buffer of SGLang layer ``layer_id``: shape ``[hot_tokens + S, H_kv, d]``, indexed by **physical**
        slots (translate logical slots with :meth:`physical_slots`)."""
        return super().get_key_buffer(layer_id)

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        """Dense V buffer of SGLang layer ``layer_id``, indexed by physical slots (see :meth:`get_key_buffer`)."""
        return super().get_value_buffer(layer_id)

    def get_kv_buffer(self, layer_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(K, V)`` dense buffers, indexed by physical slots (see :meth:`get_key_buffer`)."""
        return self.get_key_buffer(layer_id), self.get_value_buffer(layer_id)

    def set_kv_buffer(
        self,
        layer: Any,
        loc_info: Any,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        k_scale: Optional[float] = None,
        v_scale: Optional[float] = None,
        layer_id_override: Optional[int] = None,
        dcp_kv_mask: Optional[torch.Tensor] = None,
    ) -> None:
        """Write K/V of new tokens at **logical** slots (translated with :meth:`physical_slots`).

        Parameters
        ----------
        layer : RadixAttention
            The layer (``layer.layer_id``), as in SGLang.
        loc_info : torch.Tensor or KVWriteLoc
            Logical slots, shape ``[N]``, dtype ``torch.int64`` (``out_cache_loc``); a ``KVWriteLoc`` is unwrapped
            like SGLang's pool does. Its ``swa_loc`` / ``full_loc`` must be ``None``.
        cache_k, cache_v : torch.Tensor
            shape ``[N, H_kv, d]``; cast to the pool dtype as in SGLang (``k_scale`` / ``v_scale`` divide first).
        k_scale, v_scale, layer_id_override, dcp_kv_mask
            As in SGLang's ``MHATokenToKVPool.set_kv_buffer``.
        """
        loc, swa_loc, full_loc = unwrap_write_loc(loc_info)
        if swa_loc is not None or full_loc is not None:
            raise NotImplementedError(
                "MosaicMHATokenToKVPool.set_kv_buffer: SWA / unified-memory write locations (KVWriteLoc.swa_loc, "
                "full_loc) are not supported"
            )
        super().set_kv_buffer(
            layer, self.physical_slots(loc), cache_k, cache_v, k_scale, v_scale, layer_id_override, dcp_kv_mask
        )

    def set_kv_buffer_physical(self, layer: Any, slots: torch.Tensor, cache_k: torch.Tensor,
                               cache_v: torch.Tensor) -> None:  # fmt: skip
        """SGLang's ``set_kv_buffer`` at **physical** slots (``physical_slots`` of the logical ones, taken since the
        last change of the page table: see :attr:`version`)."""
        super().set_kv_buffer(layer, slots, cache_k, cache_v)

    @property
    def version(self) -> int:
        """Bumped by every change of the page maps, fills and lives: physical slots taken at one version stay valid
        while it lasts."""
        return self._version

    # --- sealing and freeing -----------------------------------------------------------------------------------------
    def _local_layers(self, layer_ids: Optional[Sequence[int]]) -> Optional[List[int]]:
        if layer_ids is None:
            return None
        local = [int(i) - self.start_layer for i in layer_ids]
        if any(i < 0 or i >= self.layer_num for i in local):
            raise ValueError(
                f"layer_ids: expected SGLang layer ids in [{self.start_layer}, {self.start_layer + self.layer_num}), "
                f"got {list(layer_ids)}"
            )
        return local

    def seal_pages(
        self,
        pages: torch.Tensor,
        plans_per_layer: Sequence[SegmentPlan],
        layer_ids: Optional[Sequence[int]] = None,
        sizes: Optional[np.ndarray] = None,
    ) -> None:
        """Compress dense logical pages into the arenas, then free the physical pages of those now sealed in every
        layer. All or nothing (see :meth:`CompressedKVStore.seal`, which also takes the plans' payload ``sizes`` when
        they were read from the device before).

        Parameters
        ----------
        pages : torch.Tensor
            shape ``[P]``, integer dtype; distinct logical pages, complete, with a physical page, ``PAGE_DENSE`` in
            every layer of ``layer_ids``.
        plans_per_layer : sequence of SegmentPlan
            Aligned with ``layer_ids`` (default: every layer of the pool, in order): each plans the ``P * H_kv``
            segments of ``pages`` in page-major, head-minor order, on ``device``.
        layer_ids : sequence of int, optional
            SGLang layer ids to seal (default: all).

        Raises
        ------
        ArenaFullError
            Some arena cannot hold the payloads; nothing changed.
        """
        p = self._logical_pages(pages)
        if p.size and ((p == 0).any() or (self._l2p[p] < 0).any()):
            bad = p[(p == 0) | (self._l2p[p] < 0)]
            raise ValueError(
                f"pages: expected written (ensure_physical) non-padding pages, got {bad.size} without a physical "
                f"page (e.g. page {int(bad[0])})"
            )
        local = self._local_layers(layer_ids)
        s = self.page_size
        slots = torch.from_numpy(self._l2p[p] * s)[:, None] + torch.arange(s, dtype=torch.int64)[None, :]
        pages_t = torch.from_numpy(p.copy())
        self.store.seal(pages_t, self.k_buffer, self.v_buffer, slots, plans_per_layer, layer_ids=local, sizes=sizes)
        self.page_epoch[p] += 1
        done = p if local is None else p[self.store.is_sealed(pages_t).numpy()]
        self._release(done)

    def reseal_pages(
        self, pages: np.ndarray, layer: int, keys: torch.Tensor, values: torch.Tensor, plan: SegmentPlan
    ) -> ReleaseHandle:
        """Re-pack pages sealed in local layer ``layer`` with a new plan, from their original dense K/V.

        Double-buffered (:meth:`CompressedKVStore.reseal`): the new payloads are written next to the old ones and
        the descriptors swapped; the old payloads stay until :meth:`release_resealed` is called with the handle.

        Parameters
        ----------
        pages : numpy.ndarray
            shape ``[P]``, int64; distinct logical pages sealed in layer ``layer``.
        layer : int
            Local layer index (``0 <= layer < layer_num``).
        keys, values : torch.Tensor
            shape ``[P * H_kv, S, d]``, float, any device; the pages' original tokens, segments page-major,
            head-minor (the order the sealer plans them in).
        plan : SegmentPlan
            The ``P * H_kv`` segments' new plan, any device.

        Raises
        ------
        ArenaFullError
            The arena cannot hold the new payloads next to the old ones; nothing changed.
        """
        return self.reseal_staged(self.stage_reseal(pages, layer, keys, values, plan))

    def stage_reseal(
        self, pages: np.ndarray, layer: int, keys: torch.Tensor, values: torch.Tensor, plan: SegmentPlan,
        stream: Optional[Any] = None,
    ) -> StagedReseal:  # fmt: skip
        """The first half of :meth:`reseal_pages`, which any thread may run while steps do
        (:meth:`CompressedKVStore.stage_reseal`: checks, payload sizes, uploads on ``stream``); the scheduler thread
        commits it with :meth:`reseal_staged`."""
        p = self._logical_pages(torch.as_tensor(np.asarray(pages, dtype=np.int64)))
        if not 0 <= int(layer) < self.layer_num:
            raise ValueError(f"layer: expected a local layer in [0, {self.layer_num}), got {layer!r}")
        return self.store.stage_reseal(torch.from_numpy(p.copy()), int(layer), keys, values, plan, stream)

    def reseal_staged(self, staged: StagedReseal) -> ReleaseHandle:
        """The second half of :meth:`reseal_pages`: :meth:`CompressedKVStore.reseal_staged` (allocate, pack, swap, on
        the current stream after the staging's uploads); between steps, as :meth:`reseal_pages`."""
        return self.store.reseal_staged(staged)

    def release_resealed(self, handle: ReleaseHandle) -> None:
        """Free the payloads a :meth:`reseal_pages` displaced (once no step can read them any more)."""
        self.store.release(handle)

    def sealed_in_layer(self, pages: np.ndarray, layer: int) -> np.ndarray:
        """shape ``[P]``, bool: whether each logical page is sealed in local layer ``layer``."""
        return self.store.is_sealed(torch.from_numpy(np.asarray(pages, dtype=np.int64)), layer_id=int(layer)).numpy()

    def free_pages(self, pages: torch.Tensor) -> None:
        """Release logical pages freed by SGLang's allocator: arena granules and physical dense pages.

        Pages never written (allocated but unused, e.g. an aborted request) and the padding page are skipped, so the
        call accepts whatever the allocator frees.

        Parameters
        ----------
        pages : torch.Tensor
            shape ``[P]``, integer dtype, any device; logical pages (duplicates allowed).
        """
        p = np.unique(self._logical_pages(pages, distinct=False))
        p = p[p != 0]
        live = p[self._live[p]]
        if live.size:
            self.store.free(torch.from_numpy(live))
            self._live[live] = False
        self.arena_ledger.release(p)
        self.page_epoch[p] += 1
        for listener in self.free_listeners:
            listener(p)
        self._version += 1
        self._release(p[self._l2p[p] >= 0])
        self._fill[p] = 0
        self._last_write[p] = 0

    def reset(self) -> None:
        """Free every page (SGLang's allocator ``clear()``); pending reseal handles are not affected."""
        self.free_pages(torch.from_numpy(np.flatnonzero(self._live | (self._l2p >= 0))))

    # --- metadata ------------------------------------------------------------------------------------------------
    def _pages_and_tails(
        self, req_slots: Sequence[torch.Tensor], local_layer: Optional[int], name: str
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        s = self.page_size
        pages_out, tails_out = [], []
        for i, t in enumerate(req_slots):
            slots = _host_int64(t, f"{name}[{i}]")
            n = slots.size
            if n and (int(slots.min()) < 0 or int(slots.max()) >= self.num_logical_pages * s):
                raise ValueError(
                    f"{name}[{i}]: expected logical slots in [0, {self.num_logical_pages * s}), got "
                    f"[{int(slots.min())}, {int(slots.max())}]"
                )
            pages = slots[::s] // s
            if n and not (
                np.array_equal(slots // s, np.repeat(pages, s)[:n]) and np.array_equal(slots % s, np.arange(n) % s)
            ):
                raise ValueError(
                    f"{name}[{i}]: expected page-aligned logical slots (token j at offset j % {s} of its page), got "
                    "a misaligned slot sequence"
                )
            if local_layer is None:
                sealed = self._live[pages] & (self._l2p[pages] < 0)
            else:
                sealed = self.store.is_sealed(torch.from_numpy(pages), local_layer).numpy()
            tail = slots[~np.repeat(sealed, s)[:n]]
            phys_page = self._l2p[tail // s]
            if (phys_page < 0).any():
                bad = tail[phys_page < 0][0]
                raise ValueError(
                    f"{name}[{i}]: expected unsealed tokens on pages with a physical page, got slot {int(bad)} of "
                    f"page {int(bad) // s} (never written?)"
                )
            pages_out.append(torch.from_numpy(pages))
            tails_out.append(torch.from_numpy(phys_page * s + tail % s))
        return pages_out, tails_out

    def _local_layer(self, layer_id: Optional[int]) -> Optional[int]:
        if layer_id is None:
            return None
        return self._local_layers([layer_id])[0]  # type: ignore[index]

    def decode_metadata(
        self, req_slots: Sequence[torch.Tensor], *, max_segs: Optional[int] = None, layer_id: Optional[int] = None
    ) -> DecodeMetadata:
        """:meth:`CompressedKVStore.decode_metadata` from each request's logical slots (host work, out of graph).

        Parameters
        ----------
        req_slots : sequence of torch.Tensor
            ``B`` tensors of shape ``[seq_len_b]``, integer dtype: the logical slots of each request's tokens in order
            (``req_to_token[req_pool_idx, :seq_len]``), page-aligned as SGLang's paged allocator lays them out.
        max_segs : int, optional
            Fixed ``MAX_SEGS`` (static shapes for CUDA graphs).
        layer_id : int, optional
            SGLang layer id whose seal states to use (default: the all-layers view).

        Returns
        -------
        DecodeMetadata
            Sealed segments (``logical page * H_kv + head``) and the dense tail as **physical** slots, on ``device``.
        """
        local = self._local_layer(layer_id)
        pages, tails = self._pages_and_tails(req_slots, local, "req_slots")
        return self.store.decode_metadata(pages, tails, max_segs=max_segs, layer_id=local)

    def extend_metadata(
        self,
        prefix_slots: Sequence[torch.Tensor],
        extend_lens: Union[Sequence[int], torch.Tensor],
        *,
        max_segs: Optional[int] = None,
        layer_id: Optional[int] = None,
    ) -> ExtendMetadata:
        """:meth:`CompressedKVStore.extend_metadata` from each request's cached-prefix logical slots.

        Parameters
        ----------
        prefix_slots : sequence of torch.Tensor
            ``B`` tensors of shape ``[prefix_len_b]``, integer dtype: logical slots of each request's cached prefix.
        extend_lens : sequence of int or torch.Tensor
            ``B`` new-token counts.
        max_segs, layer_id
            As in :meth:`decode_metadata`.

        Returns
        -------
        ExtendMetadata
            With the prefix tail as physical slots.
        """
        local = self._local_layer(layer_id)
        pages, tails = self._pages_and_tails(prefix_slots, local, "prefix_slots")
        return self.store.extend_metadata(pages, tails, extend_lens, max_segs=max_segs, layer_id=local)

    def _rows(self, rows: object, lens: object, step: int = 1) -> Tuple[np.ndarray, np.ndarray]:
        if step not in (1, self.page_size):
            raise ValueError(f"step: expected 1 or page_size {self.page_size}, got {step}")
        r, n = as_rows(rows, lens, step=step)
        if r.dtype != np.int32 or self.num_logical_pages * self.page_size + self.page_size >= 2**31:
            r = r.astype(np.int64, copy=False)
        return r, n

    def decode_metadata_rows(
        self, rows: np.ndarray, lens: np.ndarray, step: int = 1
    ) -> Tuple[DecodeMetadata, np.ndarray]:
        """:meth:`decode_metadata` of ``[rows[b, :lens[b]] for b in range(B)]`` (all-layers view), in one pass.

        Parameters
        ----------
        rows : numpy.ndarray
            shape ``[B, W]``, integer; row ``b`` starts with request ``b``'s logical slots (``req_to_token`` rows),
            or with ``step = page_size`` the first slot of each of its pages (``req_to_token[b, ::page_size]``; the
            slots within a page are taken to follow it, see :mod:`mosaickv_sglang.pool.rows`). Fastest with ``W``
            a multiple of ``page_size / step`` (otherwise the rows are padded, a copy).
        lens : numpy.ndarray
            shape ``[B]``, integer in ``[0, W * step]``.
        step : int
            Slots per column: 1 or ``page_size``.

        Returns
        -------
        tuple
            ``(DecodeMetadata, tail_lens)``: the metadata, equal to :meth:`decode_metadata`'s (same errors), and the
            dense tail length of each request on the host (``[B]`` int64).
        """
        r, n = self._rows(rows, lens, step)
        s, b = self.page_size, n.size
        npg = -(-n // s)
        width = int(npg.max()) if b else 0
        if r.shape[1] < width * s // step:
            r = np.pad(r, ((0, 0), (0, width * s // step - r.shape[1])))
        pages, valid = page_starts(r, npg, s, step)
        flat = pages[valid]
        if not (in_range(flat, self.num_logical_pages) and pages_aligned(r, n, pages, s, step)):
            return self._decode_metadata_reference(whole_rows(r, s, step), n)
        safe = np.where(valid, pages, 0)
        tail_page = valid & ~(self._live[safe] & (self._l2p[safe] < 0))
        phys = self._l2p[pages[tail_page]]
        if (phys < 0).any():
            return self._decode_metadata_reference(whole_rows(r, s, step), n)
        per_page = np.minimum(s, n[:, None] - np.arange(width)[None, :] * s)
        tail_lens = np.where(tail_page, per_page, 0).sum(1).astype(np.int64)
        offs = np.arange(s)
        tail = (phys[:, None] * s + offs[None, :])[offs[None, :] < per_page[tail_page][:, None]]
        req = np.repeat(np.arange(b), npg)
        st = self.store
        ids, counts, w = st.segment_table_flat(flat, req, st.sealed_in_all(flat), b, None)
        indptr = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(tail_lens)]).astype(np.int32)
        dev = st.device
        indptr_dev, tail_dev = to_device(torch.from_numpy(indptr), dev), to_device(torch.from_numpy(tail), dev)
        meta = DecodeMetadata(ids, counts, indptr_dev, tail_dev, w)
        return meta, tail_lens

    def _decode_metadata_reference(self, r: np.ndarray, n: np.ndarray) -> Tuple[DecodeMetadata, np.ndarray]:
        """The per-request path, for batches the fast one does not vouch for (it raises what they deserve)."""
        meta = self.decode_metadata([torch.from_numpy(r[i, : n[i]]) for i in range(n.size)])
        return meta, np.diff(meta.tail_indptr.cpu().numpy().astype(np.int64))

    def pages_to_seal_rows(
        self, rows: np.ndarray, lens: np.ndarray, step: int = 1
    ) -> Tuple[np.ndarray, np.ndarray]:
        """:meth:`pages_to_seal` of every request ``rows[b, :lens[b]]`` with at least ``page_size`` tokens,
        concatenated in request order: ``(pages, always_dense)``, int64 and bool numpy arrays (same errors).
        ``step``: as in :meth:`decode_metadata_rows`."""
        r, n = self._rows(rows, lens, step)
        s, cfg = self.page_size, self.mosaic_config
        n_seal, n_sink = sealable_counts(n, s, cfg.hot_window, cfg.sink_tokens)
        n_seal = np.where(n < s, 0, n_seal)
        pages, valid = page_starts(r, n_seal, s, step)
        flat = pages[valid]
        if not in_range(flat, self.num_logical_pages):
            return self.pages_to_seal_per_request(whole_rows(r, s, step), n)
        sink = ragged(n_sink, pages.shape[1])[valid]
        todo = ~self.store.sealed_in_all(flat)
        return flat[todo], sink[todo]

    def pages_to_seal_per_request(self, rows: np.ndarray, lens: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """:meth:`pages_to_seal_rows` one request at a time through :meth:`pages_to_seal` (the reference; it raises
        what a bad batch deserves)."""
        s = self.page_size
        sp = [self.pages_to_seal(torch.from_numpy(rows[i, :n])) for i, n in enumerate(lens) if n >= s]
        if not sp:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
        return np.concatenate([x.pages.numpy() for x in sp]), np.concatenate([x.always_dense.numpy() for x in sp])

    def pages_to_seal(self, req_slots: torch.Tensor) -> SealablePages:
        """Pages of one request that may be sealed now under ``mosaic_config``'s hot window and sinks, minus those
        already sealed (:meth:`CompressedKVStore.pages_to_seal`).

        Parameters
        ----------
        req_slots : torch.Tensor
            shape ``[seq_len]``, integer dtype: the request's logical slots in order (tokens written so far).

        Returns
        -------
        SealablePages
            Logical pages and their sink mask, on the CPU.
        """
        slots = _host_int64(req_slots, "req_slots")
        s = self.page_size
        pages = torch.from_numpy(slots[::s] // s)
        cfg = self.mosaic_config
        return SealablePages(*self.store.pages_to_seal(pages, int(slots.size), cfg.hot_window, cfg.sink_tokens))

    # --- consistency (tests, debugging) ------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise ``RuntimeError`` if the host/device bookkeeping is inconsistent (host work, syncs; for tests).

        Checked: logical -> physical is injective and inverse to physical -> logical; free physical pages are
        exactly the unowned ones, each once; the device page table equals its host mirror; a store-allocated page
        has a physical page unless it is sealed in every layer, and a free one has none; the store's count of sealed
        layers per page matches its page states; arena accounting is exact.
        """
        errors = []
        owned = self._l2p[1:][self._l2p[1:] >= 0]
        if np.unique(owned).size != owned.size:
            errors.append("a physical page is owned by two logical pages")
        mapped = np.flatnonzero(self._l2p >= 0)
        if not np.array_equal(self._p2l[self._l2p[mapped]], mapped):
            errors.append("physical -> logical is not the inverse of logical -> physical")
        free = np.array(sorted(self._phys_free), dtype=np.int64)
        unowned = np.flatnonzero(self._p2l < 0)
        if not np.array_equal(free, unowned):
            errors.append(f"free physical pages {free.tolist()[:8]}... differ from unowned {unowned.tolist()[:8]}...")
        if not np.array_equal(self.page_table.cpu().numpy().astype(np.int64), self._l2p):
            errors.append("the device page table differs from its host mirror")
        if not np.array_equal(self.store._layers_sealed, (self.store._state == PAGE_SEALED).sum(0)):
            errors.append("the store's sealed-layer counts differ from its page states")
        state = self.store.page_state().numpy()
        sealed_all = state == PAGE_SEALED  # the all-layers view
        if not np.array_equal(self._live[1:], state[1:] != PAGE_FREE):
            errors.append("store page states differ from the pool's live pages")
        if (self._live[1:] & ~sealed_all[1:] & (self._l2p[1:] < 0)).any():
            errors.append("an unsealed live page has no physical page")
        if ((self._l2p[1:] >= 0) & (~self._live[1:] | sealed_all[1:])).any():
            errors.append("a free or fully sealed page still holds a physical page")
        for li, a in enumerate(self.store.allocators):
            if a.used_granules + a.free_granules != a.capacity:
                errors.append(f"arena {li}: used + free != capacity")
        try:
            self.arena_ledger.check()
        except RuntimeError as err:
            errors.append(str(err))
        if errors:
            raise RuntimeError("MosaicMHATokenToKVPool invariants: " + "; ".join(errors))

    # --- paths SGLang must not use with this pool --------------------------------------------------------------------
    def move_kv_cache(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor) -> None:
        """Not supported: KV slot moves (speculative decoding's accepted-token compaction) would have to move
        physical slots and sealed segments."""
        raise NotImplementedError(
            "MosaicMHATokenToKVPool.move_kv_cache: KV slot moves (speculative decoding) are not supported"
        )

    def set_kv_buffer_prefix_valid(self, *args: Any, **kwargs: Any) -> None:
        """Not supported: prefix-valid commits of draft tokens (DFlash / dspark speculative decoding)."""
        raise NotImplementedError(
            "MosaicMHATokenToKVPool.set_kv_buffer_prefix_valid: prefix-valid KV commits (speculative decoding) are "
            "not supported"
        )

    def get_contiguous_buf_infos(self) -> Tuple[List[int], List[int], List[int]]:
        """Not supported: PD-disaggregation transfer assumes slot-addressed dense buffers covering every token."""
        raise NotImplementedError(
            "MosaicMHATokenToKVPool.get_contiguous_buf_infos: PD disaggregation (--disaggregation-mode) is not "
            "supported with --kv-compressor mosaic"
        )

    def get_cpu_copy(self, indices: torch.Tensor, mamba_indices: Optional[torch.Tensor] = None) -> Any:
        """Not supported yet: CPU backup of retracted requests would have to copy sealed segments too."""
        raise NotImplementedError(
            "MosaicMHATokenToKVPool.get_cpu_copy: CPU backup of retracted requests' KV is not supported yet"
        )

    def load_cpu_copy(
        self, kv_cache_cpu: Any, indices: torch.Tensor, mamba_indices: Optional[torch.Tensor] = None
    ) -> None:
        """Not supported yet (see :meth:`get_cpu_copy`)."""
        raise NotImplementedError(
            "MosaicMHATokenToKVPool.load_cpu_copy: restoring retracted requests' KV from CPU is not supported yet"
        )

    def finalize_backing(self, config: Any) -> None:
        """Not supported: post-capture KV sizing (refused at construction)."""
        raise NotImplementedError(
            "MosaicMHATokenToKVPool.finalize_backing: post-capture KV sizing (CUDA VMM backing) is not supported"
        )
