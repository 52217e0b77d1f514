# SPDX-License-Identifier: Apache-2.0
"""A seal's plans from a CUDA graph of the fast planner, one graph per page bucket (``MOSAICKV_SEAL_GRAPH_PAGES``).

The one-call planner (:func:`~mosaickv_sglang.plan_layers.plan_fast_layers`) dispatches about 2,200 kernel ops for a
128-page seal of the 8B shape; served, that was 15-50 ms of the scheduler's host time in one decode plan, the tail of
the decode steps (``bench/RESULTS.md``, twenty-fourth and twenty-sixth runs). Its device half
(:func:`~mosaickv_sglang.plan_layers.plan_on_device`) reads nothing back and copies nothing to the device, so a CUDA
graph holds it, the gather of the pages' K and V from the pool included. A seal then costs one metadata copy, one
copy of the query window, a replay and the copies of the plans out of the graph's buffers.

Seals have many sizes. A seal of ``P`` pages replays the graph of the smallest bucket ``B >= P``; the ``B - P``
padding pages are copies of its first page, always dense (their bytes added to every layer's budget) and in a context
of their own, so that each real page gets the plan the one-call planner gives it without padding (the padding's
energy enters only the estimator's per-layer floor, 1e-12 of the mean value energy, below fp32's resolution of any
context's error norm but a degenerate one's). A seal larger than every bucket, one with nothing to choose, or one
planned before every layer's query window is full is planned without a graph.

A seal planned in layer slices (``MOSAICKV_SEAL_LAYER_SLICES``, :mod:`.pending_seal`) replays a graph of the bucket
and the slice's layers: each layer's plan depends only on that layer (its own budget and Lagrange multiplier), so the
slices' plans are those of the whole seal.

Before serving, the attention backend captures every graph a seal can replay, each bucket for all layers and for
each layer slice (:meth:`SealGraphs.capture_ahead`): captured at a bucket's first seal instead, their captures
(0.04-0.2 s each) ran inside the served steps (a 143 ms decode period at a server's first seal, 45-58 ms periods
beside the first seals of 32 slice graphs: thirty-third run). A graph captured ahead is the one a seal would capture:
it reads nothing back, so no value of the metadata it was captured on is baked in. Every graph shares one memory pool
(logged with its memory) and replays on one stream, so that no two run at once; a graph missing then is captured at
its first seal. Off CUDA there is no graph: the same padded device half runs eagerly, which is what the CPU tests
compare with the one-call planner.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from mosaickv_sglang.kernels import format as fmt
from mosaickv_sglang.plan_layers import LayersCall, host_meta, host_meta_size, needs_estimate, plan_on_device
from mosaickv_sglang.plan_layers import prepare_layers
from mosaickv_sglang.pool.device import to_device
from mosaickv_sglang.strategies import Candidate
from mosaickv_sglang.strategies.base import dense_segment_bytes

logger = logging.getLogger(__name__)

__all__ = ["ENV_VAR", "SealGraphs", "seal_graph_buckets"]

ENV_VAR = "MOSAICKV_SEAL_GRAPH_PAGES"


@contextlib.contextmanager
def _no_collection() -> Iterator[None]:
    """Python's cyclic garbage collector held off: a collection in this thread mid-capture frees whatever CUDA objects
    reference cycles held (tensors, events, pinned host buffers), which can call what a capture forbids in its own
    thread and invalidate it (seen on an H100: a test's cyclic sealers, collected during the next test's capture)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


Gather = Callable[[torch.Tensor, int, range], Tuple[torch.Tensor, torch.Tensor]]
"""``(slots [P * S] on the pool's device, P, layers) -> (keys, values)``, each ``[len(layers), P * H_kv, S, d]``,
page-major and head-minor (the sealer's gather)."""


def seal_graph_buckets() -> Tuple[int, ...]:
    """``MOSAICKV_SEAL_GRAPH_PAGES``: the page buckets, comma-separated integers ``>= 1`` (e.g. ``16,32,64,128,256``);
    unset or empty: no graphs (the default)."""
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return ()
    try:
        buckets = sorted({int(part) for part in raw.split(",")})
    except ValueError:
        buckets = []
    if not buckets or buckets[0] < 1:
        raise ValueError(f"{ENV_VAR}: expected comma-separated page counts >= 1 (e.g. 16,64,256), got {raw!r}")
    return tuple(buckets)


@dataclass(eq=False)
class _Bucket:
    pages: int
    layers: range  # the layers it plans (all, or a slice: MOSAICKV_SEAL_LAYER_SLICES)
    call: LayersCall
    meta: Optional[torch.Tensor] = None  # [host_meta | physical pages], int64, on the device
    queries: Optional[torch.Tensor] = None  # [len(layers), H_kv, W, G, d] fp32
    plan: Optional[fmt.SegmentPlan] = None  # the graph's outputs
    graph: Optional["torch.cuda.CUDAGraph"] = None


def _layers_note(layers: range, num_layers: int) -> str:
    return "" if len(layers) == num_layers else f", layers {layers.start}-{layers.stop - 1}"


class SealGraphs:
    """The fast plans of a seal's pages through a graph of their bucket (see the module docstring).

    Parameters
    ----------
    gather : callable
        :data:`Gather`: the pages' dense K and V of every layer.
    num_layers, page_size, num_kv_heads, head_dim, group_size, window : int
        The pool's shape and the query window's (``W``, the queries per layer a full window holds).
    menu : sequence of Candidate
        The fast planner's menu.
    buckets : sequence of int
        Page counts, ``>= 1``.
    max_segments, max_chunk_bytes : int
        The planner's chunk bounds (as :func:`~mosaickv_sglang.plan_layers.plan_fast_layers`).
    device : torch.device
        The pool's device.
    """

    def __init__(
        self,
        *,
        gather: Gather,
        num_layers: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        group_size: int,
        window: int,
        menu: Sequence[Candidate],
        buckets: Sequence[int],
        max_segments: int,
        max_chunk_bytes: int,
        device: torch.device,
    ) -> None:
        if not buckets or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets):
            raise ValueError(f"buckets: expected page counts >= 1, got {list(buckets)!r}")
        self.gather = gather
        self.num_layers, self.page_size, self.num_kv_heads = num_layers, page_size, num_kv_heads
        self.head_dim, self.group_size, self.window = head_dim, group_size, window
        self.menu = tuple(menu)
        self.buckets = tuple(sorted(set(buckets)))
        self.max_segments, self.max_chunk_bytes = max_segments, max_chunk_bytes
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        self._buckets: Dict[Tuple[int, int, int], _Bucket] = {}  # by (pages, first layer, end layer)
        self.stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        self._pool = torch.cuda.graph_pool_handle() if self.on_cuda else None
        self.replays = 0  # seals planned through a bucket (off CUDA: its padded device half run eagerly)
        self.captures = 0
        self.capture_seconds = 0.0
        self.graph_bytes = 0
        self.cache_to_release = False  # a capture's warm-up left blocks in PyTorch's cache (release_cache)
        self.failed: Optional[str] = None  # why graphs were given up (a capture failed), or None

    def release_cache(self) -> bool:
        """Give the blocks that captures' warm-up runs left in PyTorch's cache back to the device
        (``torch.cuda.empty_cache``, which waits for all of the device's work), once after any captures: for an idle
        scheduler, with no step in flight. Returns whether it did."""
        if not self.cache_to_release:
            return False
        self.cache_to_release = False
        torch.cuda.empty_cache()
        return True

    def bucket_for(self, pages: int) -> Optional[int]:
        """The smallest bucket of at least ``pages`` pages, or ``None``."""
        return next((b for b in self.buckets if b >= pages), None)

    def plan(self, physical_pages: np.ndarray, queries: torch.Tensor, always_dense: np.ndarray, budget_bytes: int,
             layers: Optional[range] = None) -> Optional[List[fmt.SegmentPlan]]:  # fmt: skip
        """The plan of each of ``layers`` (default: every layer; a slice of them has a graph of its own) for the
        pages at ``physical_pages`` (shape ``[P]`` int64, on the host), or ``None`` when no graph applies (the caller
        plans without one).

        ``queries``: those layers' full query windows, shape ``[len(layers), H_kv, W, G, d]`` fp32 on the pool's
        device. ``always_dense``: shape ``[P * H_kv]`` bool on the host (page-major, head-minor). ``budget_bytes``:
        each layer's budget for the ``P * H_kv`` segments."""
        layers = range(self.num_layers) if layers is None else layers
        if layers.step != 1 or not 0 <= layers.start < layers.stop <= self.num_layers:
            raise ValueError(f"layers: expected a range of consecutive layers within {self.num_layers}, got {layers}")
        p = int(physical_pages.size)
        bucket = self.bucket_for(p)
        if self.failed is not None or bucket is None or p == 0:
            return None
        shape = (len(layers), self.num_kv_heads, self.window, self.group_size, self.head_dim)
        if tuple(queries.shape) != shape:
            raise ValueError(f"queries: expected shape {list(shape)}, got {list(queries.shape)}")
        b = self._bucket(bucket, layers)
        ad, budgets = self._padded_budgets(b, p, always_dense, budget_bytes)
        if not needs_estimate(b.call, ad, budgets):
            return None
        meta = self._meta(b, physical_pages, ad, budgets)
        if not self.on_cuda:
            b.meta, b.queries = torch.from_numpy(meta), queries
            plans = self._copy_out(b, self._run(b), p)
        elif b.graph is None and not self._capture(b, meta):
            return None
        else:
            plans = self._replay(b, meta, queries, p)
        self.replays += 1
        return plans

    def capture_ahead(self, layer_ranges: Sequence[range],
                      bucket_ranges: Optional[Mapping[int, Sequence[range]]] = None) -> int:  # fmt: skip
        """Capture the graph of every bucket for each of ``layer_ranges`` (all layers, and each layer slice a seal is
        planned in), and of each bucket of ``bucket_ranges`` for its own ranges (slices that depend on the seal's
        pages), on a seal of page 0 alone: before serving, so that no capture lands in a served step. Returns the
        graphs captured (0 off CUDA, where there are none). A capture that fails gives graphs up, as at a seal."""
        unknown = sorted(set(bucket_ranges or {}) - set(self.buckets))
        if unknown:
            raise ValueError(f"bucket_ranges: expected buckets among {list(self.buckets)}, got {unknown}")
        if not self.on_cuda:
            return 0
        pairs = [(bucket, layers) for layers in layer_ranges for bucket in self.buckets]
        pairs += [(bucket, layers) for bucket, ranges in (bucket_ranges or {}).items() for layers in ranges]
        captured = 0
        for bucket, layers in pairs:
            if self.failed is not None:
                return captured
            b = self._bucket(bucket, layers)
            if b.graph is None and self._capture(b, self.capture_meta(b)):
                captured += 1
        self.release_cache()  # before serving: no step in flight to wait for
        return captured

    def capture_meta(self, b: _Bucket) -> np.ndarray:
        """The metadata a graph of ``b`` is captured on before serving: that of a seal of ``b.pages`` copies of
        physical page 0 (every pool has it), no page always dense, each layer's budget a third of the pages' dense
        bytes."""
        n = b.pages * self.num_kv_heads
        ad, budgets = self._padded_budgets(b, b.pages, np.zeros(n, dtype=bool),
                                           n * dense_segment_bytes(self.page_size, self.head_dim) // 3)  # fmt: skip
        return self._meta(b, np.zeros(b.pages, dtype=np.int64), ad, budgets)

    def _padded_budgets(self, b: _Bucket, pages: int, always_dense: np.ndarray,
                        budget_bytes: int) -> Tuple[np.ndarray, List[int]]:  # fmt: skip
        """The always-dense mask and the layers' budgets of a ``pages``-page seal in ``b``, its padding pages always
        dense and their bytes added to every budget."""
        pad = (b.pages - pages) * self.num_kv_heads
        ad = np.concatenate([np.asarray(always_dense, dtype=bool), np.ones(pad, dtype=bool)])
        return ad, [int(budget_bytes) + pad * dense_segment_bytes(self.page_size, self.head_dim)] * len(b.layers)

    def _meta(self, b: _Bucket, physical_pages: np.ndarray, ad: np.ndarray, budgets: List[int]) -> np.ndarray:
        """:func:`host_meta` and the physical pages of a seal of ``physical_pages`` in ``b``, padded with copies of its
        first page in a context of their own."""
        h, p = self.num_kv_heads, int(physical_pages.size)
        labels = np.concatenate([np.tile(np.arange(h, dtype=np.int64), p),
                                 np.full((b.pages - p) * h, h, dtype=np.int64)])  # fmt: skip
        phys = np.concatenate([np.asarray(physical_pages, dtype=np.int64), np.full(b.pages - p, physical_pages[0])])
        return np.concatenate([host_meta(b.call, labels, ad, budgets), phys])

    def _bucket(self, pages: int, layers: range) -> _Bucket:
        """The bucket of ``pages`` pages for ``layers``, made at first use (no graph yet)."""
        key = (pages, layers.start, layers.stop)
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(pages, layers, self._call(pages, len(layers)))
        return b

    # --- the device half, padded ------------------------------------------------------------------------------------
    def _call(self, pages: int, num_layers: int) -> LayersCall:
        """The planner call of a ``pages``-page bucket of ``num_layers`` layers (shapes only: no tensor is read)."""
        h, s, d = self.num_kv_heads, self.page_size, self.head_dim
        like = torch.empty((num_layers, pages * h, s, d), device="meta")
        dense_b = dense_segment_bytes(s, d)
        call, _, _, _ = prepare_layers(like, like, [pages * h * dense_b] * num_layers,
                                       np.zeros(pages * h, dtype=np.int64), None, self.menu, None, 1.0, "novelty",
                                       self.max_segments, self.max_chunk_bytes)  # fmt: skip
        # one context per KV head, and one for the padding pages
        return LayersCall(call.layers, call.segments, s, d, call.per, h + 1, call.menu, call.scale, call.unseen_weight,
                          call.unseen_prior)  # fmt: skip

    def _run(self, b: _Bucket) -> fmt.SegmentPlan:
        """The bucket's device half on its ``meta`` and ``queries`` (what the graph holds)."""
        call, p, s = b.call, b.pages, self.page_size
        k = host_meta_size(call)
        phys = b.meta[k:]
        slots = (phys[:, None] * s + torch.arange(s, device=phys.device)[None, :]).reshape(-1)
        keys, values = self.gather(slots, p, b.layers)
        queries = [b.queries[i].expand(p, *b.queries.shape[1:]) for i in range(len(b.layers))]
        plan, *_ = plan_on_device(call, keys, values, queries, None, b.meta[:k], must_plan=True)
        return plan

    def _copy_out(self, b: _Bucket, plan: fmt.SegmentPlan, pages: int) -> List[fmt.SegmentPlan]:
        """Each layer's plan of the first ``pages`` pages, copied out of ``plan`` (the bucket's, all its layers')."""
        nl, nb, n = len(b.layers), b.call.segments, pages * self.num_kv_heads
        dev = plan.token_keep.device

        def real_rows(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
            out = torch.empty((nl * n,) + tuple(x.shape[1:]), dtype=x.dtype, device=dev) if out is None else out
            out.view((nl, n) + tuple(x.shape[1:])).copy_(x.view((nl, nb) + tuple(x.shape[1:]))[:, :n])
            return out

        # the four plan vectors as rows of one tensor, each 16-byte aligned (as plan_on_device's columns): the whole
        # plan's vectors, packed in one launch, are aligned, the pack variant the warmup compiles
        cols = torch.empty((4, nl * n + (-(nl * n) % 4)), dtype=torch.int32, device=dev)
        names = ("k_form", "k_param", "v_form", "v_param")
        for i, name in enumerate(names):
            real_rows(getattr(plan, name), cols[i, : nl * n])
        whole = fmt.SegmentPlan(token_keep=real_rows(plan.token_keep), **{name: cols[i, : nl * n] for i, name in
                                enumerate(names)}, k_chan_weight=real_rows(plan.k_chan_weight),
                                v_chan_weight=real_rows(plan.v_chan_weight), flags=real_rows(plan.flags),
                                check_values=False)  # fmt: skip
        return [whole.segment_slice(i * n, (i + 1) * n) for i in range(nl)]

    # --- CUDA ---------------------------------------------------------------------------------------------------------
    def _capture(self, b: _Bucket, meta: np.ndarray) -> bool:
        """Capture the bucket's graph on ``meta`` (its first seal's, or :meth:`capture_meta`; a warm-up run first);
        ``False`` (graphs given up, logged once) when the capture fails."""
        dev = self.device
        t0 = time.perf_counter()
        before = torch.cuda.memory_reserved(dev)
        cur = torch.cuda.current_stream(dev)
        try:
            b.meta = to_device(torch.from_numpy(meta), dev)
            b.queries = torch.zeros((len(b.layers), self.num_kv_heads, self.window, self.group_size,
                                     self.head_dim), dtype=torch.float32, device=dev)  # fmt: skip
            self.stream.wait_stream(cur)
            with torch.cuda.stream(self.stream):
                self._run(b)  # warm-up: lazily made tensors, kernels' first launches
                warmed = torch.cuda.memory_reserved(dev)
                graph = torch.cuda.CUDAGraph()
                with _no_collection():
                    graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                    try:
                        b.plan = self._run(b)
                    finally:
                        graph.capture_end()
            cur.wait_stream(self.stream)
        except Exception as err:  # noqa: BLE001 (any capture failure: seals go on without graphs)
            self.failed = f"{type(err).__name__}: {err}"
            self._buckets.clear()
            logger.warning("MosaicKV: the seal planner's CUDA graph of %d pages failed to capture (%s); seals are "
                           "planned without graphs from now on", b.pages, self.failed)  # fmt: skip
            return False
        b.graph = graph
        # the graph's pool is private: what the reserved memory grew by after the warm-up is the graph's. The
        # warm-up's blocks stay cached for this stream alone unless given back (the 8B shape's four captures grew the
        # reserved memory by 4,988 MiB, warm-ups included, twenty-seventh run): by release_cache, at the scheduler's
        # next idle tick, as empty_cache waits for the whole device (here: for the step in flight and the seal)
        grown, warm_up = torch.cuda.memory_reserved(dev) - warmed, warmed - before
        self.cache_to_release = True
        self.graph_bytes += max(0, grown)
        self.captures += 1
        self.capture_seconds += time.perf_counter() - t0
        logger.info("MosaicKV: captured the seal planner's CUDA graph of %d pages%s in %.2f s (its memory pool grew "
                    "by %.0f MiB; the warm-up's %.0f MiB given back when the scheduler is next idle)", b.pages,
                    _layers_note(b.layers, self.num_layers), time.perf_counter() - t0, grown / 2**20,
                    warm_up / 2**20)  # fmt: skip
        return True

    def _replay(self, b: _Bucket, meta: np.ndarray, queries: torch.Tensor, pages: int) -> List[fmt.SegmentPlan]:
        dev = self.device
        cur = torch.cuda.current_stream(dev)
        self.stream.wait_stream(cur)
        with torch.cuda.stream(self.stream):
            b.meta.copy_(to_device(torch.from_numpy(meta), dev))
            b.queries.copy_(queries)
            b.graph.replay()
            plans = self._copy_out(b, b.plan, pages)
        queries.record_stream(self.stream)
        cur.wait_stream(self.stream)
        whole = plans[0]
        for t in (whole.token_keep, whole.k_form, whole.k_chan_weight, whole.v_chan_weight, whole.flags):
            t.record_stream(cur)  # views of the layers' plans' tensors: made on this stream, read on cur
        return plans

    def status(self) -> str:
        """A few words for the sealer's status line."""
        if self.failed is not None:
            return f"seal graphs given up ({self.failed})"
        return (f"seal graphs: {self.replays} replays, {self.captures} captured in {self.capture_seconds:.1f} s, "
                f"{self.graph_bytes / 2**20:.0f} MiB")  # fmt: skip
