# SPDX-License-Identifier: Apache-2.0
"""The SGLang-independent core of MosaicKV's compressed KV pool.

This package does not import SGLang; ``MosaicTokenToKVPool`` (a later step) wraps :class:`CompressedKVStore` in
SGLang's ``KVCache`` interface.

Design
------
**Pages are segments.** SGLang allocates logical token slots in pages of ``page_size`` tokens; we require
``page_size == S`` (the segment size), so one logical page is one segment position of one request, for every layer
and KV head. The segment of (page ``p``, KV head ``h``) has the fixed descriptor row ``p * H_kv + h``: descriptor and
bounds tables are static (``[num_pages * H_kv, 8]`` int32 and ``[num_pages * H_kv, 2, d]`` per layer), so sealing a
page needs no table allocation, a page id is enough to find its segments, and a radix node that owns whole pages
owns whole segments.

**Two tiers per layer.** Tokens are first written to the dense hot buffers (the SGLang pool's own ``[pool_size,
H_kv, d]`` K/V buffers, owned by the caller). Once a page is complete and has left the hot window (or is a sink
page, see :mod:`mosaickv_sglang.pool.pages`), it is *sealed*: compressed with ``pack_segments_fwd`` under a
:class:`~mosaickv_sglang.kernels.format.SegmentPlan` into the layer's **granule arena**, a 1-D fp16/bf16 tensor
addressed in 128-byte granules. Decode then reads sealed pages from the arena (selected segments) and the rest of
the request from the dense buffers (the *tail*).

**Page states** (host-side, per layer): ``PAGE_FREE`` -> :meth:`~CompressedKVStore.mark_dense` -> ``PAGE_DENSE`` ->
:meth:`~CompressedKVStore.seal` -> ``PAGE_SEALED`` -> :meth:`~CompressedKVStore.free` -> ``PAGE_FREE`` (dense pages
may be freed directly; freeing a free page is a double free and raises). A page's dense slots may be reused only once
it is sealed in *every* layer; metadata uses that all-layers view by default.

**Allocation.** Each layer's arena has a :class:`GranuleAllocator`: a canonical (sorted, coalesced) free-extent list
on the host, vectorised over a batch of payloads (best fit for the whole batch, else first-fit decreasing), exact
accounting (``used + free == capacity``), all-or-nothing with :class:`ArenaFullError`. ``seal`` is all-or-nothing
across layers too: allocations of earlier layers are rolled back when a later layer does not fit, and because the
free list is canonical the rollback restores the exact previous state. Host mirrors keep every segment's payload
runs, so freeing needs no device read.

**Double-buffered re-planning.** :meth:`~CompressedKVStore.reseal` (for the sidecar's final plans) allocates and
packs new payloads next to the old ones into staging descriptor rows, then swaps the live descriptor rows, and
returns a :class:`ReleaseHandle` with the old runs (:meth:`~CompressedKVStore.stage_reseal` does the part that reads
no store state, uploads included, on another thread or stream; :meth:`~CompressedKVStore.reseal_staged` commits it);
the caller releases the handle (:meth:`~CompressedKVStore.release`) once no in-flight step can still read the old
payloads. Swaps happen between steps, never under a running batch.

**Metadata.** :meth:`~CompressedKVStore.decode_metadata` builds exactly the inputs of ``segment_scores_fwd`` /
``select_segments`` / ``sparse_decode_fwd`` (``seg_ids_padded [B, H_kv, MAX_SEGS]``, ``seg_counts``,
``tail_indptr``, ``tail_indices``); :meth:`~CompressedKVStore.extend_metadata` those of ``extend_fwd``.

**Sizing.** :func:`capacity_tokens` gives the logical tokens that fit in a byte budget for a dense hot-buffer size
and a target ratio (formula in :mod:`mosaickv_sglang.pool.sizing`); :func:`arena_granules_for` sizes one arena.
:meth:`~CompressedKVStore.compression_ratio` reports dense bytes of sealed tokens over arena + descriptor + bounds
bytes in use.
"""

from mosaickv_sglang.pool.allocator import ArenaFullError, GranuleAllocator
from mosaickv_sglang.pool.checks import check_int
from mosaickv_sglang.pool.ledger import ArenaLedger, seal_budget_bytes
from mosaickv_sglang.pool.pages import PAGE_DENSE, PAGE_FREE, PAGE_SEALED, SealablePages, sealable_pages
from mosaickv_sglang.pool.sizing import (
    arena_granules_for,
    cap_layout,
    capacity_tokens,
    dense_bytes_per_token,
    PoolLayout,
    hot_tokens_for,
    layout_for_budget,
    max_requests_for_hot,
    metadata_bytes_per_token,
)
from mosaickv_sglang.pool.store import (
    CompressedKVStore,
    DecodeMetadata,
    ExtendMetadata,
    ReleaseHandle,
    StagedReseal,
    to_device,
)

__all__ = [
    "ArenaFullError",
    "ArenaLedger",
    "CompressedKVStore",
    "DecodeMetadata",
    "ExtendMetadata",
    "GranuleAllocator",
    "PAGE_DENSE",
    "PAGE_FREE",
    "PAGE_SEALED",
    "ReleaseHandle",
    "StagedReseal",
    "SealablePages",
    "arena_granules_for",
    "capacity_tokens",
    "check_int",
    "seal_budget_bytes",
    "PoolLayout",
    "hot_tokens_for",
    "cap_layout",
    "layout_for_budget",
    "max_requests_for_hot",
    "dense_bytes_per_token",
    "metadata_bytes_per_token",
    "sealable_pages",
    "to_device",
]
