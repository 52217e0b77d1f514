# SPDX-License-Identifier: Apache-2.0
"""Fixtures of the strategy tests; the matrix (:data:`mkv_strategy_matrix.STRATEGY_MATRIX`) parametrises them.

A test that takes a ``strategy_case`` argument runs once per (class, kwargs) pair; ``strategy_case`` is
``(name, cls, kwargs)`` with ``name`` the key of :data:`mosaickv_sglang.strategies.STRATEGIES`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict

import pytest
import torch

# Under --import-mode=importlib no test folder is on sys.path; the matrix module (uniquely named) is imported by
# name from this folder, by this conftest and by the tests.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from mkv_strategy_matrix import STRATEGY_MATRIX  # noqa: E402


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "strategy_case" in metafunc.fixturenames:
        from mosaickv_sglang.strategies import STRATEGIES

        cases, ids = [], []
        for entry in STRATEGY_MATRIX:
            for i, kw in enumerate(entry["kwargs"]):
                cases.append((entry["name"], STRATEGIES[entry["name"]], kw))
                ids.append(f"{entry['name']}-{i}")
        metafunc.parametrize("strategy_case", cases, ids=ids)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small batched SVDs and sorts are much slower oversubscribed on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def segment_data() -> Dict[str, torch.Tensor]:
    """Seeded, never-zero K-like data for 5 segments of 64 tokens and 128 channels, with scores and weights."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(5, 64, 128, generator=g)
    x = x + 0.01 * torch.sign(x)  # bounded away from 0
    return {
        "x": x,
        "token_score": torch.rand(5, 64, generator=g) + 1e-3,
        "chan_weight": torch.rand(5, 128, generator=g) + 0.1,
    }
