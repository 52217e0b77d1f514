# SPDX-License-Identifier: Apache-2.0
"""Messages, slot ownership and the worker's job handling, in-process (no sidecar process)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from mkv_sidecar_data import D, G, S, make_segments, plan_tensors, tiny_config

from mosaickv_sglang.planner import plan_exact
from mosaickv_sglang.sidecar import (
    PlanReply,
    PlanRequest,
    Ready,
    SegmentKey,
    Shutdown,
    SidecarConfig,
    SlotBuffers,
    SlotPool,
    SlotState,
)
from mosaickv_sglang.sidecar.protocol import STATUS_FAILED, STATUS_OK
from mosaickv_sglang.sidecar.worker import WorkerSpec, handle_request


def _request(job_id: int, slot: int, n: int, w: int, **kw: object) -> PlanRequest:
    keys = tuple(SegmentKey(0, 0, p, 0) for p in range(n))
    return PlanRequest(job_id, slot, keys, n, w, S, D, G, **kw)  # type: ignore[arg-type]


def test_messages_are_small_frozen_and_picklable():
    """Messages carry slot indices and shapes, never tensors: a request of 8 segments pickles to well under 2 KB."""
    req = _request(3, 1, 8, 4, ratio=3.0)
    for msg in (req, PlanReply(3, 1, STATUS_OK, num_segments=8), Ready(1, os.getpid()), Shutdown()):
        blob = pickle.dumps(msg)
        assert pickle.loads(blob) == msg
        assert len(blob) < 2048, (type(msg).__name__, len(blob))
    with pytest.raises(AttributeError):
        req.slot = 0  # type: ignore[misc]


def test_slot_pool_ownership_cycle():
    """free -> filling -> submitted -> ready -> free; bounded; wrong transitions raise; reclaim frees a dead
    worker's slots."""
    pool = SlotPool(SlotBuffers.allocate(tiny_config(num_slots=2).slot_shape()))
    a, b = pool.try_acquire(), pool.try_acquire()
    assert (a, b) == (0, 1) and pool.try_acquire() is None and pool.num_free == 0
    pool.mark_submitted(a)
    with pytest.raises(RuntimeError, match="expected state FILLING"):
        pool.mark_submitted(a)
    with pytest.raises(RuntimeError, match="expected state FILLING or READY"):
        pool.release(a)
    pool.mark_ready(a)
    assert pool.state(a) == SlotState.READY
    pool.release(a)
    pool.mark_submitted(b)
    pool.reclaim(b)
    assert pool.num_free == 2
    with pytest.raises(ValueError, match=r"slot: expected an index in \[0, 2\), got 5"):
        pool.mark_ready(5)


def test_buffers_are_shared_memory():
    """Every slot tensor lives in shared memory before any worker starts."""
    buffers = SlotBuffers.allocate(tiny_config().slot_shape())
    assert buffers.keys.is_shared() and buffers.k_a.is_shared() and buffers.choice.is_shared()
    assert buffers.queries.shape == (2, 8, 4, G, D) and buffers.k_a.shape == (2, 8, S, tiny_config().max_rank)


def test_handle_request_matches_plan_exact_through_the_slot():
    """The worker's job handling (slot in, plan_exact, slot out, read back) gives plan_exact's plan exactly."""
    cfg = tiny_config()
    buffers = SlotBuffers.allocate(cfg.slot_shape())
    k, v, q = make_segments(6, seed=2, w=3)  # a seed whose ratio-2 plan uses low-rank factors
    ad = torch.tensor([True, False, False, False, False, False])
    buffers.write_inputs(1, k, v, q, always_dense=ad)
    req = _request(7, 1, 6, 3, ratio=2.0, has_always_dense=True)
    reply = handle_request(req, buffers, WorkerSpec(os.getppid(), cfg.resolved_menu()))
    assert reply.status == STATUS_OK and reply.k_rank_cols + reply.v_rank_cols > 0, "expected low-rank factors"
    got = buffers.read_plan(reply, cfg.resolved_menu())
    ref = plan_exact(k, v, q, ratio=2.0, always_dense=ad, menu=cfg.resolved_menu())
    want = plan_tensors(ref)
    have = plan_tensors(got)
    assert want.keys() == have.keys()
    for name, t in want.items():
        torch.testing.assert_close(have[name], t, rtol=0, atol=0, msg=name)
    assert got.budget_bytes == ref.budget_bytes and got.lagrange_multiplier == ref.lagrange_multiplier


def test_planner_error_becomes_a_failed_reply():
    """A budget the menu cannot reach fails the job (the fast plan stays), with the planner's message."""
    cfg = tiny_config()
    buffers = SlotBuffers.allocate(cfg.slot_shape())
    k, v, q = make_segments(2, seed=2)
    buffers.write_inputs(0, k, v, q)
    reply = handle_request(_request(1, 0, 2, 4, budget_bytes=1), buffers, WorkerSpec(0, cfg.resolved_menu()))
    assert reply.status == STATUS_FAILED and "budget" in reply.error


def test_write_inputs_checks_shapes():
    """Inputs that do not fit the slot are refused with '<arg>: expected <x>, got <y>'."""
    buffers = SlotBuffers.allocate(tiny_config().slot_shape())
    k, v, q = make_segments(9, seed=3)
    with pytest.raises(ValueError, match=r"keys: expected 1 to 8 segments \(dim 0\), got 9"):
        buffers.write_inputs(0, k, v, q)
    k, v, q = make_segments(2, seed=3, w=5)
    with pytest.raises(ValueError, match=r"queries: expected 1 to 4 queries \(dim 1\), got 5"):
        buffers.write_inputs(0, k, v, q)


def test_config_validation():
    """Bad sidecar settings fail at construction, naming the field."""
    with pytest.raises(ValueError, match="num_slots: expected >= 1, got 0"):
        SidecarConfig(num_slots=0)
    with pytest.raises(ValueError, match="job_timeout_s: expected a number >= 0, got -1"):
        SidecarConfig(job_timeout_s=-1)
    with pytest.raises(ValueError, match="kv_dtype: expected one of"):
        SidecarConfig(kv_dtype=torch.int8)


@pytest.mark.parametrize("heads", [1, 2, 3])
def test_queries_sent_once_per_group_plan_as_queries_per_segment(heads):
    """A job whose pages share their heads' queries sends them once (``queries_by_group``): the worker reads each
    segment's row through ``group_ids`` and plans exactly as with the rows repeated per segment."""
    cfg = tiny_config()
    buffers = SlotBuffers.allocate(cfg.slot_shape())
    n = 6 // heads * heads
    k, v, _ = make_segments(n, seed=4, w=3)
    q_heads = torch.randn(heads, 3, G, D, generator=torch.Generator().manual_seed(9))
    groups = torch.arange(heads).repeat(n // heads)
    spec = WorkerSpec(os.getppid(), cfg.resolved_menu())
    buffers.write_inputs(0, k, v, q_heads, group_ids=groups, queries_by_group=True)
    by_group = handle_request(_request(1, 0, n, 3, ratio=2.0, has_group_ids=True, query_rows=heads), buffers, spec)
    got = plan_tensors(buffers.read_plan(by_group, cfg.resolved_menu()))
    buffers.write_inputs(1, k, v, q_heads[groups], group_ids=groups)
    per_seg = handle_request(_request(2, 1, n, 3, ratio=2.0, has_group_ids=True), buffers, spec)
    want = plan_tensors(buffers.read_plan(per_seg, cfg.resolved_menu()))
    assert by_group.status == per_seg.status == STATUS_OK and want.keys() == got.keys()
    for name, t in want.items():
        torch.testing.assert_close(got[name], t, rtol=0, atol=0, msg=name)


def test_queries_by_group_are_checked():
    """Rows per group need group_ids inside them; a request naming rows without group_ids fails its job."""
    buffers = SlotBuffers.allocate(tiny_config().slot_shape())
    k, v, q = make_segments(4, seed=5, w=2)
    with pytest.raises(ValueError, match=r"queries: expected 1 to 4 rows, one per group of group_ids, got 2 rows and "
                                         r"group_ids missing"):  # fmt: skip
        buffers.write_inputs(0, k, v, q[:2], queries_by_group=True)
    with pytest.raises(ValueError, match=r"group_ids: expected rows of queries in \[0, 2\), got \[0, 2\]"):
        buffers.write_inputs(0, k, v, q[:2], group_ids=torch.tensor([0, 1, 2, 0]), queries_by_group=True)
    with pytest.raises(ValueError, match=r"request: expected query rows in \[1, 4\] with group_ids, got 2 rows "
                                         r"without group_ids"):  # fmt: skip
        buffers.read_inputs(_request(1, 0, 4, 2, ratio=2.0, query_rows=2))
