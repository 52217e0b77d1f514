# SPDX-License-Identifier: Apache-2.0
"""The seals' GPU spans: nothing off CUDA; spans summed in order once their end events complete, never waited for,
the oldest dropped past the bound; on a GPU, a seal's span covers its device work."""

from __future__ import annotations

import pytest
import torch

from mosaickv_sglang import seal_spans
from mosaickv_sglang.seal_spans import SealSpans


class FakeEvent:
    """Stands in for ``torch.cuda.Event``: completes when the test says so; times are given by the test."""

    clock = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.at = None
        self.done = False

    def record(self) -> None:
        self.at = FakeEvent.clock

    def query(self) -> bool:
        return self.done

    def elapsed_time(self, end: "FakeEvent") -> float:
        assert self.done and end.done
        return (end.at - self.at) * 1e3  # ms, as CUDA events give it


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    spans = SealSpans(torch.device("cpu"))
    spans.enabled = True
    return spans


def _seal(spans: SealSpans, start: float, seconds: float):
    FakeEvent.clock = start
    spans.begin()
    FakeEvent.clock = start + seconds
    spans.end()
    return spans._pending[-1]


def test_off_cuda_nothing_is_recorded():
    spans = SealSpans(torch.device("cpu"))
    assert not spans.enabled
    spans.begin()
    spans.end()
    assert spans.collect() == 0.0 and spans.seals_timed == 0 and spans._pending == []


def test_spans_are_summed_in_order_once_complete_without_waiting(fake_cuda):
    spans = fake_cuda
    a = _seal(spans, 0.0, 0.25)
    b = _seal(spans, 1.0, 0.5)
    c = _seal(spans, 2.0, 0.125)
    assert spans.collect() == 0.0  # nothing complete: nothing waited for
    for ev in (*a, *c):
        ev.done = True
    assert spans.collect() == pytest.approx(0.25) and spans.seals_timed == 1  # b holds c back
    for ev in b:
        ev.done = True
    assert spans.collect() == pytest.approx(0.875) and spans.seals_timed == 3 and spans._pending == []


def test_end_without_begin_records_nothing(fake_cuda):
    fake_cuda.end()
    assert fake_cuda._pending == []


def test_the_oldest_pending_spans_are_dropped_past_the_bound(fake_cuda, monkeypatch):
    monkeypatch.setattr(seal_spans, "MAX_PENDING", 3)
    pairs = [_seal(fake_cuda, float(i), 0.1 * (i + 1)) for i in range(5)]
    assert fake_cuda.dropped == 2 and len(fake_cuda._pending) == 3
    for pair in pairs:
        for ev in pair:
            ev.done = True
    assert fake_cuda.collect() == pytest.approx(0.3 + 0.4 + 0.5) and fake_cuda.seals_timed == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_seal_span_covers_its_device_work():
    """A seal that keeps the GPU busy for 100 million cycles (``torch.cuda._sleep``: at least 40 ms at clocks up to
    2.5 GHz) spans at least 40 ms, counted only after its events complete."""
    spans = SealSpans(torch.device("cuda"))
    torch.cuda.synchronize()
    spans.begin()
    torch.cuda._sleep(100_000_000)
    spans.end()
    torch.cuda.synchronize()
    assert spans.collect() >= 0.040 and spans.seals_timed == 1
