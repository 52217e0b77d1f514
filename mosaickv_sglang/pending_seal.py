# SPDX-License-Identifier: Apache-2.0
"""A seal in two halves: planned in one scheduler step, packed in a later one (``MOSAICKV_SEAL_ASYNC=N``, N plans
later; 1: the next).

A seal reads one thing from the device: its payload sizes, which the host's arena allocator needs before the pack.
Read at once, they make the scheduler wait for the planner's device work, which shares the GPU with the step in
flight (a prefill can hold it for hundreds of milliseconds), while it could be launching the next step. Split, the
first half launches the planner and copies the sizes to pinned host memory without waiting
(:func:`sizes_to_host`); the second half, N plans later, finds the copy done (or waits for what is left of it),
allocates and packs. In between the pages stay dense, so nothing reads a half-sealed page. N counts plans, not the
copy's landing, so that every tensor-parallel rank packs at the same plan; the planner's device work next to a
decode step takes several steps (about 70 ms a 128-page seal on the 8B shape, a decode step 10-12 ms: the
twenty-third GPU run, where packing at the next plan still waited for it). Hot-pool pressure packs at once.

A page freed or sealed in between (its :attr:`~mosaickv_sglang.kv_pool.MosaicMHATokenToKVPool.page_epoch` moved)
voids the plan: :meth:`PendingSeal.live` says which pages still hold what was planned.

With SGLang's overlap scheduler and the seal beside the step (``MOSAICKV_SEAL_BESIDE_STEP=1``), a pack that the next
plan would make is made right after the current step's launch instead (``MOSAICKV_PACK_AFTER_LAUNCH``, on unless
``0``; :meth:`~mosaickv_sglang.sealer.Sealer.after_launch`): there the scheduler's next move is to wait for the step
before, so the pack's host time fills that wait instead of delaying the next launch. Likewise a first half that a plan
decides on is started (planned) right after that plan's step is launched (``MOSAICKV_PLAN_AFTER_LAUNCH``, on unless
``0``), once the sealer has seen that hook run: the plan only chooses the pages.

That planner shares the GPU with the decode steps beside it: in the thirty-second GPU run its start after a launch made
the step two iterations later 6.7 ms slower on average (a 15.3 ms step), the decode tail. With
``MOSAICKV_SEAL_LAYER_SLICES=S`` (S > 1, beside the step, once the hook has run) a first half plans the first of S
slices of the model's layers, and each later launch plans the next slice (``Sealer.after_launch``), so each step shares
the GPU with a fraction of the planner. A layer's plan depends only on that layer, and every slice plans from the query
window the first one read (copied then), so the plans are those of one call for all layers. The pack comes at least
S + 1 plans after the first slice, a launch after the last (``MOSAICKV_SEAL_ASYNC=N`` below that waits the longer); a
pack due sooner for a low hot pool plans the rest first; a page freed meanwhile leaves the rest unplanned (the pack
voids the seal, as it would have).

A slice's cost grows with its seal's pages (forty-sixth GPU run, 4 of 32 layers a slice beside a 13.8 ms step: 1.1 ms
at 16 pages, 1.8-2.0 at 32, 3.0-3.2 at 64, 5.3-6.0 at 128). With ``MOSAICKV_SEAL_SLICE_PAGES=Q`` (an experiment) a seal
of more than ``Q`` pages is planned in ``S * ceil(pages / Q)`` slices, at most one a layer, ``pages`` its seal graph's
bucket where it has one, so that a slice plans about as many pages times layers whatever the seal's size.

The pack shares the GPU with a step too (a 16-page pack about 1.5 ms, larger ones 2-6 ms, thirty-fifth GPU run), and
it waits for every slice's payload sizes. With ``MOSAICKV_PACK_LAYER_SLICES=P`` (P > 1) a pack made after a launch
writes the first of P slices of the layers, each later launch the next (``Sealer.after_launch``): a page sealed in
some layers only is still read dense (the attention lists the pages sealed in every layer), its hot page freed by the
last slice, and each slice waits only for the sizes of its own layers. The seal stays pending until then; a plan
short of room packs the rest at once. A page freed between two slices, or an arena with no room for a later slice,
rolls the seal back: the pages sealed so far in some layers go back to dense in all (their payloads freed, their
ledger room released), due again at the next plan.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional

import numpy as np
import torch

from mosaickv_sglang.config import flag_env, positive_int_env
from mosaickv_sglang.kernels.format import SegmentPlan, plans_granules

__all__ = [
    "PACK_AFTER_LAUNCH_ENV", "PACK_LAYER_SLICES_ENV", "PACK_SOONER_AFTER_ENV", "PLAN_AFTER_LAUNCH_ENV",
    "SEAL_ASYNC_ENV", "SEAL_LAYER_SLICES_ENV", "SEAL_MAX_PAGES_ENV", "SEAL_SLICE_PAGES_ENV", "PendingSeal",
    "layer_slices", "pack_after_launch_enabled", "pack_layer_slices", "pack_sooner_after_plans", "page_scaled_slices",
    "plan_after_launch_enabled", "seal_async_enabled", "seal_async_plans", "seal_layer_slices", "seal_max_pages",
    "seal_slice_pages", "sizes_to_host",
]  # fmt: skip

SEAL_ASYNC_ENV = "MOSAICKV_SEAL_ASYNC"
PACK_AFTER_LAUNCH_ENV = "MOSAICKV_PACK_AFTER_LAUNCH"
PLAN_AFTER_LAUNCH_ENV = "MOSAICKV_PLAN_AFTER_LAUNCH"
PACK_SOONER_AFTER_ENV = "MOSAICKV_PACK_SOONER_AFTER"
SEAL_LAYER_SLICES_ENV = "MOSAICKV_SEAL_LAYER_SLICES"
SEAL_SLICE_PAGES_ENV = "MOSAICKV_SEAL_SLICE_PAGES"
SEAL_MAX_PAGES_ENV = "MOSAICKV_SEAL_MAX_PAGES"
PACK_LAYER_SLICES_ENV = "MOSAICKV_PACK_LAYER_SLICES"


def seal_async_plans() -> int:
    """``MOSAICKV_SEAL_ASYNC=N``: policy seals are packed N plans after the one that planned them (0, the default:
    whole seals)."""
    return _whole_number_env(SEAL_ASYNC_ENV, "plans")


def _whole_number_env(name: str, unit: str) -> int:
    """The integer >= 0 that the environment variable ``name`` holds (0, off, when unset or blank)."""
    raw = os.environ.get(name, "0").strip() or "0"
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{name}: expected a whole number of {unit} >= 0 (0: off), got {raw!r}")
    return value


def pack_sooner_after_plans() -> int:
    """``MOSAICKV_PACK_SOONER_AFTER=K`` (at least 1; default :func:`seal_layer_slices`, so 1 without slices: from the
    next plan on): beside the step, a pending seal is packed before its plan count for a low hot pool only from the
    K-th plan after the one that planned it, unless a plan lacks the room for its own new pages (see
    :attr:`~mosaickv_sglang.sealer.Sealer.pack_sooner_after`). With ``S`` layer slices a pack before the ``S``-th plan
    would plan the slices left itself; ``K`` = ``S`` = 4 is what the thirty-third run measured (an experiment; 3
    without slices changed nothing, thirty-first run)."""
    return positive_int_env(PACK_SOONER_AFTER_ENV, seal_layer_slices(), " number of plans")


def seal_layer_slices() -> int:
    """``MOSAICKV_SEAL_LAYER_SLICES=S`` (at least 1; default 1, every layer at once): the slices of the model's layers
    a first half is planned in beside the step once the hook after a launch has run, one slice a launch (see the
    module's docstring; an experiment: 4 lowered the 8B sidecar-off load's decode-step p99 by 6-10%, 8 raised it,
    ``bench/RESULTS.md``, thirty-third run)."""
    return positive_int_env(SEAL_LAYER_SLICES_ENV, 1, " number of layer slices")


def seal_slice_pages() -> int:
    """``MOSAICKV_SEAL_SLICE_PAGES=Q`` (pages >= 1; default 0, off): with layer slices, a seal of more than ``Q`` pages
    is planned in proportionally more of them (:func:`page_scaled_slices`; an experiment, see the module's
    docstring)."""
    return _whole_number_env(SEAL_SLICE_PAGES_ENV, "pages")


def seal_max_pages() -> int:
    """``MOSAICKV_SEAL_MAX_PAGES=M`` (pages >= 1; default 0, off): a first half plans at most ``M`` pages, the rest
    wait for the next seal (an experiment: a planner slice costs more the more pages its seal has, and a seal
    larger than the seal graphs' largest bucket is planned without graphs)."""
    return _whole_number_env(SEAL_MAX_PAGES_ENV, "pages")


def page_scaled_slices(slices: int, pages: int, slice_pages: int) -> int:
    """The layer slices a seal of ``pages`` pages is planned in: ``slices`` times ``ceil(pages / slice_pages)``
    (at least ``slices``), or ``slices`` alone when it is 1 or ``slice_pages`` is 0 (off)."""
    if slices < 1 or pages < 0 or slice_pages < 0:
        raise ValueError(f"page_scaled_slices: expected slices >= 1 and pages, slice_pages >= 0, got {slices}, "
                         f"{pages} and {slice_pages}")  # fmt: skip
    if slices == 1 or slice_pages == 0:
        return slices
    return slices * max(1, -(-pages // slice_pages))


def pack_layer_slices() -> int:
    """``MOSAICKV_PACK_LAYER_SLICES=P`` (at least 1; default 1, every layer at once): the slices of the model's layers
    a pack made after a launch is written in, one slice a launch (see the module's docstring; an experiment)."""
    return positive_int_env(PACK_LAYER_SLICES_ENV, 1, " number of layer slices")


def layer_slices(num_layers: int, slices: int) -> List[range]:
    """``num_layers`` layers cut into ``min(slices, num_layers)`` consecutive ranges whose sizes differ by at most one,
    the larger first."""
    if num_layers < 1 or slices < 1:
        raise ValueError(f"layer_slices: expected num_layers and slices >= 1, got {num_layers} and {slices}")
    n = min(slices, num_layers)
    size, extra = divmod(num_layers, n)
    bounds = np.cumsum([0] + [size + (i < extra) for i in range(n)])
    return [range(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def seal_async_enabled() -> bool:
    """Whether ``MOSAICKV_SEAL_ASYNC`` turns sealing in two halves on (:func:`seal_async_plans` > 0)."""
    return seal_async_plans() > 0


def pack_after_launch_enabled() -> bool:
    """``MOSAICKV_PACK_AFTER_LAUNCH``: ``1`` (the default) or ``0``; whether a pack due at the next plan is made after
    the current step's launch (with the seal beside the step; see the module's docstring)."""
    return flag_env(PACK_AFTER_LAUNCH_ENV, default=True)


def plan_after_launch_enabled() -> bool:
    """``MOSAICKV_PLAN_AFTER_LAUNCH``: ``1`` (the default) or ``0``; whether the first half of a seal that a plan
    decides on is planned after that plan's step is launched (with the seal beside the step; see the module's
    docstring)."""
    return flag_env(PLAN_AFTER_LAUNCH_ENV, default=True)


@dataclass(eq=False)
class PendingSeal:
    """A planned seal waiting for its pack.

    Attributes
    ----------
    pages, sink_mask : numpy.ndarray
        The pages as chosen (int64, distinct) and their sink flags.
    epochs : numpy.ndarray
        The pages' epochs when planned.
    ratio : float
        The ratio planned for.
    dense_mask : numpy.ndarray
        The pages kept dense at that ratio (the sinks, or none in the last retry).
    reserve : numpy.ndarray
        The arena ledger's reservation for the pages (:meth:`~mosaickv_sglang.pool.ArenaLedger.reservation`).
    slices : list of range
        The slices of the layers it is planned in, in order (one: every layer at once).
    plans : list of SegmentPlan
        One per layer of the slices planned so far (:meth:`add_slice`).
    sizes : list of torch.Tensor
        A slice's plans' payload granules each, ``[layers, P * H_kv * 2]`` on the host (pinned on CUDA), filled by a
        copy that completes with the slice's event in ``ready``.
    ready : list of torch.cuda.Event or None
        Recorded after those copies on CUDA; ``None`` elsewhere (the copy is done).
    queries : FrozenQueries or None
        With several slices, the query window the first one planned from
        (:class:`~mosaickv_sglang.sealer.FrozenQueries`), for the others.
    plans_waited : int
        Plans since the one that planned it.
    waited_seconds : float
        The host's wait in :meth:`host_sizes` for the copy, its planner still running on the device (0: it had
        landed).
    pack_left : list of range
        While a pack in layer slices is under way (``MOSAICKV_PACK_LAYER_SLICES``): the slices of the layers not
        packed yet, in order (empty before the pack starts and after it ends).
    """

    pages: np.ndarray
    sink_mask: np.ndarray
    epochs: np.ndarray
    ratio: float
    dense_mask: np.ndarray
    reserve: np.ndarray
    slices: List[range]
    plans: List[SegmentPlan] = field(default_factory=list)
    sizes: List[torch.Tensor] = field(default_factory=list)
    ready: List[Optional["torch.cuda.Event"]] = field(default_factory=list)
    plans_waited: int = 0
    waited_seconds: float = 0.0
    queries: Any = None
    pack_left: List[range] = field(default_factory=list)

    @property
    def next_slice(self) -> Optional[range]:
        """The first slice not planned yet, or ``None`` when every layer is."""
        return self.slices[len(self.sizes)] if len(self.sizes) < len(self.slices) else None

    def add_slice(self, plans: List[SegmentPlan]) -> None:
        """The plans of :attr:`next_slice`, their sizes' copy to the host started (:func:`sizes_to_host`)."""
        want = self.next_slice
        if want is None or len(plans) != len(want):
            raise ValueError(f"plans: expected the {len(want or ())} plans of slice {want}, got {len(plans)}")
        sizes, ready = sizes_to_host(plans)
        self.plans.extend(plans)
        self.sizes.append(sizes)
        self.ready.append(ready)

    def live(self, page_epoch: np.ndarray) -> np.ndarray:
        """shape ``[P]``, bool: the pages neither freed nor sealed since they were planned."""
        return page_epoch[self.pages] == self.epochs

    def host_sizes(self, layers: Optional[range] = None) -> np.ndarray:
        """The payload granules of ``layers`` (default: every layer), ``[len(layers), P * H_kv * 2]``, waiting for the
        copies of the slices that hold them if still running (that wait added to :attr:`waited_seconds`)."""
        want = range(self.slices[0].start, self.slices[-1].stop) if layers is None else layers
        planned = sum(len(sl) for sl in self.slices[: len(self.sizes)])
        if want.stop > self.slices[0].start + planned:
            raise RuntimeError(f"host_sizes: slices {self.slices[len(self.sizes):]} of the seal are not planned yet")
        t0 = time.perf_counter()
        waited = False
        parts = []
        for sl, sizes, ready in zip(self.slices, self.sizes, self.ready):
            lo, hi = max(sl.start, want.start), min(sl.stop, want.stop)
            if lo >= hi:
                continue
            if ready is not None and not ready.query():
                ready.synchronize()
                waited = True
            parts.append(sizes.numpy()[lo - sl.start : hi - sl.start])
        if waited:
            self.waited_seconds += time.perf_counter() - t0
        return np.concatenate(parts)


def sizes_to_host(plans: List[SegmentPlan]) -> "tuple[torch.Tensor, Optional[torch.cuda.Event]]":
    """Start copying the plans' payload granules to the host without waiting: ``(host tensor, event)``, the event
    (CUDA only) recorded on the current stream after the copy."""
    sizes = plans_granules(plans).reshape(len(plans), -1)
    if sizes.device.type != "cuda":
        return sizes, None
    host = torch.empty(sizes.shape, dtype=sizes.dtype, pin_memory=True)
    host.copy_(sizes, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready
