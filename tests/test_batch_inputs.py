# SPDX-License-Identifier: Apache-2.0
"""The overlap hook's note of the scheduler's batch (mosaickv_sglang.batch_inputs, patches/scheduler.py)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from mosaickv_sglang.batch_inputs import (
    clear_scheduled_batch,
    note_scheduled_batch,
    read_rows_and_slots,
    scheduled_batch_for,
    unmatched_reason,
)
from mosaickv_sglang.config import MosaicKVConfig


@pytest.fixture(autouse=True)
def _no_note():
    clear_scheduled_batch()
    yield
    clear_scheduled_batch()


def test_note_is_used_for_its_own_tensor_or_a_copy_of_its_shape():
    loc = torch.tensor([5, 70, 133])
    note_scheduled_batch(torch.tensor([2, 0, 1], dtype=torch.int32), loc, None)
    got = scheduled_batch_for(loc)
    assert got is not None and got.req_pool_indices.dtype == torch.int64
    assert scheduled_batch_for(loc.clone()) is got and scheduled_batch_for(loc.to(torch.int32)) is got
    assert scheduled_batch_for(loc[:2]) is None and scheduled_batch_for(torch.arange(4)) is None
    assert scheduled_batch_for(loc.to("meta")) is None and scheduled_batch_for(None) is None
    clear_scheduled_batch()
    assert scheduled_batch_for(loc) is None


def test_the_eager_runners_copy_of_a_batch_finds_its_note():
    """SGLang's eager runner copies every forward batch's inputs into its fixed buffers before the plan
    (EagerRunner.load_batch): the copy's out_cache_loc is another tensor, and the note still serves it."""
    from sglang.srt.model_executor.cuda_graph_buffer_registry import build_eager_registry
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
    from sglang.srt.model_executor.runner.eager_runner import EagerRunner

    registry = build_eager_registry(device=torch.device("cpu"), max_bs=8, max_num_token=256,
                                    cache_loc_dtype=torch.int64)  # fmt: skip
    ext = [37, 5, 20]
    n = sum(ext)
    loc = torch.randperm(500, generator=torch.Generator().manual_seed(5))[:n]
    batch = ForwardBatch(forward_mode=ForwardMode.EXTEND, batch_size=3, input_ids=torch.arange(n),
                         req_pool_indices=torch.tensor([4, 0, 2]), seq_lens=torch.tensor(ext), out_cache_loc=loc,
                         seq_lens_sum=n, seq_lens_cpu=torch.tensor(ext), positions=torch.arange(n))  # fmt: skip
    loaded = EagerRunner.load_batch(SimpleNamespace(_eager_registry=registry), batch)
    assert loaded.out_cache_loc is not loc and torch.equal(loaded.out_cache_loc, loc)
    note_scheduled_batch(torch.tensor([4, 0, 2]), loc, None)
    assert scheduled_batch_for(loaded.out_cache_loc) is not None and unmatched_reason(loaded.out_cache_loc) == ""


def test_unmatched_reason_names_why_a_plan_reads_behind_the_step():
    loc = torch.tensor([5, 70])
    assert unmatched_reason(loc) == "no note"
    note_scheduled_batch(torch.tensor([0, 1]), loc, None)
    assert unmatched_reason(loc) == "" and unmatched_reason(loc.clone()) == ""
    assert unmatched_reason(torch.tensor([5, 70, 9])) == "another batch"


def test_note_refuses_device_indices():
    with pytest.raises(ValueError, match="req_pool_indices: expected a host tensor"):
        note_scheduled_batch(torch.zeros(2, dtype=torch.int64, device="meta"), torch.zeros(2), None)


@pytest.mark.parametrize("step", [1, 4])
def test_read_rows_and_slots_on_the_host(step):
    """Without a stream (off CUDA): the rows of the noted requests, every step-th column up to width, and the
    first rows of out_cache_loc as int64."""
    gen = torch.Generator().manual_seed(3)
    r2t = torch.randint(0, 1000, (6, 24), generator=gen, dtype=torch.int32)
    idx = torch.tensor([4, 1, 5, 0])
    loc = torch.randint(0, 1000, (4,), generator=gen, dtype=torch.int32)
    note_scheduled_batch(idx, loc, None)
    rows, slots = read_rows_and_slots(r2t, scheduled_batch_for(loc), 3, 16, step)
    assert torch.equal(rows, r2t[idx[:3], :16:step]) and slots.dtype == torch.int64
    assert torch.equal(slots, loc[:3].long())


def _sealer(overlap: bool):
    cfg = dataclasses.replace(MosaicKVConfig(), overlap_schedule=overlap)
    return SimpleNamespace(pool=SimpleNamespace(mosaic_config=cfg))


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap-on", "overlap-off"])
def test_run_batch_hook_notes_the_batch(overlap):
    """BEFORE Scheduler.run_batch: with the overlap scheduler on, the batch's host indices and out_cache_loc are
    noted (no stream off CUDA); with it off, without a sealer, or for a batch without host indices (an idle
    batch), any earlier note is dropped."""
    from mosaickv_sglang.patches.scheduler import note_batch_inputs
    from mosaickv_sglang.runtime import register_sealer

    loc = torch.tensor([64, 129])
    batch = SimpleNamespace(req_pool_indices_cpu=torch.tensor([3, 1]), out_cache_loc=loc)
    register_sealer(_sealer(overlap))
    try:
        note_scheduled_batch(torch.tensor([0, 0]), loc, None)  # an earlier note, replaced or dropped
        note_batch_inputs(object(), batch)
        got = scheduled_batch_for(loc)
        if overlap:
            assert got is not None and got.stream is None and got.req_pool_indices.tolist() == [3, 1]
            note_batch_inputs(object(), SimpleNamespace(req_pool_indices_cpu=None, out_cache_loc=loc))
            assert scheduled_batch_for(loc) is None
        else:
            assert got is None
        note_scheduled_batch(torch.tensor([3, 1]), loc, None)
        register_sealer(None)
        note_batch_inputs(object(), batch)
        assert scheduled_batch_for(loc) is None
    finally:
        register_sealer(None)


def test_run_batch_hook_forgets_the_note_when_the_batch_is_launched():
    """AFTER Scheduler.run_batch: the note is dropped, so no later plan takes it for its own batch."""
    from mosaickv_sglang.patches.scheduler import forget_batch_inputs

    loc = torch.tensor([64, 129])
    note_scheduled_batch(torch.tensor([3, 1]), loc, None)
    forget_batch_inputs(None, object(), SimpleNamespace(out_cache_loc=loc))
    assert scheduled_batch_for(loc) is None


def test_schedule_batch_has_the_fields_the_hook_reads():
    """ScheduleBatch (SGLang 0.5.17) carries the host request indices and out_cache_loc the hook reads."""
    pytest.importorskip("sglang")
    from sglang.srt.managers.schedule_batch import ScheduleBatch

    from mosaickv_sglang.patches import seam

    names = {f.name for f in dataclasses.fields(ScheduleBatch)}
    assert {seam.BATCH_REQ_POOL_INDICES_CPU_ATTR, seam.BATCH_OUT_CACHE_LOC_ATTR} <= names
