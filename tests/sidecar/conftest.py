# SPDX-License-Identifier: Apache-2.0
"""Fixtures of the sidecar tests: tiny shapes (S=16, d=64, G=2, W=4) and two sidecars acting as two TP ranks.

Starting a sidecar costs one ``spawn`` of Python plus ``import torch`` (seconds on a busy machine), so the two
"ranks" are started once per session, concurrently, and shared by the tests that only need a healthy sidecar.
Tests of faults (kill, hang) start their own.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator, Tuple

import pytest
import torch

from mosaickv_sglang.sidecar import SidecarClient

# Under --import-mode=importlib no test folder is on sys.path; helpers (uniquely named) are imported by name from
# here, also by spawned children (spawn copies sys.path).
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from mkv_sidecar_data import READY_TIMEOUT_S, make_segments, tiny_config  # noqa: E402


@pytest.fixture(scope="session")
def ranks() -> Iterator[Tuple[SidecarClient, SidecarClient]]:
    """Two independent healthy sidecars ("TP ranks") with the same config, started concurrently."""
    a, b = SidecarClient(tiny_config()), SidecarClient(tiny_config())
    a.start()
    b.start()
    try:
        assert a.wait_ready(READY_TIMEOUT_S) and b.wait_ready(READY_TIMEOUT_S), "sidecars did not get ready"
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture
def rank0(ranks: Tuple[SidecarClient, SidecarClient]) -> SidecarClient:
    """A healthy sidecar with no job in flight and every slot free."""
    client = ranks[0]
    client.drain(30.0)
    assert client.counters.queue_depth == 0 and client.free_slots == client.config.num_slots
    return client


@pytest.fixture
def segments() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return make_segments(8, seed=0)

