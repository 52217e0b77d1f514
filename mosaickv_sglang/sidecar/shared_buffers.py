# SPDX-License-Identifier: Apache-2.0
"""A fixed pool of job slots in shared memory, read and written by the client and the sidecar worker.

Every field is one CPU tensor with a leading ``[num_slots]`` dimension, allocated once by the client and moved to
shared memory (``Tensor.share_memory_()``) before the worker starts; the worker receives the tensors once, at
spawn (torch shares their storage, nothing is copied), so a restarted worker sees the same memory. Messages carry
only slot indices and shapes.

Inputs of slot ``i`` (written by the client)
    ``keys``, ``values`` ``[slots, N_max, S, d]`` (KV dtype); ``queries`` ``[slots, N_max, W, G, d]`` fp32;
    ``token_mass`` ``[slots, N_max, S]``, ``k_chan_in``/``v_chan_in``/``q_mean`` ``[slots, N_max, d]`` fp32 (optional
    :class:`~mosaickv_sglang.importance.SegmentImportance`); ``group_ids`` ``[slots, N_max]`` int64;
    ``always_dense`` ``[slots, N_max]`` bool.
Outputs of slot ``i`` (written by the worker)
    ``choice``, ``seg_bytes`` ``[slots, N_max]`` int64; ``est_error`` ``[slots, N_max]`` fp32; ``token_keep``
    ``[slots, N_max, S]`` bool; ``k_form``, ``k_param``, ``v_form``, ``v_param``, ``flags`` ``[slots, N_max]``
    int32; ``k_chan_out``/``v_chan_out`` ``[slots, N_max, d]`` fp32; low-rank factors ``k_a``/``v_a``
    ``[slots, N_max, S, R_max]`` and ``k_b``/``v_b`` ``[slots, N_max, R_max, d]`` fp32.

Ownership of a slot (tracked by :class:`SlotPool`, in the client only)::

    FREE --try_acquire--> FILLING --mark_submitted--> SUBMITTED --mark_ready--> READY --release--> FREE
                           (client writes)              (worker owns)             (client reads)

``reclaim`` returns SUBMITTED slots to FREE, only after the worker that owned them is known to be dead.
Pinned (page-locked) host memory for fast GPU copies needs CUDA and is left to the SGLang wiring.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from mosaickv_sglang.importance import SegmentImportance
from mosaickv_sglang.kernels import format as fmt
from mosaickv_sglang.kernels._checks import check_int, check_tensor
from mosaickv_sglang.planner import PlanResult
from mosaickv_sglang.sidecar.protocol import PlanReply, PlanRequest
from mosaickv_sglang.strategies import Candidate

logger = logging.getLogger(__name__)

__all__ = ["KV_DTYPES", "SlotBuffers", "SlotPool", "SlotShape", "SlotState"]

KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class SlotState(enum.IntEnum):
    """Who owns a slot."""

    FREE = 0
    FILLING = 1
    SUBMITTED = 2
    READY = 3


@dataclass(frozen=True)
class SlotShape:
    """Sizes of the slot pool.

    Attributes
    ----------
    num_slots : int
        Jobs in flight at most (the bound of the sidecar queue).
    max_segments : int
        ``N_max``, segments per job.
    seg_size, head_dim : int
        ``S`` and ``d``.
    window : int
        ``W``, queries per segment at most.
    group_size : int
        ``G``, query heads per KV head.
    max_rank : int
        ``R_max``, low-rank factor columns (the largest rank of the menu; 0 without low-rank candidates).
    kv_dtype : torch.dtype
        dtype of the K and V inputs.
    """

    num_slots: int
    max_segments: int
    seg_size: int
    head_dim: int
    window: int
    group_size: int
    max_rank: int
    kv_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for name in ("num_slots", "max_segments", "seg_size", "head_dim", "window", "group_size"):
            check_int(getattr(self, name), name, lo=1)
        check_int(self.max_rank, "max_rank", lo=0)
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype: expected one of {[str(t) for t in KV_DTYPES]}, got {self.kv_dtype}")


@dataclass(frozen=True, eq=False)
class SlotBuffers:
    """The shared tensors (see the module docstring for shapes). Built by :meth:`allocate`, picklable to a spawned
    worker (storage shared, not copied)."""

    shape: SlotShape
    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    token_mass: torch.Tensor
    k_chan_in: torch.Tensor
    v_chan_in: torch.Tensor
    q_mean: torch.Tensor
    group_ids: torch.Tensor
    always_dense: torch.Tensor
    choice: torch.Tensor
    seg_bytes: torch.Tensor
    est_error: torch.Tensor
    token_keep: torch.Tensor
    k_form: torch.Tensor
    k_param: torch.Tensor
    v_form: torch.Tensor
    v_param: torch.Tensor
    flags: torch.Tensor
    k_chan_out: torch.Tensor
    v_chan_out: torch.Tensor
    k_a: torch.Tensor
    k_b: torch.Tensor
    v_a: torch.Tensor
    v_b: torch.Tensor

    @classmethod
    def allocate(cls, shape: SlotShape) -> "SlotBuffers":
        """Zero-filled tensors in shared memory; logs their total size once."""
        if not isinstance(shape, SlotShape):
            raise TypeError(f"shape: expected SlotShape, got {type(shape).__name__}")
        p, n, s, d = shape.num_slots, shape.max_segments, shape.seg_size, shape.head_dim
        w, g, r = shape.window, shape.group_size, max(shape.max_rank, 1)
        f32, i32, i64, b = torch.float32, torch.int32, torch.int64, torch.bool
        specs: Dict[str, Tuple[Tuple[int, ...], torch.dtype]] = {
            "keys": ((p, n, s, d), shape.kv_dtype),
            "values": ((p, n, s, d), shape.kv_dtype),
            "queries": ((p, n, w, g, d), f32),
            "token_mass": ((p, n, s), f32),
            "k_chan_in": ((p, n, d), f32),
            "v_chan_in": ((p, n, d), f32),
            "q_mean": ((p, n, d), f32),
            "group_ids": ((p, n), i64),
            "always_dense": ((p, n), b),
            "choice": ((p, n), i64),
            "seg_bytes": ((p, n), i64),
            "est_error": ((p, n), f32),
            "token_keep": ((p, n, s), b),
            "k_form": ((p, n), i32),
            "k_param": ((p, n), i32),
            "v_form": ((p, n), i32),
            "v_param": ((p, n), i32),
            "flags": ((p, n), i32),
            "k_chan_out": ((p, n, d), f32),
            "v_chan_out": ((p, n, d), f32),
            "k_a": ((p, n, s, r), f32),
            "k_b": ((p, n, r, d), f32),
            "v_a": ((p, n, s, r), f32),
            "v_b": ((p, n, r, d), f32),
        }
        tensors = {name: torch.zeros(sz, dtype=dt).share_memory_() for name, (sz, dt) in specs.items()}
        out = cls(shape=shape, **tensors)
        logger.info(
            "MosaicKV sidecar buffers: %d slots x %d segments (S=%d, d=%d, W=%d, G=%d, Rmax=%d), %.1f MB shared",
            p, n, s, d, w, g, shape.max_rank, out.nbytes / 2**20,
        )
        return out

    @property
    def nbytes(self) -> int:
        return sum(
            getattr(self, f.name).numel() * getattr(self, f.name).element_size()
            for f in fields(self)
            if f.name != "shape"
        )

    # --- client side: inputs ----------------------------------------------------------------------------------------
    def write_inputs(
        self,
        slot: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        queries: torch.Tensor,
        *,
        importance: Optional[SegmentImportance] = None,
        group_ids: Optional[torch.Tensor] = None,
        always_dense: Optional[torch.Tensor] = None,
        queries_by_group: bool = False,
    ) -> None:
        """Copy one job's inputs into ``slot`` (any device; copies to the host).

        Parameters
        ----------
        keys, values : torch.Tensor
            shape ``[N, S, d]``, float, ``N <= N_max``.
        queries : torch.Tensor
            shape ``[N, W', G, d]``, float, ``1 <= W' <= W``; with ``queries_by_group``, ``[R, W', G, d]``, one row
            per group (``R <= N``), segment ``i`` reading row ``group_ids[i]``.
        importance : SegmentImportance, optional
            ``token_mass`` ``[N, S]``, channel weights and ``q_mean`` ``[N, d]``.
        group_ids : torch.Tensor, optional
            shape ``[N]``, integer.
        always_dense : torch.Tensor, optional
            shape ``[N]``, dtype ``torch.bool``.
        queries_by_group : bool
            Whether ``queries`` has one row per group (needs ``group_ids``, each in ``[0, R)``).
        """
        sh = self.shape
        s, d, g = sh.seg_size, sh.head_dim, sh.group_size
        check_tensor(keys, "keys", shape=(None, s, d), dtype=KV_DTYPES)
        n = keys.shape[0]
        if not 1 <= n <= sh.max_segments:
            raise ValueError(f"keys: expected 1 to {sh.max_segments} segments (dim 0), got {n}")
        check_tensor(values, "values", shape=(n, s, d), dtype=KV_DTYPES)
        if queries_by_group:
            check_tensor(queries, "queries", shape=(None, None, g, d), dtype=KV_DTYPES)
            rows = queries.shape[0]
            if group_ids is None or not 1 <= rows <= n:
                raise ValueError(f"queries: expected 1 to {n} rows, one per group of group_ids, got {rows} rows and "
                                 f"group_ids {'missing' if group_ids is None else 'given'}")  # fmt: skip
            check_tensor(group_ids, "group_ids", shape=(n,), dtype=(torch.int32, torch.int64))
            if int(group_ids.min()) < 0 or int(group_ids.max()) >= rows:
                raise ValueError(f"group_ids: expected rows of queries in [0, {rows}), got "
                                 f"[{int(group_ids.min())}, {int(group_ids.max())}]")  # fmt: skip
        else:
            check_tensor(queries, "queries", shape=(n, None, g, d), dtype=KV_DTYPES)
        w = queries.shape[1]
        if not 1 <= w <= sh.window:
            raise ValueError(f"queries: expected 1 to {sh.window} queries (dim 1), got {w}")
        self.keys[slot, :n].copy_(keys)
        self.values[slot, :n].copy_(values)
        self.queries[slot, : queries.shape[0], :w].copy_(queries)
        if importance is not None:
            if not isinstance(importance, SegmentImportance):
                raise TypeError(f"importance: expected SegmentImportance, got {type(importance).__name__}")
            check_tensor(importance.token_mass, "importance.token_mass", shape=(n, s))
            check_tensor(importance.k_chan_weight, "importance.k_chan_weight", shape=(n, d))
            self.token_mass[slot, :n].copy_(importance.token_mass)
            self.k_chan_in[slot, :n].copy_(importance.k_chan_weight)
            self.v_chan_in[slot, :n].copy_(importance.v_chan_weight)
            if importance.q_mean is not None:
                self.q_mean[slot, :n].copy_(importance.q_mean)
        if group_ids is not None:
            check_tensor(group_ids, "group_ids", shape=(n,), dtype=(torch.int32, torch.int64))
            self.group_ids[slot, :n].copy_(group_ids)
        if always_dense is not None:
            check_tensor(always_dense, "always_dense", shape=(n,), dtype=torch.bool)
            self.always_dense[slot, :n].copy_(always_dense)

    # --- worker side --------------------------------------------------------------------------------------------------
    def read_inputs(self, req: PlanRequest) -> Dict[str, object]:
        """Views of a request's inputs, as keyword arguments of :func:`~mosaickv_sglang.planner.plan_exact` (plus
        ``keys``, ``values``, ``queries``). The views alias shared memory: the slot must stay worker-owned."""
        sh = self.shape
        got = (req.seg_size, req.head_dim, req.group_size)
        if got != (sh.seg_size, sh.head_dim, sh.group_size):
            raise ValueError(
                f"request: expected (S, d, G) = {(sh.seg_size, sh.head_dim, sh.group_size)} like the buffers, got {got}"
            )
        if not (0 <= req.slot < sh.num_slots and 1 <= req.num_segments <= sh.max_segments):
            raise ValueError(
                f"request: expected slot < {sh.num_slots} and 1 <= N <= {sh.max_segments}, "
                f"got slot {req.slot}, N {req.num_segments}"
            )
        if not 1 <= req.num_queries <= sh.window:
            raise ValueError(f"request: expected 1 <= W' <= {sh.window}, got {req.num_queries}")
        i, n, w = req.slot, req.num_segments, req.num_queries
        if req.query_rows and not (req.has_group_ids and 1 <= req.query_rows <= n):
            raise ValueError(f"request: expected query rows in [1, {n}] with group_ids, got {req.query_rows} rows"
                             f"{'' if req.has_group_ids else ' without group_ids'}")  # fmt: skip
        importance = None
        if req.has_importance:
            importance = SegmentImportance(
                self.token_mass[i, :n], self.k_chan_in[i, :n], self.v_chan_in[i, :n],
                self.q_mean[i, :n] if req.has_q_mean else None,
            )
        return {
            "keys": self.keys[i, :n],
            "values": self.values[i, :n],
            # one row per group: expanded here, in the worker, off the scheduler's path
            "queries": (self.queries[i, : req.query_rows, :w][self.group_ids[i, :n]] if req.query_rows
                        else self.queries[i, :n, :w]),
            "importance": importance,
            "group_ids": self.group_ids[i, :n] if req.has_group_ids else None,
            "always_dense": self.always_dense[i, :n] if req.has_always_dense else None,
        }

    def write_plan(self, slot: int, result: PlanResult) -> Tuple[int, int]:
        """Copy a plan into ``slot``'s outputs; returns the factor columns written for K and V (0: none)."""
        plan, n = result.plan, result.plan.num_segments
        self.choice[slot, :n].copy_(result.choice)
        self.seg_bytes[slot, :n].copy_(result.seg_bytes)
        self.est_error[slot, :n].copy_(result.est_error)
        self.token_keep[slot, :n].copy_(plan.token_keep)
        for name in ("k_form", "k_param", "v_form", "v_param", "flags"):
            getattr(self, name)[slot, :n].copy_(getattr(plan, name))
        self.k_chan_out[slot, :n].copy_(plan.k_chan_weight)
        self.v_chan_out[slot, :n].copy_(plan.v_chan_weight)
        cols = []
        for factors, a_buf, b_buf in ((plan.k_factors, self.k_a, self.k_b), (plan.v_factors, self.v_a, self.v_b)):
            if factors is None:
                cols.append(0)
                continue
            a, b = factors
            r = a.shape[2]
            if r > self.shape.max_rank:
                raise ValueError(f"plan: expected low-rank factors with <= {self.shape.max_rank} columns, got {r}")
            a_buf[slot, :n, :, :r].copy_(a)
            b_buf[slot, :n, :r].copy_(b)
            cols.append(r)
        return cols[0], cols[1]

    # --- client side: outputs -----------------------------------------------------------------------------------------
    def read_plan(self, reply: PlanReply, menu: Sequence[Candidate]) -> PlanResult:
        """A :class:`~mosaickv_sglang.planner.PlanResult` copied out of ``reply.slot`` (owns its memory, so the slot
        can be released right after)."""
        i, n = reply.slot, reply.num_segments

        def take(t: torch.Tensor) -> torch.Tensor:
            return t[i, :n].clone()

        def factors(a: torch.Tensor, b: torch.Tensor, r: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
            return None if r == 0 else (a[i, :n, :, :r].clone(), b[i, :n, :r].clone())

        plan = fmt.SegmentPlan(
            token_keep=take(self.token_keep),
            k_form=take(self.k_form),
            k_param=take(self.k_param),
            v_form=take(self.v_form),
            v_param=take(self.v_param),
            k_chan_weight=take(self.k_chan_out),
            v_chan_weight=take(self.v_chan_out),
            k_factors=factors(self.k_a, self.k_b, reply.k_rank_cols),
            v_factors=factors(self.v_a, self.v_b, reply.v_rank_cols),
            flags=take(self.flags),
        )
        return PlanResult(
            plan, tuple(menu), take(self.choice), take(self.est_error), take(self.seg_bytes),
            reply.budget_bytes, reply.dense_bytes, reply.lagrange_multiplier,
        )


class SlotPool:
    """Slot ownership bookkeeping over :class:`SlotBuffers` (client process only; not thread-safe).

    Parameters
    ----------
    buffers : SlotBuffers
        The shared tensors.
    """

    def __init__(self, buffers: SlotBuffers) -> None:
        if not isinstance(buffers, SlotBuffers):
            raise TypeError(f"buffers: expected SlotBuffers, got {type(buffers).__name__}")
        self.buffers = buffers
        self._state: List[SlotState] = [SlotState.FREE] * buffers.shape.num_slots

    @property
    def num_slots(self) -> int:
        return len(self._state)

    def state(self, slot: int) -> SlotState:
        return self._state[slot]

    def count(self, state: SlotState) -> int:
        return sum(1 for s in self._state if s == state)

    @property
    def num_free(self) -> int:
        return self.count(SlotState.FREE)

    def try_acquire(self) -> Optional[int]:
        """The lowest FREE slot, now FILLING; ``None`` when every slot is busy (the caller keeps its fast plan)."""
        for i, s in enumerate(self._state):
            if s == SlotState.FREE:
                self._state[i] = SlotState.FILLING
                return i
        return None

    def _move(self, slot: int, frm: SlotState, to: SlotState) -> None:
        if not 0 <= slot < len(self._state):
            raise ValueError(f"slot: expected an index in [0, {len(self._state)}), got {slot}")
        if self._state[slot] != frm:
            raise RuntimeError(f"slot {slot}: expected state {frm.name}, got {self._state[slot].name}")
        self._state[slot] = to

    def mark_submitted(self, slot: int) -> None:
        """FILLING -> SUBMITTED: the worker owns the slot."""
        self._move(slot, SlotState.FILLING, SlotState.SUBMITTED)

    def mark_ready(self, slot: int) -> None:
        """SUBMITTED -> READY: the worker replied, the client may read the outputs."""
        self._move(slot, SlotState.SUBMITTED, SlotState.READY)

    def release(self, slot: int) -> None:
        """FILLING or READY -> FREE."""
        if self._state[slot] not in (SlotState.FILLING, SlotState.READY):
            raise RuntimeError(f"slot {slot}: expected state FILLING or READY, got {self._state[slot].name}")
        self._state[slot] = SlotState.FREE

    def reclaim(self, slot: int) -> None:
        """SUBMITTED -> FREE, once the worker that owned the slot is dead (joined)."""
        self._move(slot, SlotState.SUBMITTED, SlotState.FREE)
